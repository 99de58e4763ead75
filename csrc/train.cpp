// train.cpp: what fine-tuning needs: forward with autograd, the trainable
// parameters, losses, backward and torch::optim::SGD.
#include <torch/torch.h>

#include <unordered_set>

#include "internal.h"
#include "train.h"

using convsplit::guard;
using convsplit::JsonWriter;
using torch::jit::Module;

struct cs_sgd {
  std::unique_ptr<torch::optim::SGD> optimizer;
};

namespace {

cs_tensor** allocHandles(size_t n) {
  auto** handles = static_cast<cs_tensor**>(std::malloc(sizeof(cs_tensor*) * std::max<size_t>(1, n)));
  TORCH_CHECK(handles != nullptr, "out of memory");
  return handles;
}

// collectTrainable lists parameters that require gradients in the order of
// Python's named_parameters(), each tensor once.
void collectTrainable(const Module& m, const std::string& prefix,
                      std::unordered_set<const void*>& seen,
                      std::vector<std::pair<std::string, at::Tensor>>& out) {
  auto type = m.type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    if (!type->is_parameter(i)) continue;
    c10::IValue v = m._ivalue()->getSlot(i);
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    if (!t.requires_grad() || !seen.insert(t.unsafeGetTensorImpl()).second) continue;
    out.emplace_back(prefix + type->getAttributeName(i), t);
  }
  for (const auto& child : m.named_children()) {
    collectTrainable(child.value, prefix + child.name + ".", seen, out);
  }
}

}  // namespace

extern "C" {

int cs_module_forward_train(cs_module* m, cs_tensor** inputs, int n_inputs, cs_tensor*** outputs,
                            int* n_outputs, char** err) {
  return guard(err, [&] {
    std::vector<c10::IValue> args;
    for (int i = 0; i < n_inputs; ++i) args.emplace_back(inputs[i]->tensor);
    // Grad mode is thread-local and a goroutine may run on any thread, so it
    // is set here rather than trusted.
    torch::AutoGradMode enable_grad(true);
    c10::IValue result = m->module.forward(args);
    std::vector<at::Tensor> tensors;
    convsplit::flattenOutputs(result, tensors);
    cs_tensor** handles = allocHandles(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) handles[i] = new cs_tensor{tensors[i]};
    *outputs = handles;
    *n_outputs = static_cast<int>(tensors.size());
  });
}

int cs_module_trainable_parameters(cs_module* m, char** names, cs_tensor*** tensors, int* n,
                                   char** err) {
  return guard(err, [&] {
    std::unordered_set<const void*> seen;
    std::vector<std::pair<std::string, at::Tensor>> params;
    collectTrainable(m->module, "", seen, params);
    JsonWriter w;
    w.beginArray();
    for (const auto& p : params) w.value(p.first);
    w.endArray();
    cs_tensor** handles = allocHandles(params.size());
    for (size_t i = 0; i < params.size(); ++i) handles[i] = new cs_tensor{params[i].second};
    *names = convsplit::copyString(w.str());
    *tensors = handles;
    *n = static_cast<int>(params.size());
  });
}

int cs_sgd_new(cs_tensor** params, const char** names, int n, double lr, double momentum, double dampening,
               double weight_decay, int nesterov, cs_sgd** out, char** err) {
  return guard(err, [&] {
    std::vector<at::Tensor> tensors;
    for (int i = 0; i < n; ++i) {
      const at::Tensor& t = params[i]->tensor;
      TORCH_CHECK(t.requires_grad(), "parameter ", names[i], " does not require gradients");
      // A parameter computed from another tensor (one with a grad_fn) gets
      // no .grad of its own: its gradients flow to that tensor instead.
      TORCH_CHECK(t.is_leaf(), "parameter ", names[i], " is not a leaf tensor: it was computed from ",
                  "another tensor (its grad_fn is ", t.grad_fn()->name(), "), so it gets no gradient");
      tensors.push_back(t);
    }
    auto options = torch::optim::SGDOptions(lr)
                       .momentum(momentum)
                       .dampening(dampening)
                       .weight_decay(weight_decay)
                       .nesterov(nesterov != 0);
    *out = new cs_sgd{std::make_unique<torch::optim::SGD>(tensors, options)};
  });
}

void cs_sgd_free(cs_sgd* o) { delete o; }

int cs_sgd_zero_grad(cs_sgd* o, char** err) {
  return guard(err, [&] { o->optimizer->zero_grad(); });
}

int cs_sgd_step(cs_sgd* o, char** err) {
  return guard(err, [&] {
    torch::NoGradGuard no_grad;
    o->optimizer->step();
  });
}

int cs_cross_entropy(cs_tensor* logits, cs_tensor* target, cs_tensor** out, char** err) {
  return guard(err, [&] {
    torch::AutoGradMode enable_grad(true);
    *out = new cs_tensor{torch::nn::functional::cross_entropy(logits->tensor, target->tensor)};
  });
}

int cs_mse_loss(cs_tensor* input, cs_tensor* target, cs_tensor** out, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(input->tensor.sizes() == target->tensor.sizes(), "input shape ", input->tensor.sizes(),
                " differs from target shape ", target->tensor.sizes());
    torch::AutoGradMode enable_grad(true);
    *out = new cs_tensor{torch::nn::functional::mse_loss(input->tensor, target->tensor)};
  });
}

int cs_tensor_backward(cs_tensor* t, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(t->tensor.requires_grad(),
                "tensor does not require gradients: was it computed by Forward rather than ForwardTrain?");
    t->tensor.backward();
  });
}

int cs_tensor_item(cs_tensor* t, double* out, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(t->tensor.numel() == 1, "tensor has ", t->tensor.numel(), " elements, not one");
    *out = t->tensor.item<double>();
  });
}

int cs_tensor_grad(cs_tensor* t, cs_tensor** out, char** err) {
  return guard(err, [&] {
    const at::Tensor& g = t->tensor.grad();
    *out = g.defined() ? new cs_tensor{g} : nullptr;
  });
}

}  // extern "C"
