package torch

/*
#include <stdlib.h>
#include "convsplit.h"
*/
import "C"

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"unsafe"
)

// Module is a handle to a TorchScript module (torch::jit::Module): a model
// loaded from a file, or one of its submodules.
//
// Ownership: each handle keeps its module object alive and must be released
// with Close; a finalizer releases a forgotten handle, but only when the
// garbage collector runs, so long-running programs should call Close.
// A handle from Submodule shares the object with its model: changes through
// either are seen by both, and it stays valid after the model's handle is
// closed. After Replace, a handle taken earlier to a module between the root
// and a replaced layer may refer to an object that has left the tree.
//
// Concurrency: a Module and the handles that share its objects (its
// submodules) may be used by one goroutine at a time. Distinct models,
// including copies made with Clone, may be used from different goroutines
// at once.
type Module struct {
	ptr *C.cs_module
}

func newModule(ptr *C.cs_module) *Module {
	m := &Module{ptr: ptr}
	runtime.SetFinalizer(m, (*Module).Close)
	return m
}

// Close releases the handle. It is safe to call more than once.
func (m *Module) Close() {
	if m == nil || m.ptr == nil {
		return
	}
	C.cs_module_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
}

func (m *Module) check(op string) error {
	if m == nil || m.ptr == nil {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	return nil
}

// Load reads a TorchScript file written by torch.jit.save or Save. Extra
// files in the archive are kept and written back by Save.
func Load(path string) (*Module, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("load %s: not a regular file", path)
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.cs_module
	var msg *C.char
	if C.cs_module_load(cpath, &out, &msg) != 0 {
		return nil, takeError("load", msg)
	}
	return newModule(out), nil
}

// Save writes the module to path as a TorchScript archive that Python's
// torch.jit.load reads. It writes a temporary file in the same folder and
// renames it, so path holds either its old content or the complete new file.
func (m *Module) Save(path string) error {
	if err := m.check("save"); err != nil {
		return err
	}
	defer runtime.KeepAlive(m)
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	tmpName := tmp.Name()
	tmp.Close()
	defer os.Remove(tmpName) // fails harmlessly after the rename

	// A replaced file keeps its permissions, so that saving in place does
	// not make a private model readable to others.
	mode := os.FileMode(0o644)
	if old, err := os.Stat(path); err == nil && old.Mode().IsRegular() {
		mode = old.Mode().Perm()
	}
	if err := os.Chmod(tmpName, mode); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}

	cpath := C.CString(tmpName)
	defer C.free(unsafe.Pointer(cpath))
	var msg *C.char
	if C.cs_module_save(m.ptr, cpath, &msg) != 0 {
		return fmt.Errorf("save %s: %w", path, takeError("save", msg))
	}
	if err := syncFile(tmpName); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := os.Rename(tmpName, path); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	return nil
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Clone returns a deep copy of the module with its own compilation unit and
// class types, so that replacing layers in the copy leaves the original as
// it is and the two may be used from different goroutines. The copy is made
// by saving to memory and loading, so its class names may be mangled
// differently; parameters keep their values and requires_grad flags.
func (m *Module) Clone() (*Module, error) {
	if err := m.check("clone"); err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(m)
	var out *C.cs_module
	var msg *C.char
	if C.cs_module_clone(m.ptr, &out, &msg) != 0 {
		return nil, takeError("clone", msg)
	}
	return newModule(out), nil
}

// Submodule returns the module at a dotted path such as "layer1.0.conv1";
// the empty path is the module itself.
func (m *Module) Submodule(path string) (*Module, error) {
	if err := m.check("submodule"); err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(m)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.cs_module
	var msg *C.char
	if C.cs_module_submodule(m.ptr, cpath, &out, &msg) != 0 {
		return nil, takeError("submodule", msg)
	}
	return newModule(out), nil
}

// ModuleInfo describes one module of a tree.
type ModuleInfo struct {
	// Name is the dotted path from the root; "" for the root.
	Name string `json:"name"`
	// Type is the qualified TorchScript class name, mangling included.
	Type string `json:"type"`
	// Class is the Python class name, as original_name shows it.
	Class string `json:"class"`
	// Conv2d reports whether the module is a torch.nn.Conv2d.
	Conv2d bool `json:"conv2d"`
}

// NamedModules lists the module and all its descendants in the order of
// Python's named_modules().
func (m *Module) NamedModules() ([]ModuleInfo, error) {
	var out []ModuleInfo
	return out, m.jsonCall("named modules", func(text **C.char, msg **C.char) C.int {
		return C.cs_module_named_modules(m.ptr, text, msg)
	}, &out)
}

// MethodNames lists the methods of the module's class type.
func (m *Module) MethodNames() ([]string, error) {
	var out []string
	return out, m.jsonCall("method names", func(text **C.char, msg **C.char) C.int {
		return C.cs_module_method_names(m.ptr, text, msg)
	}, &out)
}

// StateEntry is one entry of a state dict.
type StateEntry struct {
	Name      string  `json:"name"`
	Shape     []int64 `json:"shape"`
	DType     string  `json:"dtype"`
	Parameter bool    `json:"parameter"`
}

// StateDict lists the parameters and buffers in the order of Python's
// state_dict(). Parameters set to None (an absent bias) are not listed.
func (m *Module) StateDict() ([]StateEntry, error) {
	var out []StateEntry
	return out, m.jsonCall("state dict", func(text **C.char, msg **C.char) C.int {
		return C.cs_module_state_dict(m.ptr, text, msg)
	}, &out)
}

func (m *Module) jsonCall(op string, call func(text **C.char, msg **C.char) C.int, v any) error {
	if err := m.check(op); err != nil {
		return err
	}
	defer runtime.KeepAlive(m)
	var text, msg *C.char
	if call(&text, &msg) != 0 {
		return takeError(op, msg)
	}
	return takeJSON(op, text, v)
}

// Train sets the training flag of the module and all its descendants.
func (m *Module) Train(on bool) error {
	if err := m.check("train"); err != nil {
		return err
	}
	defer runtime.KeepAlive(m)
	flag := C.int(0)
	if on {
		flag = 1
	}
	var msg *C.char
	if C.cs_module_train(m.ptr, flag, &msg) != 0 {
		return takeError("train", msg)
	}
	return nil
}

// Eval is Train(false).
func (m *Module) Eval() error { return m.Train(false) }

// IsTraining returns the module's training flag.
func (m *Module) IsTraining() (bool, error) {
	if err := m.check("is training"); err != nil {
		return false, err
	}
	defer runtime.KeepAlive(m)
	var out C.int
	var msg *C.char
	if C.cs_module_is_training(m.ptr, &out, &msg) != 0 {
		return false, takeError("is training", msg)
	}
	return out != 0, nil
}

// SameObject reports whether two handles refer to the same module object.
func (m *Module) SameObject(other *Module) bool {
	if m.check("") != nil || other.check("") != nil {
		return false
	}
	defer runtime.KeepAlive(m)
	defer runtime.KeepAlive(other)
	return C.cs_module_same_object(m.ptr, other.ptr) != 0
}

// Parameter returns the module's own parameter or buffer called name (not a
// dotted path: use Submodule first). The tensor shares storage with the
// module.
func (m *Module) Parameter(name string) (*Tensor, error) {
	if err := m.check("parameter"); err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(m)
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var out *C.cs_tensor
	var msg *C.char
	if C.cs_module_parameter(m.ptr, cname, &out, &msg) != 0 {
		return nil, takeError("parameter "+name, msg)
	}
	return newTensor(out), nil
}

// SetParameter makes the module's parameter called name refer to t, so that
// the module shares the tensor with every other holder of t.
func (m *Module) SetParameter(name string, t *Tensor) error {
	if err := m.check("set parameter"); err != nil {
		return err
	}
	if t == nil || t.ptr == nil {
		return fmt.Errorf("set parameter %s: %w", name, ErrClosed)
	}
	defer runtime.KeepAlive(m)
	defer runtime.KeepAlive(t)
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var msg *C.char
	if C.cs_module_set_parameter(m.ptr, cname, t.ptr, &msg) != 0 {
		return takeError("set parameter "+name, msg)
	}
	return nil
}

// Forward runs the module's forward method without recording gradients and
// returns its outputs: one tensor, or the tensors of a returned tuple or
// list in order. The caller closes the returned tensors.
func (m *Module) Forward(inputs ...*Tensor) ([]*Tensor, error) {
	return m.runForward("forward", inputs, func(argv **C.cs_tensor, n C.int, outs ***C.cs_tensor, count *C.int, msg **C.char) C.int {
		return C.cs_module_forward(m.ptr, argv, n, outs, count, msg)
	})
}

// forwardCall is one of the shim's forward entry points.
type forwardCall func(argv **C.cs_tensor, n C.int, outs ***C.cs_tensor, count *C.int, msg **C.char) C.int

// runForward passes the inputs to a shim forward call and takes ownership
// of the output tensors it returns.
func (m *Module) runForward(op string, inputs []*Tensor, call forwardCall) ([]*Tensor, error) {
	if err := m.check(op); err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(m)
	defer runtime.KeepAlive(inputs)
	args := make([]*C.cs_tensor, len(inputs))
	for i, t := range inputs {
		if t == nil || t.ptr == nil {
			return nil, fmt.Errorf("%s: input %d: %w", op, i, ErrClosed)
		}
		args[i] = t.ptr
	}
	var argv **C.cs_tensor
	if len(args) > 0 {
		argv = &args[0]
	}
	var outs **C.cs_tensor
	var n C.int
	var msg *C.char
	if call(argv, C.int(len(args)), &outs, &n, &msg) != 0 {
		return nil, takeError(op, msg)
	}
	return takeHandles(outs, int(n)), nil
}
