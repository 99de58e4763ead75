// module.cpp: loading, saving and reading TorchScript modules, and tensors.
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstdio>
#include <unordered_map>

#include "internal.h"

using convsplit::guard;
using convsplit::JsonWriter;
using torch::jit::Module;

namespace convsplit {

char* copyString(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p == nullptr) return nullptr;
  std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

namespace {

bool startsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string trim(const std::string& s) {
  size_t begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  size_t end = s.find_last_not_of(" \t\r\n");
  return s.substr(begin, end - begin + 1);
}

}  // namespace

// A TorchScript interpreter error reads like
//
//   The following operation failed in the TorchScript interpreter.
//   Traceback of TorchScript (most recent call last):
//     File "code/__torch__.py", line 8, in forward
//   RuntimeError: Given groups=1, weight of size [...] ...
//
// and the last "...Error: " line is the one a user needs. Other libtorch
// messages keep their first line only unless it is empty.
std::string cleanMessage(const std::string& message) {
  std::vector<std::string> lines;
  std::istringstream in(message);
  for (std::string line; std::getline(in, line);) lines.push_back(line);

  if (message.find("The following operation failed in the TorchScript interpreter") !=
      std::string::npos) {
    for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
      size_t at = it->find("Error: ");
      if (at != std::string::npos && !startsWith(trim(*it), "File ")) {
        return trim(it->substr(at + 7));
      }
    }
  }
  for (const auto& line : lines) {
    std::string t = trim(line);
    if (startsWith(t, "Exception raised from")) break;
    if (!t.empty()) return t;
  }
  return trim(message);
}

std::vector<std::string> splitPath(const std::string& path) {
  std::vector<std::string> parts;
  if (path.empty()) return parts;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    parts.push_back(path.substr(start, dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

Module findSubmodule(const Module& root, const std::string& path) {
  Module current = root;
  std::string walked;
  for (const auto& part : splitPath(path)) {
    auto type = current.type();
    auto slot = type->findAttributeSlot(part);
    TORCH_CHECK(slot.has_value() && part != "",
                "module '", path, "' not found: '", walked.empty() ? "<root>" : walked,
                "' has no attribute '", part, "'");
    c10::IValue child = current._ivalue()->getSlot(*slot);
    TORCH_CHECK(child.isObject() && child.toObject()->type()->is_module(),
                "module '", path, "' not found: '", walked.empty() ? "<root>" : walked,
                ".", part, "' is not a module");
    current = Module(child.toObject());
    walked += walked.empty() ? part : "." + part;
  }
  return current;
}

std::string unmangledName(const c10::ClassTypePtr& type) {
  auto name = type->name();
  if (!name) return "";
  std::string out;
  for (const auto& atom : name->atoms()) {
    if (startsWith(atom, "___torch_mangle_")) continue;
    out += out.empty() ? atom : "." + atom;
  }
  return out;
}

bool isConv2dType(const c10::ClassTypePtr& type) {
  return unmangledName(type) == "__torch__.torch.nn.modules.conv.Conv2d";
}

// flattenOutputs collects the tensors of a forward result: one tensor, or
// the tensors of a tuple or list, in order.
void flattenOutputs(const c10::IValue& v, std::vector<at::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) flattenOutputs(e, out);
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) out.push_back(t);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) flattenOutputs(e, out);
  } else {
    TORCH_CHECK(false, "forward returned a ", v.tagKind(),
                "; only tensors and tuples or lists of tensors are supported");
  }
}

}  // namespace convsplit

namespace {

std::string lastAtom(const std::string& dotted) {
  size_t dot = dotted.rfind('.');
  return dot == std::string::npos ? dotted : dotted.substr(dot + 1);
}

// extraFileNames lists the names of the archive's extra files ("extra/NAME"),
// which torch::jit::load reads only when asked for them by name.
std::vector<std::string> extraFileNames(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader reader(path);
  std::vector<std::string> names;
  for (const auto& record : reader.getAllRecords()) {
    const std::string prefix = "extra/";
    if (record.compare(0, prefix.size(), prefix) == 0) {
      names.push_back(record.substr(prefix.size()));
    }
  }
  return names;
}

void writeStateEntry(JsonWriter& w, const std::string& name, const at::Tensor& t, bool parameter) {
  w.beginObject().key("name").value(name);
  w.key("shape").ints(t.defined() ? t.sizes().vec() : std::vector<int64_t>{});
  w.key("dtype").value(t.defined() ? std::string(c10::toString(t.scalar_type())) : "");
  w.key("parameter").value(parameter);
  w.endObject();
}

// writeStateDict lists a module's parameters and buffers in the order of
// Python's state_dict(): a module's own entries first, then each child's.
void writeStateDict(JsonWriter& w, const Module& m, const std::string& prefix) {
  auto type = m.type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    if (!type->is_parameter(i) && !type->is_buffer(i)) continue;
    c10::IValue v = m._ivalue()->getSlot(i);
    if (!v.isTensor()) continue;  // an absent (None) bias is not in the state dict
    writeStateEntry(w, prefix + type->getAttributeName(i), v.toTensor(), type->is_parameter(i));
  }
  for (const auto& child : m.named_children()) {
    writeStateDict(w, child.value, prefix + child.name + ".");
  }
}

}  // namespace

