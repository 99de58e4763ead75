// conv2d.cpp: reading the geometry of Conv2d modules, and building new
// Conv2d and Sequential modules that mirror torch.jit.script of
// torch.nn.Conv2d and torch.nn.Sequential in torch 1.13.
#include <torch/csrc/jit/ir/ir.h>
#include <torch/torch.h>

#include <cmath>
#include <unordered_map>

#include "internal.h"

using convsplit::ConvGeometry;
using convsplit::guard;
using convsplit::JsonWriter;
using torch::jit::Module;
using torch::jit::Node;
using torch::jit::Value;

namespace convsplit {

void JsonWriter::separate() {
  if (needComma_) out_ += ',';
  needComma_ = true;
}

JsonWriter& JsonWriter::beginObject() {
  separate();
  out_ += '{';
  needComma_ = false;
  return *this;
}

JsonWriter& JsonWriter::endObject() {
  out_ += '}';
  needComma_ = true;
  return *this;
}

JsonWriter& JsonWriter::beginArray() {
  separate();
  out_ += '[';
  needComma_ = false;
  return *this;
}

JsonWriter& JsonWriter::endArray() {
  out_ += ']';
  needComma_ = true;
  return *this;
}

JsonWriter& JsonWriter::key(const std::string& k) {
  value(k);
  out_ += ':';
  needComma_ = false;
  return *this;
}

JsonWriter& JsonWriter::value(const std::string& s) {
  separate();
  out_ += '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out_ += '\\';
      out_ += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out_ += buf;
    } else {
      out_ += static_cast<char>(c);
    }
  }
  out_ += '"';
  return *this;
}

JsonWriter& JsonWriter::value(int64_t v) {
  separate();
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::value(bool v) {
  separate();
  out_ += v ? "true" : "false";
  return *this;
}

JsonWriter& JsonWriter::ints(const std::vector<int64_t>& v) {
  beginArray();
  for (int64_t x : v) value(x);
  return endArray();
}

void writeGeometry(JsonWriter& w, const ConvGeometry& g) {
  w.beginObject();
  w.key("in_channels").value(g.in_channels).key("out_channels").value(g.out_channels);
  w.key("kernel_size").ints(g.kernel_size).key("stride").ints(g.stride);
  w.key("padding").ints(g.padding).key("dilation").ints(g.dilation);
  w.key("groups").value(g.groups).key("padding_mode").value(g.padding_mode);
  w.key("padding_string").value(g.padding_string).key("bias").value(g.bias);
  w.key("scripted").value(g.scripted).key("channels_last").value(g.channels_last);
  w.key("training").value(g.training);
  w.key("dtype").value(std::string(c10::toString(g.dtype)));
  w.key("weight_shape").ints(g.weight_shape);
  w.endObject();
}

}  // namespace convsplit

namespace {

// ---------------------------------------------------------------------------
// Reading geometry.

std::vector<int64_t> pairFromIValue(const c10::IValue& v, const char* what) {
  std::vector<int64_t> out;
  if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) out.push_back(e.toInt());
  } else if (v.isIntList()) {
    out = v.toIntVector();
  } else if (v.isInt()) {
    out = {v.toInt(), v.toInt()};
  }
  TORCH_CHECK(out.size() == 2, "constant '", what, "' is not a pair of integers");
  return out;
}

c10::IValue requireConstant(const c10::ClassTypePtr& type, const char* name) {
  auto v = type->findConstant(name);
  TORCH_CHECK(v.has_value(), "scripted Conv2d type ", type->repr_str(), " has no constant '", name, "'");
  return *v;
}

void readScripted(const Module& m, ConvGeometry& g) {
  auto type = m.type();
  g.scripted = true;
  g.in_channels = requireConstant(type, "in_channels").toInt();
  g.out_channels = requireConstant(type, "out_channels").toInt();
  g.groups = requireConstant(type, "groups").toInt();
  g.kernel_size = pairFromIValue(requireConstant(type, "kernel_size"), "kernel_size");
  g.stride = pairFromIValue(requireConstant(type, "stride"), "stride");
  g.dilation = pairFromIValue(requireConstant(type, "dilation"), "dilation");
  g.padding_mode = requireConstant(type, "padding_mode").toStringRef();
  c10::IValue padding = requireConstant(type, "padding");
  if (padding.isString()) {
    g.padding_string = padding.toStringRef();
    g.padding = {0, 0};
  } else {
    g.padding = pairFromIValue(padding, "padding");
  }
}

