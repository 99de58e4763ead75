/*
 * train.h: the C API for fine-tuning: forward with autograd, trainable
 * parameters, losses, backward and an SGD optimizer (torch::optim::SGD).
 *
 * Conventions are those of convsplit.h: 0 on success, 1 on failure with a
 * message in *err that the caller releases with cs_free.
 */
#ifndef CONVSPLIT_TRAIN_H
#define CONVSPLIT_TRAIN_H
#include "convsplit.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cs_sgd cs_sgd;

/* Runs forward with gradient recording on; outputs as cs_module_forward. */
int cs_module_forward_train(cs_module* m, cs_tensor** inputs, int n_inputs,
                            cs_tensor*** outputs, int* n_outputs, char** err);

/*
 * Lists the parameters that require gradients, in the order of Python's
 * named_parameters(): a JSON array of names in *names and a malloc'ed array
 * of handles in *tensors. A parameter shared by several modules is listed
 * once, under its first name. The handles are the parameters themselves.
 */
int cs_module_trainable_parameters(cs_module* m, char** names, cs_tensor*** tensors, int* n,
                                   char** err);

/* names label the parameters in error messages. */
int cs_sgd_new(cs_tensor** params, const char** names, int n, double lr, double momentum, double dampening,
               double weight_decay, int nesterov, cs_sgd** out, char** err);
void cs_sgd_free(cs_sgd* o);
int cs_sgd_zero_grad(cs_sgd* o, char** err);
int cs_sgd_step(cs_sgd* o, char** err);

/* Losses with mean reduction. cross_entropy takes logits (N, C, ...) and
 * int64 class indices (N, ...) or probabilities shaped like the logits. */
int cs_cross_entropy(cs_tensor* logits, cs_tensor* target, cs_tensor** out, char** err);
int cs_mse_loss(cs_tensor* input, cs_tensor* target, cs_tensor** out, char** err);

int cs_tensor_backward(cs_tensor* t, char** err);
int cs_tensor_item(cs_tensor* t, double* out, char** err);
/* *out is NULL when t has no gradient. */
int cs_tensor_grad(cs_tensor* t, cs_tensor** out, char** err);

#ifdef __cplusplus
}
#endif

#endif
