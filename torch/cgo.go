package torch

/*
#cgo CFLAGS: -I${SRCDIR}/../csrc
#cgo LDFLAGS: -L${SRCDIR}/../build -lshim -ltorch -ltorch_cpu -lc10 -lstdc++ -lm
#include <stdlib.h>
#include "convsplit.h"
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"runtime"
	"unsafe"
)

// takeError turns the shim's error message into a Go error wrapping ErrTorch
// and releases the message.
func takeError(op string, msg *C.char) error {
	if msg == nil {
		return fmt.Errorf("%s: %w", op, ErrTorch)
	}
	defer C.cs_free(unsafe.Pointer(msg))
	return &Error{Op: op, Message: C.GoString(msg)}
}

// takeJSON decodes JSON text returned by the shim into v and releases it.
func takeJSON(op string, text *C.char, v any) error {
	defer C.cs_free(unsafe.Pointer(text))
	if err := json.Unmarshal([]byte(C.GoString(text)), v); err != nil {
		return fmt.Errorf("%s: decoding the shim's reply: %w", op, err)
	}
	return nil
}

// cStrings copies strings into C memory; free releases them.
func cStrings(values []string) (ptrs []*C.char, free func()) {
	ptrs = make([]*C.char, len(values))
	for i, v := range values {
		ptrs[i] = C.CString(v)
	}
	return ptrs, func() {
		for _, p := range ptrs {
			C.free(unsafe.Pointer(p))
		}
	}
}

// ManualSeed seeds libtorch's default CPU generator, as Python's
// torch.manual_seed does, so that draws after the same seed are the same
// numbers in Go and in Python.
func ManualSeed(seed uint64) {
	C.cs_manual_seed(C.uint64_t(seed))
}

// GeneratorState is a saved state of libtorch's default CPU generator.
type GeneratorState struct {
	state *Tensor
}

// SaveGeneratorState returns the default CPU generator's state, so that a
// call that draws random numbers and then fails can undo its draws.
func SaveGeneratorState() *GeneratorState {
	var out *C.cs_tensor
	C.cs_generator_state(&out)
	return &GeneratorState{state: newTensor(out)}
}

// Restore puts the generator back into the saved state.
func (g *GeneratorState) Restore() {
	defer runtime.KeepAlive(g)
	C.cs_generator_set_state(g.state.ptr)
}

// Close releases the saved state.
func (g *GeneratorState) Close() { g.state.Close() }