// intsOf reads a traced graph's int[] argument: a prim::ListConstruct of
// integer constants, or one int[] constant.
std::vector<int64_t> intsOf(Value* v, const char* what) {
  Node* n = v->node();
  if (n->kind() == c10::prim::Constant) {
    auto iv = torch::jit::toIValue(v);
    TORCH_CHECK(iv && iv->isIntList(), "traced argument '", what, "' is not an int list");
    return iv->toIntVector();
  }
  TORCH_CHECK(n->kind() == c10::prim::ListConstruct,
              "traced argument '", what, "' is computed by ", n->kind().toQualString(),
              ", not a constant list");
  std::vector<int64_t> out;
  for (Value* e : n->inputs()) {
    auto iv = torch::jit::toIValue(e);
    TORCH_CHECK(iv && iv->isInt(), "traced argument '", what, "' has a non-constant element");
    out.push_back(iv->toInt());
  }
  return out;
}

c10::IValue constantOf(Value* v, const char* what) {
  auto iv = torch::jit::toIValue(v);
  TORCH_CHECK(iv.has_value(), "traced argument '", what, "' is not a constant");
  return *iv;
}

bool isSelfAttribute(Value* v, Value* self, const char* name) {
  Node* n = v->node();
  return n->kind() == c10::prim::GetAttr && n->input(0) == self && n->s(c10::attr::name) == name;
}

// readTraced recognizes the forward graph that torch.jit.trace records for a
// Conv2d. For padding_mode='reflect' it looks like
//
//   %w = prim::GetAttr[name="weight"](%self)
//   %p = aten::pad(%input, [1, 1, 1, 1], "reflect", None)
//   %y = aten::_convolution(%p, %w, %b, [1, 1], [0, 0], [1, 1], False, ...)
//
// zero padding has no aten::pad and the padding in _convolution, and
// padding='same' calls aten::_convolution_mode. Any other graph is rejected,
// because a geometry guessed from an unknown graph would be wrong silently.
void readTraced(const Module& m, ConvGeometry& g) {
  g.scripted = false;
  auto method = m.find_method("forward");
  TORCH_CHECK(method.has_value(), "Conv2d has no forward method");
  auto graph = method->graph();
  Value* self = graph->inputs().at(0);
  TORCH_CHECK(graph->inputs().size() == 2, "traced Conv2d forward takes ", graph->inputs().size() - 1,
              " inputs, expected 1");
  Value* input = graph->inputs().at(1);

  Node* conv = nullptr;
  Node* pad = nullptr;
  for (Node* n : graph->nodes()) {
    auto kind = n->kind();
    if (kind == c10::prim::Constant || kind == c10::prim::ListConstruct || kind == c10::prim::GetAttr) {
      continue;
    }
    const std::string name = kind.toQualString();
    if (name == "aten::_convolution" || name == "aten::_convolution_mode") {
      TORCH_CHECK(conv == nullptr, "traced Conv2d forward has more than one convolution");
      conv = n;
    } else if (name == "aten::pad" || name == "aten::reflection_pad2d" ||
               name == "aten::replication_pad2d" || name == "aten::_pad_circular") {
      TORCH_CHECK(pad == nullptr, "traced Conv2d forward pads more than once");
      pad = n;
    } else {
      TORCH_CHECK(false, "traced Conv2d forward has an unrecognized operation ", name);
    }
  }
  TORCH_CHECK(conv != nullptr, "traced Conv2d forward has no aten::_convolution");
  TORCH_CHECK(graph->outputs().size() == 1 && graph->outputs()[0] == conv->output(),
              "traced Conv2d forward does not return its convolution");
  TORCH_CHECK(isSelfAttribute(conv->input(1), self, "weight"), "traced convolution does not use self.weight");

  Value* bias = conv->input(2);
  if (isSelfAttribute(bias, self, "bias")) {
    g.bias = true;
  } else {
    TORCH_CHECK(bias->node()->kind() == c10::prim::Constant && bias->type()->kind() == c10::TypeKind::NoneType,
                "traced convolution's bias is neither self.bias nor None");
    g.bias = false;
  }

  const bool modeForm = std::string(conv->kind().toQualString()) == "aten::_convolution_mode";
  g.stride = intsOf(conv->input(3), "stride");
  if (modeForm) {
    g.padding_string = constantOf(conv->input(4), "padding").toStringRef();
    g.padding = {0, 0};
    g.dilation = intsOf(conv->input(5), "dilation");
    g.groups = constantOf(conv->input(6), "groups").toInt();
  } else {
    g.padding = intsOf(conv->input(4), "padding");
    g.dilation = intsOf(conv->input(5), "dilation");
    TORCH_CHECK(!constantOf(conv->input(6), "transposed").toBool(), "traced convolution is transposed");
    g.groups = constantOf(conv->input(8), "groups").toInt();
  }

  if (pad == nullptr) {
    TORCH_CHECK(conv->input(0) == input, "traced convolution does not read the forward input");
    g.padding_mode = "zeros";
  } else {
    TORCH_CHECK(!modeForm, "traced convolution with a padding string also pads explicitly");
    TORCH_CHECK(pad->input(0) == input && conv->input(0) == pad->output(),
                "traced padding is not applied to the forward input");
    const std::string kind = pad->kind().toQualString();
    if (kind == "aten::pad") {
      g.padding_mode = constantOf(pad->input(2), "mode").toStringRef();
      TORCH_CHECK(g.padding_mode == "reflect" || g.padding_mode == "replicate" || g.padding_mode == "circular",
                  "traced padding mode '", g.padding_mode, "' is not a Conv2d padding mode");
    } else if (kind == "aten::reflection_pad2d") {
      g.padding_mode = "reflect";
    } else if (kind == "aten::replication_pad2d") {
      g.padding_mode = "replicate";
    } else {
      g.padding_mode = "circular";
    }
    // The pad list is (left, right, top, bottom); Conv2d pads symmetrically.
    auto amounts = intsOf(pad->input(1), "pad");
    TORCH_CHECK(amounts.size() == 4 && amounts[0] == amounts[1] && amounts[2] == amounts[3],
                "traced padding is not symmetric");
    TORCH_CHECK(g.padding == std::vector<int64_t>({0, 0}), "traced convolution pads twice");
    g.padding = {amounts[2], amounts[0]};
  }
  TORCH_CHECK(g.stride.size() == 2 && g.padding.size() == 2 && g.dilation.size() == 2,
              "traced convolution is not two-dimensional");
}