extern "C" {

void cs_free(void* p) { std::free(p); }

void cs_manual_seed(uint64_t seed) { torch::manual_seed(seed); }

int cs_module_load(const char* path, cs_module** out, char** err) {
  return guard(err, [&] {
    auto extra = std::make_shared<torch::jit::ExtraFilesMap>();
    try {
      for (const auto& name : extraFileNames(path)) (*extra)[name] = "";
      Module m = torch::jit::load(path, c10::nullopt, *extra);
      *out = new cs_module{m, extra};
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "loading '", path, "' failed: ", convsplit::cleanMessage(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "loading '", path, "' failed: ", convsplit::cleanMessage(e.what()));
    }
  });
}

int cs_module_save(cs_module* m, const char* path, char** err) {
  return guard(err, [&] {
    torch::jit::ExtraFilesMap none;
    std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path, "wb"), &std::fclose);
    TORCH_CHECK(file != nullptr, "opening '", path, "' failed: ", std::strerror(errno));

    // libtorch's archive writer throws on a short write and then throws
    // again from its destructor, which ends the process. So the writer
    // reports every write as complete and keeps the first error instead.
    int writeError = 0;
    auto write = [&](const void* data, size_t size) -> size_t {
      if (writeError == 0 && size > 0 && std::fwrite(data, 1, size, file.get()) != size) {
        writeError = errno != 0 ? errno : EIO;
      }
      return size;
    };
    torch::jit::ExportModule(m->module, write, m->extra_files ? *m->extra_files : none);
    if (writeError == 0 && std::fflush(file.get()) != 0) writeError = errno != 0 ? errno : EIO;
    FILE* raw = file.release();
    if (std::fclose(raw) != 0 && writeError == 0) writeError = errno != 0 ? errno : EIO;
    TORCH_CHECK(writeError == 0, "writing '", path, "' failed: ", std::strerror(writeError));
  });
}

void cs_module_free(cs_module* m) { delete m; }

int cs_module_clone(cs_module* m, cs_module** out, char** err) {
  return guard(err, [&] {
    // A round trip through an in-memory archive gives the copy its own
    // compilation unit and class types. Module::clone would keep the
    // original's compilation unit (so copies could not change types from
    // different threads) and, in libtorch 1.13, never frees the copied
    // submodules. The archive also keeps requires_grad and training flags.
    std::ostringstream buffer;
    m->module.save(buffer);
    std::istringstream in(buffer.str());
    Module copy = torch::jit::load(in);
    auto extra = m->extra_files ? std::make_shared<torch::jit::ExtraFilesMap>(*m->extra_files) : nullptr;
    *out = new cs_module{copy, extra};
  });
}

struct cs_generator {
  at::Generator copy;
};

// A saved generator is a copy of the engine (a few kilobytes). get_state
// would pack the same state into a new tensor, which is slower, and a copy
// is taken before every restructuring while a restore is rare.
int cs_generator_save(cs_generator** out, char** err) {
  return guard(err, [&] {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = new cs_generator{gen.clone()};
  });
}

int cs_generator_restore(cs_generator* saved, char** err) {
  return guard(err, [&] {
    auto state = saved->copy.get_state();
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  });
}

void cs_generator_free(cs_generator* saved) { delete saved; }

int cs_module_submodule(cs_module* m, const char* path, cs_module** out, char** err) {
  return guard(err, [&] {
    *out = new cs_module{convsplit::findSubmodule(m->module, path), nullptr, m->submodule || *path != '\0'};
  });
}

int cs_module_named_modules(cs_module* m, char** json, char** err) {
  return guard(err, [&] {
    JsonWriter w;
    w.beginArray();
    for (const auto& item : m->module.named_modules()) {
      std::string type = item.value.type()->name()->qualifiedName();
      std::string plain = convsplit::unmangledName(item.value.type());
      w.beginObject().key("name").value(item.name);
      w.key("type").value(type).key("class").value(lastAtom(plain));
      w.key("conv2d").value(convsplit::isConv2dType(item.value.type()));
      w.endObject();
    }
    w.endArray();
    *json = convsplit::copyString(w.str());
  });
}

