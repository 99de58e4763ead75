/*
 * linalg.h: low-rank factorization of Conv2d weights, and the tensor
 * helpers it needs, in the C API style of convsplit.h.
 *
 * A Conv2d weight (C_out, C_in, kh, kw) is unfolded into an L x M matrix A
 * whose rows index (split channel, split kernel axis) and whose columns index
 * (other channel, other kernel axis). The split channel is C_out when
 * split_output is nonzero and C_in otherwise; the split kernel axis is kw
 * when split_width is nonzero and kh otherwise. A rank-r factorization keeps
 * U_r, the r leading left singular vectors of A, and the projection U_r^T A,
 * folded back into the weights of two Conv2d layers applied one after the
 * other.
 */
#ifndef CONVSPLIT_LINALG_H
#define CONVSPLIT_LINALG_H

#include "convsplit.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cs_lowrank cs_lowrank;

/* How cs_lowrank_new computes the decomposition. */
enum {
  /* LAPACK routines through the library libtorch loaded when they are found,
   * at::linalg_eigh otherwise. */
  CS_LOWRANK_AUTO = 0,
  /* at::linalg_eigh: all eigenvectors, the slower path. */
  CS_LOWRANK_EIGH = 1
};

/*
 * Unfolds weight (a 4-D float16, float32 or float64 tensor with finite values)
 * in float64 and computes the singular values of the matrix, and what the
 * factors need of its left singular vectors. Both come from the
 * eigen-decomposition of the L x L Gram matrix A A^T. When an eigenvalue is
 * too small to tell from rounding error, the singular values come from an SVD
 * of A instead. method is CS_LOWRANK_AUTO or CS_LOWRANK_EIGH.
 */
int cs_lowrank_new(cs_tensor* weight, int split_output, int split_width, int method,
                   cs_lowrank** out, char** err);
/* Returns 1 when the LAPACK routines of CS_LOWRANK_AUTO were found. */
int cs_lowrank_lapack_available(void);
void cs_lowrank_free(cs_lowrank* f);
/* Writes the matrix size L x M (L <= M is not guaranteed). */
void cs_lowrank_size(cs_lowrank* f, int64_t* rows, int64_t* cols);
/* Copies the L singular values, in descending order, to s (n must be L). */
int cs_lowrank_singular_values(cs_lowrank* f, double* s, int64_t n, char** err);
/*
 * Makes the two Conv2d weights of a rank-r factorization, 1 <= rank <= L.
 * The first layer's weight is (rank, C_in, kh, 1) or (rank, C_in, 1, kw) and
 * the last layer's is (C_out, rank, 1, kw) or (C_out, rank, kh, 1): the layer
 * on the split channel's side (first when the input channels are split, last
 * when the output channels are) stores U_r, and its kernel runs along the split
 * kernel axis. Both weights have the original weight's dtype (values clamped
 * to its finite range), memory format (contiguous or channels-last) and
 * requires_grad flag.
 */
int cs_lowrank_factors(cs_lowrank* f, int64_t rank, cs_tensor** first, cs_tensor** last,
                       char** err);

/* Sets *out to 1 when every element of t is finite (always for integer dtypes). */
int cs_tensor_all_finite(cs_tensor* t, int* out, char** err);
/* Copies t into new storage with the same dtype, memory format and requires_grad flag. */
int cs_tensor_clone(cs_tensor* t, cs_tensor** out, char** err);

#ifdef __cplusplus
}
#endif

#endif