ConvGeometry readGeometry(const Module& m) {
  TORCH_CHECK(convsplit::isConv2dType(m.type()), "module of type ", m.type()->repr_str(), " is not a Conv2d");
  ConvGeometry g;
  auto weightSlot = m.type()->findAttributeSlot("weight");
  TORCH_CHECK(weightSlot.has_value(), "Conv2d has no weight");
  c10::IValue weightValue = m._ivalue()->getSlot(*weightSlot);
  TORCH_CHECK(weightValue.isTensor(), "Conv2d weight is not a tensor");
  at::Tensor weight = weightValue.toTensor();
  TORCH_CHECK(weight.dim() == 4, "Conv2d weight has ", weight.dim(), " dimensions, expected 4");

  if (m.type()->findConstant("kernel_size").has_value()) {
    readScripted(m, g);
    // The constants describe the layer only if the weight agrees with them.
    TORCH_CHECK(g.groups > 0 && weight.size(0) == g.out_channels && weight.size(1) * g.groups == g.in_channels &&
                    weight.size(2) == g.kernel_size[0] && weight.size(3) == g.kernel_size[1],
                "Conv2d weight of shape ", weight.sizes(), " does not match its constants in_channels=",
                g.in_channels, ", out_channels=", g.out_channels, ", groups=", g.groups, ", kernel_size=(",
                g.kernel_size[0], ", ", g.kernel_size[1], ")");
    auto biasSlot = m.type()->findAttributeSlot("bias");
    g.bias = biasSlot.has_value() && m._ivalue()->getSlot(*biasSlot).isTensor();
  } else {
    readTraced(m, g);
    g.out_channels = weight.size(0);
    g.in_channels = weight.size(1) * g.groups;
    g.kernel_size = {weight.size(2), weight.size(3)};
  }
  g.dtype = weight.scalar_type();
  g.weight_shape = weight.sizes().vec();
  g.channels_last = !weight.is_contiguous() && weight.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.training = m.is_training();
  return g;
}

// ---------------------------------------------------------------------------
// Building modules.

std::string tupleSource(const std::vector<int64_t>& v) {
  return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")";
}

std::string configKey(const ConvGeometry& g) {
  std::ostringstream key;
  key << g.in_channels << '/' << g.out_channels << '/' << tupleSource(g.kernel_size) << tupleSource(g.stride)
      << tupleSource(g.padding) << g.padding_string << tupleSource(g.dilation) << '/' << g.groups << '/'
      << g.padding_mode;
  return key.str();
}

