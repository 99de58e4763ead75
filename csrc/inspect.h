/*
 * inspect.h: the C API behind convsplit inspect and convsplit bench:
 * recording the tensor sizes each Conv2d layer receives and returns during a forward pass,
 * and libtorch's intra-op thread count.
 *
 * Conventions as in convsplit.h: 0 on success and 1 on failure, with a
 * message in *err (released with cs_free); JSON text is released with cs_free.
 */
#ifndef CONVSPLIT_INSPECT_H
#define CONVSPLIT_INSPECT_H

#include "convsplit.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Runs one forward pass of a copy of m in eval mode without gradients, on a
 * zero tensor of the given sizes, and records the input and output sizes of
 * every call of every Conv2d. The input's dtype is that of the first
 * Conv2d's weight, or float32 when m has no Conv2d or when the pass fails
 * with the first Conv2d's dtype (models that cast their input themselves). m itself is not changed. The copy
 * shares m's parameter tensors, so this costs no second copy of the weights.
 *
 * *json receives
 *   {"dtype": "Float", "layers": [{"name": "layer1.0.conv1", "probed": true,
 *    "reason": "", "calls": [{"input": [1, 64, 56, 56], "output": [...]}]}]}
 * with the Conv2d layers in named_modules() order. A layer has probed false
 * and a reason when it could not be wrapped for recording (for example when
 * its parent reads its weight), and no calls when the forward pass never
 * ran it. The copy's class types stay registered in m's compilation unit
 * (Module::clone puts them there) but lose their methods after the pass.
 */
int cs_probe_conv2d_shapes(cs_module* m, const int64_t* input_shape, int ndim, char** json, char** err);

/* Returns the number of threads of libtorch's intra-op thread pool (at::get_num_threads). */
int cs_num_threads(void);

/* Sets the number of threads of libtorch's intra-op thread pool (at::set_num_threads). */
int cs_set_num_threads(int n, char** err);

#ifdef __cplusplus
}
#endif

#endif
