package torch

import "errors"

// ErrTorch is wrapped by every error that libtorch reported.
var ErrTorch = errors.New("libtorch error")

// ErrClosed is returned by methods called on a handle after Close.
var ErrClosed = errors.New("handle is closed")

// Error is an error reported by libtorch through the shim.
type Error struct {
	// Op is the operation that failed, such as "load" or "replace".
	Op string
	// Message is libtorch's message without its C++ backtrace.
	Message string
}

// Error returns the operation and libtorch's message.
func (e *Error) Error() string { return e.Op + ": " + e.Message }

// Unwrap makes errors.Is(err, ErrTorch) true.
func (e *Error) Unwrap() error { return ErrTorch }