int cs_module_method_names(cs_module* m, char** json, char** err) {
  return guard(err, [&] {
    JsonWriter w;
    w.beginArray();
    for (const auto* fn : m->module.type()->methods()) w.value(fn->name());
    w.endArray();
    *json = convsplit::copyString(w.str());
  });
}

int cs_module_state_dict(cs_module* m, char** json, char** err) {
  return guard(err, [&] {
    JsonWriter w;
    w.beginArray();
    writeStateDict(w, m->module, "");
    w.endArray();
    *json = convsplit::copyString(w.str());
  });
}

int cs_module_train(cs_module* m, int on, char** err) {
  return guard(err, [&] { m->module.train(on != 0); });
}

int cs_module_is_training(cs_module* m, int* out, char** err) {
  return guard(err, [&] { *out = m->module.is_training() ? 1 : 0; });
}

int cs_module_same_object(cs_module* a, cs_module* b) {
  return a->module._ivalue().get() == b->module._ivalue().get() ? 1 : 0;
}

int cs_module_parameter(cs_module* m, const char* name, cs_tensor** out, char** err) {
  return guard(err, [&] {
    auto type = m->module.type();
    auto slot = type->findAttributeSlot(name);
    TORCH_CHECK(slot && (type->is_parameter(*slot) || type->is_buffer(*slot)),
                "module has no parameter or buffer '", name, "'");
    c10::IValue v = m->module._ivalue()->getSlot(*slot);
    TORCH_CHECK(v.isTensor(), "parameter '", name, "' is None");
    *out = new cs_tensor{v.toTensor()};
  });
}

int cs_module_set_parameter(cs_module* m, const char* name, cs_tensor* t, char** err) {
  return guard(err, [&] {
    auto type = m->module.type();
    auto slot = type->findAttributeSlot(name);
    TORCH_CHECK(slot && type->is_parameter(*slot), "module has no parameter '", name, "'");
    m->module._ivalue()->setSlot(*slot, t->tensor);
  });
}

int cs_module_forward(cs_module* m, cs_tensor** inputs, int n_inputs, cs_tensor*** outputs,
                      int* n_outputs, char** err) {
  return guard(err, [&] {
    std::vector<c10::IValue> args;
    for (int i = 0; i < n_inputs; ++i) args.emplace_back(inputs[i]->tensor);
    // Inference only: no autograd graph is kept alive by the outputs.
    torch::NoGradGuard no_grad;
    c10::IValue result = m->module.forward(args);
    std::vector<at::Tensor> tensors;
    convsplit::flattenOutputs(result, tensors);
    auto** handles = static_cast<cs_tensor**>(std::malloc(sizeof(cs_tensor*) * std::max<size_t>(1, tensors.size())));
    TORCH_CHECK(handles != nullptr, "out of memory");
    for (size_t i = 0; i < tensors.size(); ++i) handles[i] = new cs_tensor{tensors[i]};
    *outputs = handles;
    *n_outputs = static_cast<int>(tensors.size());
  });
}

int cs_tensor_from_data(const void* data, int dtype, const int64_t* shape, int ndim, cs_tensor** out,
                        char** err) {
  return guard(err, [&] {
    std::vector<int64_t> sizes(shape, shape + ndim);
    auto options = torch::TensorOptions().dtype(static_cast<c10::ScalarType>(dtype));
    at::Tensor view = torch::from_blob(const_cast<void*>(data), sizes, options);
    *out = new cs_tensor{view.clone()};
  });
}

void cs_tensor_free(cs_tensor* t) { delete t; }

int cs_tensor_dtype(cs_tensor* t) { return static_cast<int>(t->tensor.scalar_type()); }

int cs_tensor_ndim(cs_tensor* t) { return static_cast<int>(t->tensor.dim()); }

void cs_tensor_shape(cs_tensor* t, int64_t* shape) {
  for (int64_t i = 0; i < t->tensor.dim(); ++i) shape[i] = t->tensor.size(i);
}

int cs_tensor_copy_data(cs_tensor* t, void* buf, size_t nbytes, char** err) {
  return guard(err, [&] {
    at::Tensor c = t->tensor.detach().contiguous();
    size_t size = c.numel() * c.element_size();
    TORCH_CHECK(size == nbytes, "tensor has ", size, " bytes, buffer has ", nbytes);
    if (size > 0) std::memcpy(buf, c.data_ptr(), size);
  });
}

int cs_tensor_same(cs_tensor* a, cs_tensor* b) {
  return a->tensor.unsafeGetTensorImpl() == b->tensor.unsafeGetTensorImpl() ? 1 : 0;
}

int cs_tensor_channels_last(cs_tensor* t) {
  const at::Tensor& x = t->tensor;
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
}

int cs_tensor_requires_grad(cs_tensor* t) { return t->tensor.requires_grad() ? 1 : 0; }

}  // extern "C"