void checkSpec(const ConvGeometry& g) {
  TORCH_CHECK(g.in_channels > 0 && g.out_channels > 0 && g.groups > 0, "Conv2d channels and groups must be positive");
  TORCH_CHECK(g.in_channels % g.groups == 0 && g.out_channels % g.groups == 0,
              "Conv2d channels must be divisible by groups");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(g.kernel_size[i] > 0 && g.stride[i] > 0 && g.dilation[i] > 0 && g.padding[i] >= 0,
                "Conv2d kernel, stride and dilation must be positive and padding non-negative");
  }
  TORCH_CHECK(g.padding_string.empty() || g.padding_string == "same" || g.padding_string == "valid",
              "unknown padding string '", g.padding_string, "'");
  TORCH_CHECK(g.padding_string != "same" || (g.stride[0] == 1 && g.stride[1] == 1),
              "padding='same' needs stride 1");
  TORCH_CHECK(g.padding_mode == "zeros" || g.padding_mode == "reflect" || g.padding_mode == "replicate" ||
                  g.padding_mode == "circular",
              "unknown padding mode '", g.padding_mode, "'");
  TORCH_CHECK(g.dtype == c10::kFloat || g.dtype == c10::kDouble || g.dtype == c10::kHalf ||
                  g.dtype == c10::kBFloat16,
              "Conv2d parameters of dtype ", c10::toString(g.dtype), " are not supported");
}

// emptyParameters allocates a Conv2d's weight and bias, in their final dtype
// and layout, without values.
std::pair<at::Tensor, at::Tensor> emptyParameters(const ConvGeometry& g) {
  const auto format = g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor weight = torch::empty({g.out_channels, g.in_channels / g.groups, g.kernel_size[0], g.kernel_size[1]},
                                   at::TensorOptions().dtype(g.dtype).memory_format(format));
  weight.set_requires_grad(true);
  at::Tensor bias;
  if (g.bias) {
    bias = torch::empty({g.out_channels}, at::TensorOptions().dtype(g.dtype));
    bias.set_requires_grad(true);
  }
  return {weight, bias};
}

// fillUniform fills a tensor with values drawn uniformly from (-bound, bound)
// in float32 and in logical order, as Python draws them before a cast or a
// change of layout.
void fillUniform(at::Tensor& t, double bound) {
  if (t.scalar_type() == c10::kFloat && t.is_contiguous()) {
    t.uniform_(-bound, bound);
    return;
  }
  at::Tensor drawn = torch::empty(t.sizes());
  drawn.uniform_(-bound, bound);
  t.copy_(drawn);
}

// drawParameters fills a Conv2d's weight, then its bias, as torch.nn.Conv2d's
// constructor does, so that a seeded run matches Python number for number.
// The weight's bound follows kaiming_uniform_(a = sqrt(5)) in Python's double
// arithmetic. Calling torch::nn::init would take two tensor views per layer.
void drawParameters(at::Tensor& weight, at::Tensor& bias) {
  TORCH_CHECK(weight.defined() && weight.dim() == 4, "a Conv2d weight must have 4 dimensions");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0)),
              "the bias must have one value per output channel");
  TORCH_CHECK(weight.numel() > 0, "the weight has no values to draw");
  torch::NoGradGuard no_grad;
  const double fanIn = static_cast<double>(weight.size(1) * weight.size(2) * weight.size(3));
  const double slope = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1 + std::pow(slope, 2)));
  fillUniform(weight, std::sqrt(3.0) * (gain / std::sqrt(fanIn)));
  if (bias.defined()) fillUniform(bias, 1.0 / std::sqrt(fanIn));
}

// Methods are built as graphs rather than compiled from TorchScript source:
// the compiler costs milliseconds per type, which adds up on large models.
// The graphs are the ones torch.jit.script makes for torch 1.13's Conv2d and
// Sequential, so the saved code reads the same.

c10::Argument argument(const std::string& name, c10::TypePtr type) { return c10::Argument(name, std::move(type)); }

void addMethod(const std::shared_ptr<torch::jit::CompilationUnit>& cu, const c10::ClassTypePtr& type,
               const std::string& name, const std::shared_ptr<torch::jit::Graph>& graph,
               std::vector<c10::Argument> arguments, c10::TypePtr returns) {
  auto* fn = cu->create_function(c10::QualifiedName(*type->name(), name), graph);
  fn->setSchema(c10::FunctionSchema(name, "", std::move(arguments), {c10::Argument("", std::move(returns))}));
  type->addMethod(fn);
}

