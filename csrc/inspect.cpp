// inspect.cpp: recording the sizes of each Conv2d layer's input and output in a
// forward pass.
//
// The recording works by surgery on a copy of the model: every Conv2d is
// wrapped in a small probe module whose forward calls the layer and appends
// the sizes of its input and output to a List[int] attribute. The copy is
// made with Module::clone(inplace=true), which gives it its own class types
// (so the surgery does not reach the original) but shares the parameter
// tensors (so a large model is not copied). The forward pass runs in eval
// mode without gradients, so no parameter or buffer changes.
#include <torch/torch.h>

#include <regex>
#include <unordered_set>

#include "inspect.h"
#include "internal.h"

using convsplit::guard;
using convsplit::JsonWriter;
using torch::jit::Module;

namespace {

// A Conv2d found in the copy and, once wrapped, its probe.
struct ProbedLayer {
  std::string name;
  Module conv;
  Module probe;
  bool probed = false;
  std::string reason;
  std::vector<std::vector<int64_t>> inputs, outputs;
};

// probeSource is the TorchScript of a probe's methods. Each call appends
// input.dim(), the input sizes, output.dim() and the output sizes, so calls
// with inputs of any rank can be distinguished. aliases are the forwardN
// methods a traced parent may call; all of them run the layer's forward.
std::string probeSource(const std::vector<std::string>& aliases) {
  std::string src =
      "def forward(self, input: Tensor) -> Tensor:\n"
      "    output = self.conv.forward(input)\n"
      "    sizes = self.sizes\n"
      "    sizes.append(input.dim())\n"
      "    sizes.extend(input.size())\n"
      "    sizes.append(output.dim())\n"
      "    sizes.extend(output.size())\n"
      "    return output\n";
  for (const auto& alias : aliases) {
    src += "def " + alias + "(self, input: Tensor) -> Tensor:\n    return self.forward(input)\n";
  }
  return src;
}

std::vector<std::string> forwardAliases(const c10::ClassTypePtr& type) {
  static const std::regex alias("forward[0-9]+");
  std::vector<std::string> out;
  for (const auto* fn : type->methods()) {
    if (std::regex_match(fn->name(), alias)) out.push_back(fn->name());
  }
  return out;
}

// ProbeFactory compiles one probe type per Conv2d class type, since
// compiling TorchScript source costs milliseconds and scripted models share
// one Conv2d type among many layers.
class ProbeFactory {
 public:
  explicit ProbeFactory(std::shared_ptr<torch::jit::CompilationUnit> cu) : cu_(std::move(cu)) {}

  Module wrap(const Module& conv) {
    c10::ClassTypePtr type = probeType(conv.type());
    Module probe(c10::ivalue::Object::create(c10::StrongTypePtr(cu_, type), type->numAttributes()));
    probe._ivalue()->setSlot(*type->findAttributeSlot("training"), false);
    probe._ivalue()->setSlot(*type->findAttributeSlot("conv"), conv._ivalue());
    probe._ivalue()->setSlot(*type->findAttributeSlot("sizes"), c10::IValue(c10::List<int64_t>()));
    return probe;
  }

 private:
  c10::ClassTypePtr probeType(const c10::ClassTypePtr& convType) {
    auto found = types_.find(convType.get());
    if (found != types_.end()) return found->second;
    Module m(c10::QualifiedName("__torch__.convsplit.Conv2dShapeProbe"), cu_, /*shouldMangle=*/true);
    auto type = m.type();
    type->addAttribute("training", c10::BoolType::get());
    type->addAttribute("conv", convType);
    type->addAttribute("sizes", c10::ListType::ofInts());
    m.define(probeSource(forwardAliases(convType)));
    types_.emplace(convType.get(), type);
    return type;
  }

