package torch

/*
#include <stdlib.h>
#include "state.h"
*/
import "C"

import (
	"archive/zip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"
)

// ErrStateDictMismatch is wrapped by the error of a strict LoadStateDict
// whose state dict does not fit the module.
var ErrStateDictMismatch = errors.New("state dict does not match the module")

// ErrNotStateDictFile is wrapped by errors about files that are not a state
// dict saved by Python's torch.save in its zip format.
var ErrNotStateDictFile = errors.New("not a torch.save state dict file")

// StateDict is an ordered map from keys such as "layer1.0.conv1.weight" to
// tensors, like the OrderedDict of Python's state_dict(). It owns its
// tensors: Close releases them, and the handles Get returns stay valid
// until then. A StateDict may be used by one goroutine at a time.
type StateDict struct {
	keys    []string
	tensors map[string]*Tensor
}

// NewStateDict returns an empty state dict.
func NewStateDict() *StateDict {
	return &StateDict{tensors: map[string]*Tensor{}}
}

// Keys returns the keys in order.
func (sd *StateDict) Keys() []string { return append([]string(nil), sd.keys...) }

// Len returns the number of entries.
func (sd *StateDict) Len() int { return len(sd.keys) }

// Get returns the tensor stored under key. The state dict keeps owning it.
func (sd *StateDict) Get(key string) (*Tensor, bool) {
	t, ok := sd.tensors[key]
	return t, ok
}

// Set stores t under key and takes ownership of it. A new key goes last; an
// existing key keeps its place, and its old tensor is closed.
func (sd *StateDict) Set(key string, t *Tensor) {
	old, ok := sd.tensors[key]
	if !ok {
		sd.keys = append(sd.keys, key)
	} else if old != t {
		old.Close()
	}
	sd.tensors[key] = t
}

// Delete removes key and closes its tensor; a missing key is ignored.
func (sd *StateDict) Delete(key string) {
	t, ok := sd.tensors[key]
	if !ok {
		return
	}
	t.Close()
	delete(sd.tensors, key)
	for i, k := range sd.keys {
		if k == key {
			sd.keys = append(sd.keys[:i], sd.keys[i+1:]...)
			break
		}
	}
}

// Close releases every tensor. It is safe to call more than once.
func (sd *StateDict) Close() {
	if sd == nil {
		return
	}
	for _, t := range sd.tensors {
		t.Close()
	}
	sd.keys = nil
	sd.tensors = map[string]*Tensor{}
}

// StateDictOf returns the module's state dict: its parameters and buffers
// under their dotted names in the order of Python's state_dict(). As in
// Python, the tensors are detached from autograd but share storage with the
// module, so later changes to the module show through them.
func StateDictOf(m *Module) (*StateDict, error) {
	keys, tensors, err := m.namedTensors("state dict", func(names **C.char, handles ***C.cs_tensor, n *C.int, msg **C.char) C.int {
		return C.cs_module_state_tensors(m.ptr, names, handles, n, msg)
	})
	if err != nil {
		return nil, err
	}
	sd := NewStateDict()
	for i, key := range keys {
		sd.Set(key, tensors[i])
	}
	return sd, nil
}

// takeHandles wraps a malloc'ed array of tensor handles and frees the array.
// namedTensors runs a shim call that returns tensors with their names as
// JSON, and takes ownership of both.
func (m *Module) namedTensors(op string, call func(names **C.char, handles ***C.cs_tensor, n *C.int, msg **C.char) C.int) ([]string, []*Tensor, error) {
	if err := m.check(op); err != nil {
		return nil, nil, err
	}
	defer runtime.KeepAlive(m)
	var names *C.char
	var handles **C.cs_tensor
	var n C.int
	var msg *C.char
	if call(&names, &handles, &n, &msg) != 0 {
		return nil, nil, takeError(op, msg)
	}
	tensors := takeHandles(handles, int(n))
	var keys []string
	if err := takeJSON(op, names, &keys); err != nil {
		closeTensors(tensors)
		return nil, nil, err
	}
	return keys, tensors, nil
}

func takeHandles(handles **C.cs_tensor, n int) []*Tensor {
	defer C.cs_free(unsafe.Pointer(handles))
	out := make([]*Tensor, n)
	for i, h := range unsafe.Slice(handles, n) {
		out[i] = newTensor(h)
	}
	return out
}