// callMethod appends prim::CallMethod[name](object, args...) returning a Tensor.
Value* callMethod(torch::jit::Graph& graph, const std::string& name, std::vector<Value*> inputs) {
  Node* call = graph.insertNode(graph.create(c10::prim::CallMethod, inputs));
  call->s_(c10::attr::name, name);
  call->output()->setType(c10::TensorType::get());
  return call->output();
}

// callTensorOp appends an aten operator returning a Tensor, with the
// constants as further inputs. The interpreter picks the overload from the
// input types, so the schema matching of Graph::insert (in a profile, about
// half the cost of a new Conv2d type) is skipped.
Value* callTensorOp(torch::jit::Graph& graph, c10::Symbol op, std::vector<Value*> inputs,
                    const std::vector<c10::IValue>& constants) {
  for (const auto& constant : constants) inputs.push_back(graph.insertConstant(constant));
  Node* node = graph.insertNode(graph.create(op, inputs));
  node->output()->setType(c10::TensorType::get());
  return node->output();
}

// addConv2dMethods gives a Conv2d type forward(input), which reads the
// parameters and calls _conv_forward(input, weight, bias), which pads for
// padding modes other than zeros and convolves with the configuration as
// constants.
void addConv2dMethods(const std::shared_ptr<torch::jit::CompilationUnit>& cu, const c10::ClassTypePtr& type,
                      const ConvGeometry& g) {
  auto tensor = c10::TensorType::get();
  auto optionalTensor = c10::OptionalType::create(tensor);

  auto forward = std::make_shared<torch::jit::Graph>();
  Value* self = forward->addInput("self")->setType(type);
  Value* input = forward->addInput("input")->setType(tensor);
  Value* weight = forward->insertGetAttr(self, "weight");
  weight->setDebugName("weight");
  Value* bias = forward->insertGetAttr(self, "bias");
  bias->setDebugName("bias");
  forward->registerOutput(callMethod(*forward, "_conv_forward", {self, input, weight, bias}));
  addMethod(cu, type, "forward", forward, {argument("self", type), argument("input", tensor)}, tensor);

  auto conv = std::make_shared<torch::jit::Graph>();
  self = conv->addInput("self")->setType(type);
  input = conv->addInput("input")->setType(tensor);
  weight = conv->addInput("weight")->setType(tensor);
  bias = conv->addInput("bias")->setType(optionalTensor);
  Value* padded = input;
  c10::IValue padding = g.padding_string.empty() ? c10::IValue(g.padding) : c10::IValue(g.padding_string);
  if (g.padding_mode != "zeros") {
    Value* amounts = conv->insertGetAttr(self, "_reversed_padding_repeated_twice");
    amounts->setDebugName("_reversed_padding_repeated_twice");
    padded = callTensorOp(*conv, c10::aten::pad, {padded, amounts}, {c10::IValue(g.padding_mode), c10::IValue()});
    padding = c10::IValue(std::vector<int64_t>{0, 0});
  }
  Value* out = callTensorOp(*conv, c10::aten::conv2d, {padded, weight, bias},
                            {c10::IValue(g.stride), padding, c10::IValue(g.dilation), c10::IValue(g.groups)});
  conv->registerOutput(out);
  addMethod(cu, type, "_conv_forward", conv,
            {argument("self", type), argument("input", tensor), argument("weight", tensor),
             argument("bias", optionalTensor)},
            tensor);
}

// addSequentialMethods gives a Sequential type forward(input), which calls
// each child's forward in order, __len__, and one alias of forward per name.
void addSequentialMethods(const std::shared_ptr<torch::jit::CompilationUnit>& cu, const c10::ClassTypePtr& type,
                          size_t children, const std::vector<std::string>& aliases) {
  auto tensor = c10::TensorType::get();

  auto forward = std::make_shared<torch::jit::Graph>();
  Value* self = forward->addInput("self")->setType(type);
  Value* x = forward->addInput("input")->setType(tensor);
  for (size_t i = 0; i < children; ++i) {
    Value* child = forward->insertGetAttr(self, std::to_string(i));
    x = callMethod(*forward, "forward", {child, x});
  }
  forward->registerOutput(x);
  addMethod(cu, type, "forward", forward, {argument("self", type), argument("input", tensor)}, tensor);

  auto length = std::make_shared<torch::jit::Graph>();
  length->addInput("self")->setType(type);
  length->registerOutput(length->insertConstant(static_cast<int64_t>(children)));
  addMethod(cu, type, "__len__", length, {argument("self", type)}, c10::IntType::get());

  for (const auto& alias : aliases) {
    auto graph = std::make_shared<torch::jit::Graph>();
    Value* aliasSelf = graph->addInput("self")->setType(type);
    Value* aliasInput = graph->addInput("input")->setType(tensor);
    graph->registerOutput(callMethod(*graph, "forward", {aliasSelf, aliasInput}));
    addMethod(cu, type, alias, graph, {argument("self", type), argument("input", tensor)}, tensor);
  }
}

}  // namespace

