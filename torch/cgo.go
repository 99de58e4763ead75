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

// GeneratorState is a saved copy of libtorch's default CPU generator.
type GeneratorState struct {
	saved *C.cs_generator
}

// SaveGeneratorState copies the default CPU generator, so that a call that
// draws random numbers and then fails can undo its draws.
func SaveGeneratorState() (*GeneratorState, error) {
	var saved *C.cs_generator
	var msg *C.char
	if C.cs_generator_save(&saved, &msg) != 0 {
		return nil, takeError("saving the generator", msg)
	}
	g := &GeneratorState{saved: saved}
	runtime.SetFinalizer(g, (*GeneratorState).Close)
	return g, nil
}

// Restore puts the generator back into the saved state. It does nothing
// after Close.
func (g *GeneratorState) Restore() error {
	if g == nil || g.saved == nil {
		return nil
	}
	var msg *C.char
	if C.cs_generator_restore(g.saved, &msg) != 0 {
		return takeError("restoring the generator", msg)
	}
	return nil
}

// Close releases the saved copy. It is safe to call more than once.
func (g *GeneratorState) Close() {
	if g == nil || g.saved == nil {
		return
	}
	C.cs_generator_free(g.saved)
	g.saved = nil
	runtime.SetFinalizer(g, nil)
}