func closeTensors(tensors []*Tensor) {
	for _, t := range tensors {
		t.Close()
	}
}

// Mismatch is a key whose tensor differs from the module's in shape or
// dtype.
type Mismatch struct {
	Key           string
	ExpectedShape []int64
	ExpectedDType DType
	Shape         []int64
	DType         DType
}

func (m Mismatch) String() string {
	return fmt.Sprintf("%s: %v %v in the state dict, %v %v in the module",
		m.Key, m.Shape, m.DType, m.ExpectedShape, m.ExpectedDType)
}

// LoadReport lists what LoadStateDict did with each key.
type LoadReport struct {
	// Loaded are the keys whose values were copied into the module.
	Loaded []string
	// Missing are the module's keys that the state dict lacks.
	Missing []string
	// Unexpected are the state dict's keys that the module lacks.
	Unexpected []string
	// Mismatched are the keys whose shape or dtype differ.
	Mismatched []Mismatch
}

// Skipped returns the state dict's keys that were not loaded: the
// unexpected and the mismatched ones.
func (r LoadReport) Skipped() []string {
	out := append([]string(nil), r.Unexpected...)
	for _, m := range r.Mismatched {
		out = append(out, m.Key)
	}
	return out
}

// OK reports whether the state dict fitted the module exactly.
func (r LoadReport) OK() bool {
	return len(r.Missing) == 0 && len(r.Unexpected) == 0 && len(r.Mismatched) == 0
}

// StateDictError is the error of a strict load whose state dict does not
// fit the module. It lists every problem at once.
type StateDictError struct {
	Missing    []string
	Unexpected []string
	Mismatched []Mismatch
}

// Error lists the missing and unexpected keys and the mismatches.
func (e *StateDictError) Error() string {
	var parts []string
	if len(e.Missing) > 0 {
		parts = append(parts, fmt.Sprintf("missing keys (%d): %s", len(e.Missing), strings.Join(e.Missing, ", ")))
	}
	if len(e.Unexpected) > 0 {
		parts = append(parts, fmt.Sprintf("unexpected keys (%d): %s", len(e.Unexpected), strings.Join(e.Unexpected, ", ")))
	}
	if len(e.Mismatched) > 0 {
		lines := make([]string, len(e.Mismatched))
		for i, m := range e.Mismatched {
			lines[i] = m.String()
		}
		parts = append(parts, fmt.Sprintf("shape or dtype mismatches (%d): %s", len(e.Mismatched), strings.Join(lines, "; ")))
	}
	return ErrStateDictMismatch.Error() + ": " + strings.Join(parts, "; ")
}

// Unwrap makes errors.Is(err, ErrStateDictMismatch) true.
func (e *StateDictError) Unwrap() error { return ErrStateDictMismatch }

// loadReply is the shim's JSON report of cs_module_load_state.
type loadReply struct {
	Loaded     []string `json:"loaded"`
	Missing    []string `json:"missing"`
	Unexpected []string `json:"unexpected"`
	Mismatched []struct {
		Key           string  `json:"key"`
		ExpectedShape []int64 `json:"expected_shape"`
		ExpectedDType DType   `json:"expected_dtype"`
		Shape         []int64 `json:"shape"`
		DType         DType   `json:"dtype"`
	} `json:"mismatched"`
}