struct cs_builder {
  std::shared_ptr<torch::jit::CompilationUnit> cu;
  // Types made by this builder, by configuration, so each is compiled once.
  std::unordered_map<std::string, c10::ClassTypePtr> types;
};

namespace {

c10::ClassTypePtr conv2dType(cs_builder* b, const ConvGeometry& g) {
  const std::string key = "conv2d:" + configKey(g);
  auto found = b->types.find(key);
  if (found != b->types.end()) return found->second;

  Module m(c10::QualifiedName("__torch__.torch.nn.modules.conv.Conv2d"), b->cu, /*shouldMangle=*/true);
  auto type = m.type();
  // Attribute and constant order as torch.jit.script gives them in torch 1.13.
  type->addAttribute("weight", c10::TensorType::get(), /*is_parameter=*/true);
  type->addAttribute("bias", c10::OptionalType::create(c10::TensorType::get()), /*is_parameter=*/true);
  type->addAttribute("training", c10::BoolType::get());
  type->addAttribute("_is_full_backward_hook", c10::NoneType::get());
  type->addAttribute("transposed", c10::BoolType::get());
  type->addAttribute("_reversed_padding_repeated_twice", c10::ListType::ofInts());
  auto pair = [](const std::vector<int64_t>& v) {
    return c10::ivalue::Tuple::create(c10::IValue(v[0]), c10::IValue(v[1]));
  };
  type->addConstant("in_channels", g.in_channels);
  if (g.padding_string.empty()) {
    type->addConstant("padding", pair(g.padding));
  } else {
    type->addConstant("padding", g.padding_string);
  }
  type->addConstant("stride", pair(g.stride));
  type->addConstant("output_padding", pair({0, 0}));
  type->addConstant("kernel_size", pair(g.kernel_size));
  type->addConstant("out_channels", g.out_channels);
  type->addConstant("dilation", pair(g.dilation));
  type->addConstant("padding_mode", g.padding_mode);
  type->addConstant("groups", g.groups);
  addConv2dMethods(b->cu, type, g);
  b->types.emplace(key, type);
  return type;
}

// reversedPadding is the pad list F.pad takes, (left, right, top, bottom).
// torch.nn.Conv2d computes it for padding='same' as dilation * (kernel - 1)
// split with the smaller half first, so an even kernel pads one more on the
// right and bottom.
std::vector<int64_t> reversedPadding(const ConvGeometry& g) {
  std::vector<int64_t> out;
  for (int axis = 1; axis >= 0; --axis) {
    int64_t before = g.padding[axis], after = g.padding[axis];
    if (g.padding_string == "same") {
      int64_t total = g.dilation[axis] * (g.kernel_size[axis] - 1);
      before = total / 2;
      after = total - before;
    } else if (g.padding_string == "valid") {
      before = after = 0;
    }
    out.push_back(before);
    out.push_back(after);
  }
  return out;
}

// checkParameters rejects tensors that a Conv2d of geometry g cannot hold.
void checkParameters(const ConvGeometry& g, const at::Tensor& weight, const at::Tensor& bias) {
  const std::vector<int64_t> shape{g.out_channels, g.in_channels / g.groups, g.kernel_size[0], g.kernel_size[1]};
  TORCH_CHECK(weight.defined() && weight.sizes() == c10::IntArrayRef(shape), "the weight's shape ",
              weight.defined() ? weight.sizes() : c10::IntArrayRef{}, " is not the Conv2d's ", c10::IntArrayRef(shape));
  TORCH_CHECK(weight.scalar_type() == g.dtype, "the weight is ", weight.scalar_type(), ", not ", g.dtype);
  TORCH_CHECK(bias.defined() == g.bias, g.bias ? "the Conv2d needs a bias" : "the Conv2d has no bias");
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == g.out_channels, "the bias's shape ", bias.sizes(),
                " is not (", g.out_channels, ")");
    TORCH_CHECK(bias.scalar_type() == g.dtype, "the bias is ", bias.scalar_type(), ", not ", g.dtype);
  }
}