  std::shared_ptr<torch::jit::CompilationUnit> cu_;
  std::unordered_map<const c10::ClassType*, c10::ClassTypePtr> types_;
};

// replace puts the probes at the layers' paths through the C API of
// surgery.cpp and returns its error message, or "" on success.
std::string replace(const Module& root, const std::vector<ProbedLayer*>& layers) {
  cs_module rootHandle{root, nullptr};
  std::vector<cs_module> handles;
  handles.reserve(layers.size());
  std::vector<cs_module*> handlePtrs;
  std::vector<const char*> paths;
  for (ProbedLayer* layer : layers) {
    handles.push_back(cs_module{layer->probe, nullptr});
    paths.push_back(layer->name.c_str());
  }
  for (auto& h : handles) handlePtrs.push_back(&h);
  char* msg = nullptr;
  if (cs_module_replace(&rootHandle, paths.data(), handlePtrs.data(), static_cast<int>(layers.size()), &msg) == 0) {
    return "";
  }
  std::string message = msg ? msg : "replace failed";
  std::free(msg);
  return message;
}

// installProbes wraps every layer at once, and when that fails (one layer
// that cannot be replaced makes the whole replacement fail) wraps them one
// at a time, so only the layers that cannot be wrapped go unrecorded.
void installProbes(const Module& root, std::vector<ProbedLayer>& layers) {
  ProbeFactory factory(root._ivalue()->compilation_unit());
  std::vector<ProbedLayer*> all;
  for (auto& layer : layers) {
    layer.probe = factory.wrap(layer.conv);
    all.push_back(&layer);
  }
  if (all.empty()) return;
  if (replace(root, all).empty()) {
    for (auto* layer : all) layer->probed = true;
    return;
  }
  for (auto* layer : all) {
    layer->reason = replace(root, {layer});
    layer->probed = layer->reason.empty();
  }
}

std::vector<int64_t> takeSizes(const c10::List<int64_t>& sizes, size_t& at) {
  TORCH_CHECK(at < sizes.size(), "shape probe recorded a truncated call");
  const int64_t n = sizes.get(at++);
  TORCH_CHECK(n >= 0 && at + static_cast<size_t>(n) <= sizes.size(), "shape probe recorded a truncated call");
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(sizes.get(at++));
  return out;
}

c10::List<int64_t> records(const ProbedLayer& layer) {
  auto type = layer.probe.type();
  return layer.probe._ivalue()->getSlot(*type->findAttributeSlot("sizes")).toIntList();
}

void clearRecords(ProbedLayer& layer) { records(layer).clear(); }

void readRecords(ProbedLayer& layer) {
  c10::List<int64_t> sizes = records(layer);
  size_t at = 0;
  while (at < sizes.size()) {
    layer.inputs.push_back(takeSizes(sizes, at));
    layer.outputs.push_back(takeSizes(sizes, at));
  }
}

c10::ScalarType inputDtype(const std::vector<ProbedLayer>& layers) {
  for (const auto& layer : layers) {
    auto slot = layer.conv.type()->findAttributeSlot("weight");
    if (!slot) continue;
    c10::IValue weight = layer.conv._ivalue()->getSlot(*slot);
    if (weight.isTensor()) return weight.toTensor().scalar_type();
  }
  return c10::kFloat;
}

void writeLayers(JsonWriter& w, const std::vector<ProbedLayer>& layers) {
  w.key("layers").beginArray();
  for (const auto& layer : layers) {
    w.beginObject().key("name").value(layer.name);
    w.key("probed").value(layer.probed).key("reason").value(layer.reason);
    w.key("calls").beginArray();
    for (size_t i = 0; i < layer.inputs.size(); ++i) {
      w.beginObject().key("input").ints(layer.inputs[i]).key("output").ints(layer.outputs[i]).endObject();
    }
    w.endArray().endObject();
  }
  w.endArray();
}

// dropMethods removes the methods of the copy's own module types from the
// compilation unit that it shares with the model. Module::clone registers a
// new type with copies of every method there, and the unit would keep them
// (about 1 MB for a scripted resnet50, more once they ran) as long as the
// model lives. Types the model itself uses are left alone.
void dropMethods(const Module& model, const Module& copy) {
  std::unordered_set<const c10::ClassType*> modelTypes;
  for (const auto& m : model.modules()) modelTypes.insert(m.type().get());
  std::unordered_set<const c10::ClassType*> done;
  auto cu = copy._ivalue()->compilation_unit();
  for (const auto& m : copy.modules()) {
    auto type = m.type();
    if (modelTypes.count(type.get()) || !done.insert(type.get()).second) continue;
    std::vector<std::string> names;
    for (const auto* fn : type->methods()) names.push_back(fn->name());
    for (const auto& name : names) {
      type->unsafeRemoveMethod(name);
      c10::QualifiedName qualified(*type->name(), name);
      if (cu->find_function(qualified)) cu->unsafeRemoveMethod(qualified);
    }
  }
}

std::string probeShapes(const Module& model, const std::vector<int64_t>& inputShape) {
  for (int64_t s : inputShape) TORCH_CHECK(s >= 0, "input sizes must be non-negative");
  Module copy = model.clone(/*inplace=*/true);
  // Runs on every way out, errors included.
  struct DropOnExit {
    const Module &model, &copy;
    ~DropOnExit() {
      try {
        dropMethods(model, copy);
      } catch (...) {
        // Only memory is at stake, so the result is still valid.
      }
    }
  } dropOnExit{model, copy};

  std::vector<ProbedLayer> layers;
  bool rootIsConv = convsplit::isConv2dType(copy.type());
  for (const auto& item : copy.named_modules()) {
    if (!convsplit::isConv2dType(item.value.type())) continue;
    ProbedLayer layer;
    layer.name = item.name;
    layer.conv = item.value;
    layers.push_back(layer);
  }
  c10::ScalarType dtype = inputDtype(layers);

  if (!rootIsConv) installProbes(copy, layers);
  copy.eval();
  torch::NoGradGuard noGrad;
  at::Tensor input = torch::zeros(inputShape, torch::TensorOptions().dtype(dtype));
  c10::IValue output;
  try {
    output = copy.forward({input});
  } catch (const std::exception&) {
    // Some models take float32 and cast for a wider first layer themselves.
    if (dtype == c10::kFloat) throw;
    dtype = c10::kFloat;
    for (auto& layer : layers) {
      if (layer.probed && !rootIsConv) clearRecords(layer);
    }
    input = torch::zeros(inputShape, torch::TensorOptions().dtype(dtype));
    output = copy.forward({input});
  }

  if (rootIsConv) {
    // The model itself is the only Conv2d: its forward is the call.
    TORCH_CHECK(output.isTensor(), "Conv2d forward returned a ", output.tagKind());
    layers.at(0).probed = true;
    layers.at(0).inputs.push_back(input.sizes().vec());
    layers.at(0).outputs.push_back(output.toTensor().sizes().vec());
  } else {
    for (auto& layer : layers) {
      if (layer.probed) readRecords(layer);
    }
  }

  JsonWriter w;
  w.beginObject().key("dtype").value(std::string(c10::toString(dtype)));
  writeLayers(w, layers);
  w.endObject();
  return w.str();
}

}  // namespace

extern "C" {

int cs_probe_conv2d_shapes(cs_module* m, const int64_t* input_shape, int ndim, char** json, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(ndim > 0, "the input needs at least one dimension");
    std::vector<int64_t> shape(input_shape, input_shape + ndim);
    *json = convsplit::copyString(probeShapes(m->module, shape));
  });
}

int cs_num_threads(void) { return at::get_num_threads(); }

int cs_set_num_threads(int n, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(n > 0, "the thread count must be positive, got ", n);
    at::set_num_threads(n);
  });
}

}  // extern "C"
