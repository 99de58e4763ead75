package torch

/*
#cgo CFLAGS: -I${SRCDIR}/../csrc
#include <stdlib.h>
#include "linalg.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// ConvLowRank is the singular value decomposition of a Conv2d weight
// (C_out, C_in, kh, kw) unfolded into an L x M matrix A. From it, Factors
// makes the weights of two Conv2d layers that together apply a rank-r
// approximation of the original layer.
//
// The rows of A index (split channel, split kernel axis) and its columns
// (other channel, other kernel axis); ConvSplitAxes chooses the split axes.
// The singular values and vectors come from the eigen-decomposition of the
// Gram matrix A A^T in float64. The shim reduces A A^T to tridiagonal form
// with the LAPACK routines of the library libtorch loaded, takes all its
// eigenvalues, and computes only the r eigenvectors that Factors needs. When
// those routines are missing it falls back to torch.linalg.eigh, which
// computes all L eigenvectors. Eigenvalues below the rounding level of the
// largest one are recomputed with an SVD.
//
// A ConvLowRank stores A and an L x L matrix in float64, so it takes about
// 8 (L M + L L) bytes: Close it as soon as the factors are made. It may be
// used by one goroutine at a time.
type ConvLowRank struct {
	ptr        *C.cs_lowrank
	rows, cols int
}

// ConvSplitAxes chooses the axes of a Conv2d weight that index the rows of
// the unfolded matrix.
type ConvSplitAxes struct {
	// Output splits the output channels (the rows index C_out); otherwise
	// the input channels.
	Output bool
	// Width splits the kernel width (the rows index kw); otherwise the
	// kernel height.
	Width bool
}

// NewConvLowRank unfolds a Conv2d weight, which must be a 4-D float16,
// float32 or float64 tensor with finite values, and computes its singular
// values and left singular vectors.
func NewConvLowRank(weight *Tensor, axes ConvSplitAxes) (*ConvLowRank, error) {
	return newConvLowRank(weight, axes, lowRankAuto)
}

// lapackAvailable reports whether the shim found the LAPACK routines of its
// faster path in the libraries libtorch loaded.
func lapackAvailable() bool {
	return C.cs_lowrank_lapack_available() != 0
}

// lowRankMethod chooses how cs_lowrank_new computes the decomposition.
type lowRankMethod int

const (
	// lowRankAuto uses the LAPACK routines when the shim finds them.
	lowRankAuto lowRankMethod = C.CS_LOWRANK_AUTO
	// lowRankEigh uses torch.linalg.eigh.
	lowRankEigh lowRankMethod = C.CS_LOWRANK_EIGH
)

// newConvLowRank is NewConvLowRank with a choice of method, which tests use
// to compare the two paths.
func newConvLowRank(weight *Tensor, axes ConvSplitAxes, method lowRankMethod) (*ConvLowRank, error) {
	if weight == nil || weight.ptr == nil {
		return nil, fmt.Errorf("low-rank factorization: %w", ErrClosed)
	}
	defer runtime.KeepAlive(weight)
	var out *C.cs_lowrank
	var msg *C.char
	if C.cs_lowrank_new(weight.ptr, cBool(axes.Output), cBool(axes.Width), C.int(method), &out, &msg) != 0 {
		return nil, takeError("low-rank factorization", msg)
	}
	var rows, cols C.int64_t
	C.cs_lowrank_size(out, &rows, &cols)
	f := &ConvLowRank{ptr: out, rows: int(rows), cols: int(cols)}
	runtime.SetFinalizer(f, (*ConvLowRank).Close)
	return f, nil
}

// Close releases the matrix and the vectors. It is safe to call more than
// once. Tensors made by Factors stay valid.
func (f *ConvLowRank) Close() {
	if f == nil || f.ptr == nil {
		return
	}
	C.cs_lowrank_free(f.ptr)
	f.ptr = nil
	runtime.SetFinalizer(f, nil)
}

// Size returns the number of rows L and columns M of the unfolded matrix.
func (f *ConvLowRank) Size() (rows, cols int) {
	return f.rows, f.cols
}

// SingularValues returns the L singular values of the unfolded matrix in
// descending order.
func (f *ConvLowRank) SingularValues() ([]float64, error) {
	if f == nil || f.ptr == nil {
		return nil, fmt.Errorf("singular values: %w", ErrClosed)
	}
	defer runtime.KeepAlive(f)
	values := make([]float64, f.rows)
	var msg *C.char
	if C.cs_lowrank_singular_values(f.ptr, (*C.double)(unsafe.Pointer(unsafe.SliceData(values))), C.int64_t(len(values)), &msg) != 0 {
		return nil, takeError("singular values", msg)
	}
	return values, nil
}

// Factors returns the weights of the two Conv2d layers of a rank-r
// factorization, 1 <= rank <= L, in the order they are applied.
//
// The layer on the split channel's side (first when the input channels are
// split, last when the output channels are) stores U_r, the rank leading left
// singular vectors, with its kernel along the split kernel axis. The other
// stores the projection U_r^T A. Together they apply U_r U_r^T A, the best
// rank-r approximation of A. Shapes are (rank, C_in, kh, 1) or
// (rank, C_in, 1, kw) for first, and (C_out, rank, 1, kw) or
// (C_out, rank, kh, 1) for last. Both weights have the original weight's
// dtype, with values clamped to its finite range, its memory format and its
// requires_grad flag.
func (f *ConvLowRank) Factors(rank int) (first, last *Tensor, err error) {
	if f == nil || f.ptr == nil {
		return nil, nil, fmt.Errorf("low-rank factors: %w", ErrClosed)
	}
	defer runtime.KeepAlive(f)
	var a, b *C.cs_tensor
	var msg *C.char
	if C.cs_lowrank_factors(f.ptr, C.int64_t(rank), &a, &b, &msg) != 0 {
		return nil, nil, takeError("low-rank factors", msg)
	}
	return newTensor(a), newTensor(b), nil
}

// AllFinite reports whether no element of the tensor is NaN or infinite.
// Tensors of integer dtypes are always finite.
func (t *Tensor) AllFinite() (bool, error) {
	if t == nil || t.ptr == nil {
		return false, fmt.Errorf("all finite: %w", ErrClosed)
	}
	defer runtime.KeepAlive(t)
	var out C.int
	var msg *C.char
	if C.cs_tensor_all_finite(t.ptr, &out, &msg) != 0 {
		return false, takeError("all finite", msg)
	}
	return out != 0, nil
}

// Clone returns a copy of the tensor in new storage, with the same dtype,
// memory format and requires_grad flag.
func (t *Tensor) Clone() (*Tensor, error) {
	if t == nil || t.ptr == nil {
		return nil, fmt.Errorf("clone tensor: %w", ErrClosed)
	}
	defer runtime.KeepAlive(t)
	var out *C.cs_tensor
	var msg *C.char
	if C.cs_tensor_clone(t.ptr, &out, &msg) != 0 {
		return nil, takeError("clone tensor", msg)
	}
	return newTensor(out), nil
}