// conv2dWith makes a Conv2d module of geometry g holding the given tensors.
Module conv2dWith(cs_builder* b, const ConvGeometry& g, const at::Tensor& weight, const at::Tensor& bias) {
  checkSpec(g);
  checkParameters(g, weight, bias);
  auto type = conv2dType(b, g);
  Module m(c10::ivalue::Object::create(c10::StrongTypePtr(b->cu, type), type->numAttributes()));
  m._ivalue()->setSlot(*type->findAttributeSlot("weight"), weight);
  m._ivalue()->setSlot(*type->findAttributeSlot("bias"), bias.defined() ? c10::IValue(bias) : c10::IValue());
  m._ivalue()->setSlot(*type->findAttributeSlot("training"), g.training);
  m._ivalue()->setSlot(*type->findAttributeSlot("_is_full_backward_hook"), c10::IValue());
  m._ivalue()->setSlot(*type->findAttributeSlot("transposed"), false);
  m._ivalue()->setSlot(*type->findAttributeSlot("_reversed_padding_repeated_twice"),
                       c10::IValue(reversedPadding(g)));
  return m;
}

bool isIdentifier(const std::string& s) {
  if (s.empty() || std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  for (unsigned char c : s) {
    if (!std::isalnum(c) && c != '_') return false;
  }
  return true;
}

Module newSequential(cs_builder* b, const std::vector<Module>& children, const std::vector<std::string>& aliases,
                     bool training) {
  TORCH_CHECK(!children.empty(), "a Sequential needs at least one child");
  std::string key = "sequential:";
  for (const auto& c : children) key += c.type()->name()->qualifiedName() + ",";
  for (const auto& a : aliases) {
    TORCH_CHECK(isIdentifier(a) && a != "forward" && a != "__len__", "invalid method alias '", a, "'");
    key += a + ";";
  }

  c10::ClassTypePtr type;
  auto found = b->types.find(key);
  if (found != b->types.end()) {
    type = found->second;
  } else {
    Module m(c10::QualifiedName("__torch__.torch.nn.modules.container.Sequential"), b->cu, /*shouldMangle=*/true);
    type = m.type();
    type->addAttribute("training", c10::BoolType::get());
    type->addAttribute("_is_full_backward_hook", c10::NoneType::get());
    for (size_t i = 0; i < children.size(); ++i) type->addAttribute(std::to_string(i), children[i].type());
    addSequentialMethods(b->cu, type, children.size(), aliases);
    b->types.emplace(key, type);
  }

  Module m(c10::ivalue::Object::create(c10::StrongTypePtr(b->cu, type), type->numAttributes()));
  m._ivalue()->setSlot(*type->findAttributeSlot("training"), training);
  m._ivalue()->setSlot(*type->findAttributeSlot("_is_full_backward_hook"), c10::IValue());
  for (size_t i = 0; i < children.size(); ++i) {
    m._ivalue()->setSlot(*type->findAttributeSlot(std::to_string(i)), children[i]._ivalue());
  }
  return m;
}

ConvGeometry geometryOf(const cs_conv2d_spec* spec) {
  ConvGeometry g;
  g.in_channels = spec->in_channels;
  g.out_channels = spec->out_channels;
  g.groups = spec->groups;
  g.kernel_size = {spec->kernel_size[0], spec->kernel_size[1]};
  g.stride = {spec->stride[0], spec->stride[1]};
  g.padding = {spec->padding[0], spec->padding[1]};
  g.dilation = {spec->dilation[0], spec->dilation[1]};
  g.padding_mode = spec->padding_mode ? spec->padding_mode : "zeros";
  g.padding_string = spec->padding_string ? spec->padding_string : "";
  g.bias = spec->bias != 0;
  g.dtype = static_cast<c10::ScalarType>(spec->dtype);
  g.channels_last = spec->channels_last != 0;
  g.training = spec->training != 0;
  return g;
}

// optionalString copies s for the C API, or returns NULL when it is empty.
char* optionalString(const std::string& s) { return s.empty() ? nullptr : convsplit::copyString(s); }

void fillGeometry(cs_layer& out, const ConvGeometry& g) {
  out.in_channels = g.in_channels;
  out.out_channels = g.out_channels;
  out.groups = g.groups;
  for (int i = 0; i < 2; ++i) {
    out.kernel_size[i] = g.kernel_size[i];
    out.stride[i] = g.stride[i];
    out.padding[i] = g.padding[i];
    out.dilation[i] = g.dilation[i];
  }
  out.padding_mode = optionalString(g.padding_mode);
  out.padding_string = optionalString(g.padding_string);
  out.dtype = optionalString(c10::toString(g.dtype));
  out.bias = g.bias;
  out.scripted = g.scripted;
  out.channels_last = g.channels_last;
  out.training = g.training;
  out.weight_ndim = static_cast<int>(std::min<size_t>(g.weight_shape.size(), 4));
  for (int i = 0; i < out.weight_ndim; ++i) out.weight_shape[i] = g.weight_shape[i];
}

}  // namespace

