package torch

/*
#include "train.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"
)

// ErrInvalidOptions is wrapped by errors about invalid optimizer options.
var ErrInvalidOptions = errors.New("invalid options")

// FromInt64 copies data into a new int64 tensor of the given shape, such as
// the class indices CrossEntropyLoss takes.
func FromInt64(data []int64, shape ...int64) (*Tensor, error) {
	return fromData(unsafe.Pointer(unsafe.SliceData(data)), len(data), Int64, shape)
}

// ForwardTrain runs the module's forward method with autograd recording, so
// that a loss computed from the outputs can be passed to Backward. It does
// not change the training flag: call Train(true) first for layers such as
// dropout and batch norm to behave as in training. The outputs hold the
// autograd graph until they (and every tensor computed from them) are
// closed.
func (m *Module) ForwardTrain(inputs ...*Tensor) ([]*Tensor, error) {
	return m.runForward("forward train", inputs, func(argv **C.cs_tensor, n C.int, outs ***C.cs_tensor, count *C.int, msg **C.char) C.int {
		return C.cs_module_forward_train(m.ptr, argv, n, outs, count, msg)
	})
}

// NamedTensor is a tensor with its dotted name, such as a parameter
// "layer1.0.conv1.weight".
type NamedTensor struct {
	Name   string
	Tensor *Tensor
}

// Parameters returns the parameters that require gradients, in the order of
// Python's named_parameters(). A parameter shared by several layers is
// listed once, under its first name, so that an optimizer updates it once.
// The tensors are the parameters themselves: an optimizer step changes the
// module. The caller closes them.
func (m *Module) Parameters() ([]NamedTensor, error) {
	keys, tensors, err := m.namedTensors("parameters", func(names **C.char, handles ***C.cs_tensor, n *C.int, msg **C.char) C.int {
		return C.cs_module_trainable_parameters(m.ptr, names, handles, n, msg)
	})
	if err != nil {
		return nil, err
	}
	out := make([]NamedTensor, len(keys))
	for i, key := range keys {
		out[i] = NamedTensor{Name: key, Tensor: tensors[i]}
	}
	return out, nil
}

// SGDOptions are the settings of stochastic gradient descent, with the
// meanings of torch.optim.SGD's arguments.
type SGDOptions struct {
	// LR is the learning rate; it must be positive.
	LR float64
	// Momentum is the momentum factor; 0 turns momentum off.
	Momentum float64
	// Dampening scales down the gradient added to the momentum buffer.
	Dampening float64
	// WeightDecay is the L2 penalty added to each gradient.
	WeightDecay float64
	// Nesterov turns on Nesterov momentum; it needs a positive Momentum and
	// zero Dampening.
	Nesterov bool
}

func (o SGDOptions) check() error {
	switch {
	case !(o.LR > 0):
		return fmt.Errorf("sgd: %w: learning rate %v, want a positive value", ErrInvalidOptions, o.LR)
	case !(o.Momentum >= 0):
		return fmt.Errorf("sgd: %w: momentum %v, want 0 or more", ErrInvalidOptions, o.Momentum)
	case !(o.Dampening >= 0):
		return fmt.Errorf("sgd: %w: dampening %v, want 0 or more", ErrInvalidOptions, o.Dampening)
	case !(o.WeightDecay >= 0):
		return fmt.Errorf("sgd: %w: weight decay %v, want 0 or more", ErrInvalidOptions, o.WeightDecay)
	case o.Nesterov && (o.Momentum == 0 || o.Dampening != 0):
		return fmt.Errorf("sgd: %w: Nesterov momentum needs a positive momentum and zero dampening", ErrInvalidOptions)
	}
	return nil
}

// SGD is libtorch's stochastic gradient descent optimizer
// (torch::optim::SGD) over a fixed list of parameters. Close releases it; it
// may be used by one goroutine at a time, the one that runs the module.
type SGD struct {
	ptr *C.cs_sgd
}

// NewSGD returns an optimizer that updates the given parameters, usually
// those Parameters returned. Each must be a leaf tensor that requires
// gradients, as the parameters of a loaded module are. The optimizer keeps
// its own references to the parameters, so their handles may be closed.
func NewSGD(params []NamedTensor, opts SGDOptions) (*SGD, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	if len(params) == 0 {
		return nil, fmt.Errorf("sgd: %w: no parameters to optimize", ErrInvalidOptions)
	}

	handles := make([]*C.cs_tensor, len(params))
	names := make([]string, len(params))
	for i, p := range params {
		if p.Tensor == nil || p.Tensor.ptr == nil {
			return nil, fmt.Errorf("sgd: parameter %s: %w", p.Name, ErrClosed)
		}
		handles[i] = p.Tensor.ptr
		names[i] = p.Name
	}
	cnames, free := cStrings(names)
	defer free()

	nesterov := C.int(0)
	if opts.Nesterov {
		nesterov = 1
	}
	var out *C.cs_sgd
	var msg *C.char
	if C.cs_sgd_new(&handles[0], &cnames[0], C.int(len(handles)), C.double(opts.LR), C.double(opts.Momentum),
		C.double(opts.Dampening), C.double(opts.WeightDecay), nesterov, &out, &msg) != 0 {
		return nil, takeError("sgd", msg)
	}
	runtime.KeepAlive(params)
	o := &SGD{ptr: out}
	runtime.SetFinalizer(o, (*SGD).Close)
	return o, nil
}

// Close releases the optimizer and its momentum buffers. The parameters
// stay with their module. It is safe to call more than once.
func (o *SGD) Close() {
	if o == nil || o.ptr == nil {
		return
	}
	C.cs_sgd_free(o.ptr)
	o.ptr = nil
	runtime.SetFinalizer(o, nil)
}

// ZeroGrad sets the gradients of the optimizer's parameters to zero, so
// that the next Backward does not add to the last one's.
func (o *SGD) ZeroGrad() error {
	if o == nil || o.ptr == nil {
		return fmt.Errorf("sgd zero grad: %w", ErrClosed)
	}
	defer runtime.KeepAlive(o)
	var msg *C.char
	if C.cs_sgd_zero_grad(o.ptr, &msg) != 0 {
		return takeError("sgd zero grad", msg)
	}
	return nil
}

// Step updates the parameters in place from their gradients.
func (o *SGD) Step() error {
	if o == nil || o.ptr == nil {
		return fmt.Errorf("sgd step: %w", ErrClosed)
	}
	defer runtime.KeepAlive(o)
	var msg *C.char
	if C.cs_sgd_step(o.ptr, &msg) != 0 {
		return takeError("sgd step", msg)
	}
	return nil
}

// CrossEntropyLoss returns the mean cross-entropy between logits of shape
// (N, C) or (N, C, d1, ...) and target, which holds int64 class indices of
// shape (N) or (N, d1, ...), or class probabilities shaped like logits. It
// is torch.nn.functional.cross_entropy with its defaults.
func CrossEntropyLoss(logits, target *Tensor) (*Tensor, error) {
	return loss("cross entropy", logits, target, func(a, b *C.cs_tensor, out **C.cs_tensor, msg **C.char) C.int {
		return C.cs_cross_entropy(a, b, out, msg)
	})
}

// MSELoss returns the mean squared error between input and a target of the
// same shape, as torch.nn.functional.mse_loss does.
func MSELoss(input, target *Tensor) (*Tensor, error) {
	return loss("mse loss", input, target, func(a, b *C.cs_tensor, out **C.cs_tensor, msg **C.char) C.int {
		return C.cs_mse_loss(a, b, out, msg)
	})
}

func loss(op string, input, target *Tensor, call func(a, b *C.cs_tensor, out **C.cs_tensor, msg **C.char) C.int) (*Tensor, error) {
	if input == nil || input.ptr == nil || target == nil || target.ptr == nil {
		return nil, fmt.Errorf("%s: %w", op, ErrClosed)
	}
	defer runtime.KeepAlive(input)
	defer runtime.KeepAlive(target)
	var out *C.cs_tensor
	var msg *C.char
	if call(input.ptr, target.ptr, &out, &msg) != 0 {
		return nil, takeError(op, msg)
	}
	return newTensor(out), nil
}

// Backward computes the gradient of a one-element tensor, such as a loss,
// with respect to the parameters it was computed from, and adds it to their
// gradients.
func (t *Tensor) Backward() error {
	if t == nil || t.ptr == nil {
		return fmt.Errorf("backward: %w", ErrClosed)
	}
	defer runtime.KeepAlive(t)
	var msg *C.char
	if C.cs_tensor_backward(t.ptr, &msg) != 0 {
		return takeError("backward", msg)
	}
	return nil
}

// Item returns the value of a one-element tensor as a float64.
func (t *Tensor) Item() (float64, error) {
	if t == nil || t.ptr == nil {
		return 0, fmt.Errorf("item: %w", ErrClosed)
	}
	defer runtime.KeepAlive(t)
	var v C.double
	var msg *C.char
	if C.cs_tensor_item(t.ptr, &v, &msg) != 0 {
		return 0, takeError("item", msg)
	}
	return float64(v), nil
}

// Grad returns the tensor's gradient, or nil when it has none (before the
// first Backward). The gradient shares storage with the one libtorch keeps.
func (t *Tensor) Grad() (*Tensor, error) {
	if t == nil || t.ptr == nil {
		return nil, fmt.Errorf("grad: %w", ErrClosed)
	}
	defer runtime.KeepAlive(t)
	var out *C.cs_tensor
	var msg *C.char
	if C.cs_tensor_grad(t.ptr, &out, &msg) != 0 {
		return nil, takeError("grad", msg)
	}
	if out == nil {
		return nil, nil
	}
	return newTensor(out), nil
}
