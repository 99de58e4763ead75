package torch

/*
#include "convsplit.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// DType is a tensor element type, numbered as libtorch's c10::ScalarType.
type DType int

// The element types convsplit reads and writes.
const (
	Uint8    DType = 0
	Int8     DType = 1
	Int16    DType = 2
	Int32    DType = 3
	Int64    DType = 4
	Float16  DType = 5
	Float32  DType = 6
	Float64  DType = 7
	Bool     DType = 11
	BFloat16 DType = 15
)

var dtypeNames = map[DType]string{
	Uint8: "uint8", Int8: "int8", Int16: "int16", Int32: "int32", Int64: "int64",
	Float16: "float16", Float32: "float32", Float64: "float64", Bool: "bool", BFloat16: "bfloat16",
}

var dtypeSizes = map[DType]int{
	Uint8: 1, Int8: 1, Int16: 2, Int32: 4, Int64: 8, Float16: 2, Float32: 4, Float64: 8, Bool: 1, BFloat16: 2,
}

// String returns the name Python's torch uses without the "torch." prefix.
func (d DType) String() string {
	if name, ok := dtypeNames[d]; ok {
		return name
	}
	return fmt.Sprintf("dtype(%d)", int(d))
}

// ParseDType returns the DType of a name as String writes it, or as
// libtorch's c10::toString writes it ("Float", "Double", "Half").
func ParseDType(name string) (DType, error) {
	for d, n := range dtypeNames {
		if n == name {
			return d, nil
		}
	}
	switch name {
	case "Float":
		return Float32, nil
	case "Double":
		return Float64, nil
	case "Half":
		return Float16, nil
	case "BFloat16":
		return BFloat16, nil
	case "Long":
		return Int64, nil
	case "Int":
		return Int32, nil
	case "Bool":
		return Bool, nil
	case "Byte":
		return Uint8, nil
	}
	return 0, fmt.Errorf("unknown dtype %q", name)
}

// Tensor is a handle to a libtorch tensor. It owns a reference to the
// tensor's storage, which may be shared with a module's parameter. Close
// releases the reference; a finalizer does so too if Close is never called.
// A Tensor may be read from several goroutines at once.
type Tensor struct {
	ptr *C.cs_tensor
}

func newTensor(ptr *C.cs_tensor) *Tensor {
	t := &Tensor{ptr: ptr}
	runtime.SetFinalizer(t, (*Tensor).Close)
	return t
}

func (t *Tensor) check(op string) error {
	if t == nil || t.ptr == nil {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	return nil
}

// Close releases the tensor handle. It is safe to call more than once.
func (t *Tensor) Close() {
	if t == nil || t.ptr == nil {
		return
	}
	C.cs_tensor_free(t.ptr)
	t.ptr = nil
	runtime.SetFinalizer(t, nil)
}

// FromFloat32 copies data into a new float32 tensor of the given shape.
func FromFloat32(data []float32, shape ...int64) (*Tensor, error) {
	return fromData(unsafe.Pointer(unsafe.SliceData(data)), len(data), Float32, shape)
}

// FromFloat64 copies data into a new float64 tensor of the given shape.
func FromFloat64(data []float64, shape ...int64) (*Tensor, error) {
	return fromData(unsafe.Pointer(unsafe.SliceData(data)), len(data), Float64, shape)
}

func fromData(data unsafe.Pointer, n int, dtype DType, shape []int64) (*Tensor, error) {
	want := int64(1)
	for _, s := range shape {
		if s < 0 {
			return nil, fmt.Errorf("tensor shape %v has a negative size", shape)
		}
		want *= s
	}
	if want != int64(n) {
		return nil, fmt.Errorf("tensor shape %v needs %d values, got %d", shape, want, n)
	}
	var dims *C.int64_t
	if len(shape) > 0 {
		dims = (*C.int64_t)(unsafe.Pointer(&shape[0]))
	}
	var out *C.cs_tensor
	var msg *C.char
	if C.cs_tensor_from_data(data, C.int(dtype), dims, C.int(len(shape)), &out, &msg) != 0 {
		return nil, takeError("tensor", msg)
	}
	return newTensor(out), nil
}

// DType returns the tensor's element type. Methods without an error result
// return zero values on a closed tensor.
func (t *Tensor) DType() DType {
	if t == nil || t.ptr == nil {
		return 0
	}
	defer runtime.KeepAlive(t)
	return DType(C.cs_tensor_dtype(t.ptr))
}

// Shape returns the tensor's sizes.
func (t *Tensor) Shape() []int64 {
	if t == nil || t.ptr == nil {
		return nil
	}
	defer runtime.KeepAlive(t)
	shape := make([]int64, int(C.cs_tensor_ndim(t.ptr)))
	if len(shape) > 0 {
		C.cs_tensor_shape(t.ptr, (*C.int64_t)(unsafe.Pointer(&shape[0])))
	}
	return shape
}

// Numel returns the number of elements.
func (t *Tensor) Numel() int64 {
	n := int64(1)
	for _, s := range t.Shape() {
		n *= s
	}
	return n
}

// ChannelsLast reports whether a 4-D tensor is stored channels-last.
func (t *Tensor) ChannelsLast() bool {
	if t == nil || t.ptr == nil {
		return false
	}
	defer runtime.KeepAlive(t)
	return C.cs_tensor_channels_last(t.ptr) != 0
}

// RequiresGrad reports whether autograd records operations on the tensor.
func (t *Tensor) RequiresGrad() bool {
	if t == nil || t.ptr == nil {
		return false
	}
	defer runtime.KeepAlive(t)
	return C.cs_tensor_requires_grad(t.ptr) != 0
}

// Same reports whether two handles refer to the same tensor, as parameters
// shared between layers do.
func (t *Tensor) Same(other *Tensor) bool {
	if t == nil || t.ptr == nil || other == nil || other.ptr == nil {
		return false
	}
	defer runtime.KeepAlive(t)
	defer runtime.KeepAlive(other)
	return C.cs_tensor_same(t.ptr, other.ptr) != 0
}

// Bytes returns a copy of the tensor's elements in row-major (contiguous)
// order, in its own dtype and the machine's byte order.
func (t *Tensor) Bytes() ([]byte, error) {
	if t == nil || t.ptr == nil {
		return nil, ErrClosed
	}
	defer runtime.KeepAlive(t)
	size, ok := dtypeSizes[t.DType()]
	if !ok {
		return nil, fmt.Errorf("tensor of dtype %v cannot be copied out", t.DType())
	}
	buf := make([]byte, int(t.Numel())*size)
	var msg *C.char
	var data unsafe.Pointer
	if len(buf) > 0 {
		data = unsafe.Pointer(&buf[0])
	}
	if C.cs_tensor_copy_data(t.ptr, data, C.size_t(len(buf)), &msg) != 0 {
		return nil, takeError("tensor data", msg)
	}
	return buf, nil
}

// Float32s returns a copy of a float32 tensor's elements in row-major order.
func (t *Tensor) Float32s() ([]float32, error) {
	if t == nil || t.ptr == nil {
		return nil, ErrClosed
	}
	if t.DType() != Float32 {
		return nil, fmt.Errorf("tensor has dtype %v, not float32", t.DType())
	}
	raw, err := t.Bytes()
	if err != nil {
		return nil, err
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(unsafe.SliceData(raw))), len(raw)/4), nil
}

// Float64s returns a copy of a float64 tensor's elements in row-major order.
func (t *Tensor) Float64s() ([]float64, error) {
	if t == nil || t.ptr == nil {
		return nil, ErrClosed
	}
	if t.DType() != Float64 {
		return nil, fmt.Errorf("tensor has dtype %v, not float64", t.DType())
	}
	raw, err := t.Bytes()
	if err != nil {
		return nil, err
	}
	return unsafe.Slice((*float64)(unsafe.Pointer(unsafe.SliceData(raw))), len(raw)/8), nil
}