// LoadStateDict copies the state dict's tensors into the module's
// parameters and buffers of the same names, in place and without recording
// gradients, as Python's load_state_dict does. Parameters shared between
// layers therefore stay shared, and each keeps its memory format (a
// channels-last weight stays channels-last).
//
// Every key is checked before anything is copied. With strict, any missing
// key, unexpected key, or tensor whose shape or dtype differs from the
// module's makes the load fail with a *StateDictError that lists them all
// (it wraps ErrStateDictMismatch), and the module is left unchanged.
// Without strict, the keys that fit are copied and the report lists the
// others. Unlike Python's load_state_dict, which fails on a shape mismatch
// even when not strict and casts to the parameter's dtype, a non-strict load
// skips tensors whose shape or dtype differ.
func (m *Module) LoadStateDict(sd *StateDict, strict bool) (LoadReport, error) {
	if err := m.check("load state dict"); err != nil {
		return LoadReport{}, err
	}
	if sd == nil {
		return LoadReport{}, errors.New("load state dict: the state dict is nil")
	}
	defer runtime.KeepAlive(m)
	defer runtime.KeepAlive(sd)

	keys, free := cStrings(sd.keys)
	defer free()
	values := make([]*C.cs_tensor, len(sd.keys))
	for i, key := range sd.keys {
		t := sd.tensors[key]
		if t == nil || t.ptr == nil {
			return LoadReport{}, fmt.Errorf("load state dict: %s: %w", key, ErrClosed)
		}
		values[i] = t.ptr
	}
	var keyv **C.char
	var valuev **C.cs_tensor
	if len(keys) > 0 {
		keyv = &keys[0]
		valuev = &values[0]
	}
	flag := C.int(0)
	if strict {
		flag = 1
	}
	var text, msg *C.char
	if C.cs_module_load_state(m.ptr, keyv, valuev, C.int(len(keys)), flag, &text, &msg) != 0 {
		return LoadReport{}, takeError("load state dict", msg)
	}
	var reply loadReply
	if err := takeJSON("load state dict", text, &reply); err != nil {
		return LoadReport{}, err
	}

	report := LoadReport{Loaded: reply.Loaded, Missing: reply.Missing, Unexpected: reply.Unexpected}
	for _, mm := range reply.Mismatched {
		report.Mismatched = append(report.Mismatched, Mismatch(mm))
	}
	if strict && !report.OK() {
		return report, &StateDictError{Missing: report.Missing, Unexpected: report.Unexpected, Mismatched: report.Mismatched}
	}
	return report, nil
}

// LoadStateDictFromFile reads a state dict file with LoadStateDictFile and
// loads it into the module with LoadStateDict.
func (m *Module) LoadStateDictFromFile(path string, strict bool) (LoadReport, error) {
	sd, err := LoadStateDictFile(path)
	if err != nil {
		return LoadReport{}, err
	}
	defer sd.Close()
	report, err := m.LoadStateDict(sd, strict)
	if err != nil {
		return report, fmt.Errorf("loading %s: %w", path, err)
	}
	return report, nil
}

// LoadStateDictFile reads a file written by Python's
// torch.save(model.state_dict(), path): a dict or OrderedDict from string
// keys to tensors, in the zip format torch.save uses since PyTorch 1.6.
// Tensors keep their dtype, shape and strides, tensors that shared a
// storage in Python share one here, and tensors saved on another device are
// loaded on the CPU. The legacy format (torch.save with
// _use_new_zipfile_serialization=False) and TorchScript archives are
// rejected with errors wrapping ErrNotStateDictFile.
func LoadStateDictFile(path string) (*StateDict, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load state dict: %w", err)
	}
	defer file.Close()
	info, err := file.Stat()
	if err != nil {
		return nil, fmt.Errorf("load state dict: %w", err)
	}
	archive, err := zip.NewReader(file, info.Size())
	if err != nil {
		return nil, fmt.Errorf("load state dict %s: %w: not a zip archive (%v); files saved by torch.save before PyTorch 1.6 or with _use_new_zipfile_serialization=False are not supported", path, ErrNotStateDictFile, err)
	}
	sd, err := readStateDictArchive(archive)
	if err != nil {
		return nil, fmt.Errorf("load state dict %s: %w", path, err)
	}
	return sd, nil
}

