package torch

/*
#include "inspect.h"
*/
import "C"

import (
	"fmt"
	"runtime"
)

// Conv2dCall is one call of a Conv2d layer during a forward pass.
type Conv2dCall struct {
	// Input and Output are the sizes of the layer's input and output tensors.
	Input  []int64 `json:"input"`
	Output []int64 `json:"output"`
}

// Conv2dShapes is what ProbeConv2dShapes recorded for one Conv2d layer.
type Conv2dShapes struct {
	// Name is the layer's dotted path; "" when the model itself is the Conv2d.
	Name string `json:"name"`
	// Probed is false when the layer could not be wrapped for recording,
	// for example because its parent reads its weight; Reason then gives the cause.
	Probed bool   `json:"probed"`
	Reason string `json:"reason"`
	// Calls lists the layer's calls in order. It is empty for a layer that
	// the forward pass never ran, or that was not probed.
	Calls []Conv2dCall `json:"calls"`
}

// Conv2dProbe is the result of ProbeConv2dShapes.
type Conv2dProbe struct {
	// DType is the dtype of the input tensor, in libtorch's spelling ("Float").
	DType string `json:"dtype"`
	// Layers lists every Conv2d of the model in the order of named_modules().
	Layers []Conv2dShapes `json:"layers"`
}

// ProbeConv2dShapes runs one forward pass on a zero input of the given sizes
// and records the sizes of the input and output of every call of every
// Conv2d layer. The input's dtype is that of the first Conv2d's weight, or
// float32 when the model has no Conv2d or the pass fails with that dtype
// (a model that casts its float32 input for a float64 layer itself).
//
// The pass runs in eval mode without gradients on a copy of the model that
// has its own class types but shares the parameter tensors, so the model
// itself keeps its structure, training flag and parameters. The copy's
// class types stay registered in the model's compilation unit until the
// model is released, but their methods are removed after the pass, so
// repeated calls keep only a few kilobytes each.
func (m *Module) ProbeConv2dShapes(inputShape ...int64) (Conv2dProbe, error) {
	var out Conv2dProbe
	if err := m.check("probe conv2d shapes"); err != nil {
		return out, err
	}
	if len(inputShape) == 0 {
		return out, fmt.Errorf("probe conv2d shapes: the input shape is empty")
	}
	defer runtime.KeepAlive(m)
	shape := make([]C.int64_t, len(inputShape))
	for i, s := range inputShape {
		shape[i] = C.int64_t(s)
	}
	var text, msg *C.char
	if C.cs_probe_conv2d_shapes(m.ptr, &shape[0], C.int(len(shape)), &text, &msg) != 0 {
		return out, takeError("probe conv2d shapes", msg)
	}
	return out, takeJSON("probe conv2d shapes", text, &out)
}

// NumThreads returns the number of threads libtorch uses for intra-op
// parallelism (at::get_num_threads).
func NumThreads() int {
	return int(C.cs_num_threads())
}

// SetNumThreads sets the number of threads libtorch uses for intra-op
// parallelism (at::set_num_threads). n must be positive.
func SetNumThreads(n int) error {
	var msg *C.char
	if C.cs_set_num_threads(C.int(n), &msg) != 0 {
		return takeError("set num threads", msg)
	}
	return nil
}