extern "C" {

int cs_conv2d_geometry(cs_module* m, char** json, char** err) {
  return guard(err, [&] {
    JsonWriter w;
    convsplit::writeGeometry(w, readGeometry(m->module));
    *json = convsplit::copyString(w.str());
  });
}

int cs_describe_layer(cs_module* root, const char* path, cs_layer* out, char** err) {
  *out = cs_layer{};
  int status = guard(err, [&] {
    Module layer;
    try {
      layer = convsplit::findSubmodule(root->module, path);
    } catch (const c10::Error&) {
      return;  // found stays 0
    }
    auto type = layer.type();
    std::string plain = convsplit::unmangledName(type);
    out->found = 1;
    out->type = optionalString(type->name()->qualifiedName());
    out->class_name = optionalString(plain.substr(plain.rfind('.') + 1));
    if (!convsplit::isConv2dType(type)) return;
    out->conv2d = 1;

    try {
      fillGeometry(*out, readGeometry(layer));
    } catch (const c10::Error& e) {
      out->geometry_error = optionalString(convsplit::cleanMessage(e.what_without_backtrace()));
    }
    std::string methods;
    for (const auto* fn : type->methods()) methods += fn->name() + "\n";
    out->methods = optionalString(methods);
    for (const char* name : {"weight", "bias"}) {
      auto slot = type->findAttributeSlot(name);
      if (!slot) continue;
      c10::IValue v = layer._ivalue()->getSlot(*slot);
      if (v.isTensor()) *(std::string(name) == "weight" ? &out->weight : &out->bias_tensor) = new cs_tensor{v.toTensor()};
    }
  });
  if (status != 0) cs_layer_free(out);
  return status;
}

void cs_layer_free(cs_layer* layer) {
  for (char* s : {layer->type, layer->class_name, layer->padding_mode, layer->padding_string, layer->dtype,
                  layer->geometry_error, layer->methods}) {
    std::free(s);
  }
  delete layer->weight;
  delete layer->bias_tensor;
  *layer = cs_layer{};
}

int cs_builder_new(cs_module* owner, cs_builder** out, char** err) {
  return guard(err, [&] { *out = new cs_builder{owner->module._ivalue()->compilation_unit(), {}}; });
}

void cs_builder_free(cs_builder* b) { delete b; }

int cs_conv2d_parameters(const cs_conv2d_spec* spec, cs_tensor** weight, cs_tensor** bias, char** err) {
  return guard(err, [&] {
    ConvGeometry g = geometryOf(spec);
    checkSpec(g);
    auto [w, b] = emptyParameters(g);
    *weight = new cs_tensor{w};
    *bias = b.defined() ? new cs_tensor{b} : nullptr;
  });
}

int cs_conv2d_draw(cs_tensor* weight, cs_tensor* bias, char** err) {
  return guard(err, [&] {
    at::Tensor none;
    drawParameters(weight->tensor, bias ? bias->tensor : none);
  });
}

int cs_builder_conv2d(cs_builder* b, const cs_conv2d_spec* spec, cs_module** out, char** err) {
  return guard(err, [&] {
    ConvGeometry g = geometryOf(spec);
    checkSpec(g);
    auto [weight, bias] = emptyParameters(g);
    drawParameters(weight, bias);
    *out = new cs_module{conv2dWith(b, g, weight, bias), nullptr};
  });
}

int cs_builder_conv2d_with(cs_builder* b, const cs_conv2d_spec* spec, cs_tensor* weight, cs_tensor* bias,
                           cs_module** out, char** err) {
  return guard(err, [&] {
    at::Tensor none;
    *out = new cs_module{conv2dWith(b, geometryOf(spec), weight->tensor, bias ? bias->tensor : none), nullptr};
  });
}

int cs_builder_sequential(cs_builder* b, cs_module** children, int n_children, const char** aliases, int n_aliases,
                          int training, cs_module** out, char** err) {
  return guard(err, [&] {
    std::vector<Module> kids;
    for (int i = 0; i < n_children; ++i) kids.push_back(children[i]->module);
    std::vector<std::string> names;
    for (int i = 0; i < n_aliases; ++i) names.emplace_back(aliases[i]);
    *out = new cs_module{newSequential(b, kids, names, training != 0), nullptr};
  });
}

}  // extern "C"