// readStateDictArchive reads the records of a torch.save archive, which all
// sit in one top folder named after the file.
func readStateDictArchive(archive *zip.Reader) (*StateDict, error) {
	records := make(map[string]*zip.File, len(archive.File))
	prefix := ""
	for _, f := range archive.File {
		records[f.Name] = f
		if dir, ok := strings.CutSuffix(f.Name, "/data.pkl"); ok && !strings.Contains(dir, "/") {
			prefix = dir + "/"
		}
	}
	if prefix == "" {
		return nil, fmt.Errorf("%w: the archive has no data.pkl record", ErrNotStateDictFile)
	}
	if records[prefix+"constants.pkl"] != nil {
		return nil, fmt.Errorf("%w: it is a TorchScript archive; read it with Load and StateDictOf", ErrNotStateDictFile)
	}
	if f := records[prefix+"byteorder"]; f != nil {
		order, err := readRecord(f)
		if err != nil {
			return nil, err
		}
		if string(order) != "little" {
			return nil, fmt.Errorf("%w: byte order %q; only little-endian files are supported", ErrNotStateDictFile, order)
		}
	}

	pkl, err := readRecord(records[prefix+"data.pkl"])
	if err != nil {
		return nil, err
	}
	root, err := unpickle(pkl)
	if err != nil {
		return nil, fmt.Errorf("%w: data.pkl: %w", ErrNotStateDictFile, err)
	}
	dict, ok := root.(*pickleDict)
	if !ok {
		return nil, fmt.Errorf("%w: the file contains a %s, not a dict of tensors", ErrNotStateDictFile, pythonType(root))
	}

	storages := map[string]*Tensor{}
	defer func() {
		for _, s := range storages {
			s.Close()
		}
	}()
	sd := NewStateDict()
	for _, k := range dict.keys {
		key, ok := k.(string)
		if !ok {
			sd.Close()
			return nil, fmt.Errorf("%w: key %v is a %s, not a string", ErrNotStateDictFile, k, pythonType(k))
		}
		ref, ok := dict.values[k].(*tensorRef)
		if !ok {
			sd.Close()
			return nil, fmt.Errorf("%w: the value of %q is a %s, not a tensor", ErrNotStateDictFile, key, pythonType(dict.values[k]))
		}
		t, err := buildTensor(ref, records, prefix, storages)
		if err != nil {
			sd.Close()
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		sd.Set(key, t)
	}
	return sd, nil
}

// pythonType names the Python type behind an unpickled value, for messages.
func pythonType(v any) string {
	switch v.(type) {
	case nil:
		return "None"
	case bool:
		return "bool"
	case int64:
		return "int"
	case float64:
		return "float"
	case string:
		return "str"
	case []byte:
		return "bytes"
	case pickleTuple:
		return "tuple"
	case *pickleList:
		return "list"
	case *pickleDict:
		return "dict"
	case *tensorRef:
		return "tensor"
	case pickleGlobal:
		return "class " + v.(pickleGlobal).String()
	}
	return fmt.Sprintf("%T", v)
}

func readRecord(f *zip.File) ([]byte, error) {
	r, err := f.Open()
	if err != nil {
		return nil, fmt.Errorf("reading record %s: %w", f.Name, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("reading record %s: %w", f.Name, err)
	}
	return data, nil
}

// buildTensor makes the tensor a tensorRef describes: a strided view of its
// storage, which is read once and shared by every tensor that names it.
func buildTensor(ref *tensorRef, records map[string]*zip.File, prefix string, storages map[string]*Tensor) (*Tensor, error) {
	s := ref.storage
	base, ok := storages[s.key]
	if !ok {
		f := records[prefix+"data/"+s.key]
		if f == nil {
			return nil, fmt.Errorf("%w: storage record data/%s is missing", ErrNotStateDictFile, s.key)
		}
		data, err := readRecord(f)
		if err != nil {
			return nil, err
		}
		size := dtypeSizes[s.dtype]
		if int64(len(data)) != s.numel*int64(size) {
			return nil, fmt.Errorf("%w: storage record data/%s has %d bytes, want %d %v elements", ErrNotStateDictFile, s.key, len(data), s.numel, s.dtype)
		}
		if len(data) == 0 {
			data = make([]byte, 1) // from_blob needs a valid pointer even for no elements
		}
		base, err = fromData(unsafe.Pointer(&data[0]), int(s.numel), s.dtype, []int64{s.numel})
		if err != nil {
			return nil, err
		}
		storages[s.key] = base
	} else if base.DType() != s.dtype {
		return nil, fmt.Errorf("%w: storage data/%s is read as both %v and %v", ErrNotStateDictFile, s.key, base.DType(), s.dtype)
	}
	return asStrided(base, ref.size, ref.stride, ref.offset)
}

func asStrided(base *Tensor, size, stride []int64, offset int64) (*Tensor, error) {
	defer runtime.KeepAlive(base)
	var sizev, stridev *C.int64_t
	if len(size) > 0 {
		sizev = (*C.int64_t)(unsafe.Pointer(&size[0]))
		stridev = (*C.int64_t)(unsafe.Pointer(&stride[0]))
	}
	var out *C.cs_tensor
	var msg *C.char
	if C.cs_tensor_as_strided(base.ptr, sizev, stridev, C.int(len(size)), C.int64_t(offset), &out, &msg) != 0 {
		return nil, takeError("tensor view", msg)
	}
	return newTensor(out), nil
}

// storageInfo describes how a tensor lies in its storage.
type storageInfo struct {
	id      uint64
	bytes   int64
	offset  int64
	strides []int64
}

func (t *Tensor) storageInfo() (storageInfo, error) {
	defer runtime.KeepAlive(t)
	info := storageInfo{strides: make([]int64, len(t.Shape()))}
	var strides *C.int64_t
	if len(info.strides) > 0 {
		strides = (*C.int64_t)(unsafe.Pointer(&info.strides[0]))
	}
	var id C.uint64_t
	var size, offset C.int64_t
	var msg *C.char
	if C.cs_tensor_storage_info(t.ptr, &id, &size, &offset, strides, &msg) != 0 {
		return info, takeError("tensor storage", msg)
	}
	info.id, info.bytes, info.offset = uint64(id), int64(size), int64(offset)
	return info, nil
}

// Save writes the state dict to path in the format of Python's torch.save.
// Python's torch.load returns an OrderedDict with the same keys in the same
// order. Its tensors have the same dtypes, shapes and strides, do not
// require gradients, and share storage where they share it here. Save writes a
// temporary file beside path and renames it, so path holds either its old
// content or the complete new file.
func (sd *StateDict) Save(path string) error {
	if sd == nil {
		return errors.New("save state dict: the state dict is nil")
	}
	defer runtime.KeepAlive(sd)

	type storageKey struct {
		id    uint64
		dtype DType
	}
	index := map[storageKey]int{}
	var storages []*C.cs_tensor
	entries := make([]pickledTensor, len(sd.keys))
	for i, key := range sd.keys {
		t := sd.tensors[key]
		if t == nil || t.ptr == nil {
			return fmt.Errorf("save state dict: %s: %w", key, ErrClosed)
		}
		info, err := t.storageInfo()
		if err != nil {
			return fmt.Errorf("save state dict: %s: %w", key, err)
		}
		dtype := t.DType()
		size, ok := dtypeSizes[dtype]
		if !ok || info.bytes%int64(size) != 0 {
			return fmt.Errorf("save state dict: %s: dtype %v cannot be saved", key, dtype)
		}
		k := storageKey{info.id, dtype}
		n, ok := index[k]
		if !ok {
			n = len(storages)
			index[k] = n
			storages = append(storages, t.ptr)
		}
		entries[i] = pickledTensor{
			storage: n, dtype: dtype, storageNumel: info.bytes / int64(size),
			offset: info.offset, size: t.Shape(), stride: info.strides,
		}
	}
	pkl, err := pickleStateDict(sd.keys, entries)
	if err != nil {
		return fmt.Errorf("save state dict: %w", err)
	}
	return writeArchive(path, pkl, storages)
}

// writeArchive writes the torch.save archive through a temporary file
// beside path.
func writeArchive(path string, pkl []byte, storages []*C.cs_tensor) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("save state dict %s: %w", path, err)
	}
	tmpName := tmp.Name()
	tmp.Close()
	defer os.Remove(tmpName) // a no-op after the rename

	cpath := C.CString(tmpName)
	defer C.free(unsafe.Pointer(cpath))
	var storagev **C.cs_tensor
	if len(storages) > 0 {
		storagev = &storages[0]
	}
	var msg *C.char
	if C.cs_write_torch_archive(cpath, unsafe.Pointer(&pkl[0]), C.size_t(len(pkl)), storagev, C.int(len(storages)), &msg) != 0 {
		return fmt.Errorf("save state dict %s: %w", path, takeError("write archive", msg))
	}
	if err := syncFile(tmpName); err != nil {
		return fmt.Errorf("save state dict %s: %w", path, err)
	}
	if err := os.Rename(tmpName, path); err != nil {
		return fmt.Errorf("save state dict %s: %w", path, err)
	}
	return nil
}

// SaveStateDict writes the module's state dict to path in the format of
// Python's torch.save(model.state_dict(), path), which Python's
// load_state_dict reads.
func (m *Module) SaveStateDict(path string) error {
	sd, err := StateDictOf(m)
	if err != nil {
		return err
	}
	defer sd.Close()
	return sd.Save(path)
}
