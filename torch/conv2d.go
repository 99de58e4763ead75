package torch

/*
#include <stdlib.h>
#include "convsplit.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"strings"
	"unsafe"
)

// Conv2d describes the geometry and storage of a torch.nn.Conv2d layer.
type Conv2d struct {
	InChannels  int    `json:"in_channels"`
	OutChannels int    `json:"out_channels"`
	KernelSize  [2]int `json:"kernel_size"`
	Stride      [2]int `json:"stride"`
	Padding     [2]int `json:"padding"`
	Dilation    [2]int `json:"dilation"`
	Groups      int    `json:"groups"`
	PaddingMode string `json:"padding_mode"`
	// PaddingString is "same" or "valid" for layers built with a padding
	// string, and empty otherwise (then Padding holds the amounts).
	PaddingString string `json:"padding_string"`
	Bias          bool   `json:"bias"`
	// Scripted is false for a layer recorded by torch.jit.trace, whose
	// geometry was read from its forward graph.
	Scripted     bool    `json:"scripted"`
	ChannelsLast bool    `json:"channels_last"`
	Training     bool    `json:"training"`
	DType        string  `json:"dtype"`
	WeightShape  []int64 `json:"weight_shape"`
}

// Conv2d returns the module's Conv2d geometry. It fails for modules that are
// not a torch.nn.Conv2d (subclasses included) and for traced layers whose
// forward graph has a form it does not recognize.
func (m *Module) Conv2d() (Conv2d, error) {
	var g Conv2d
	err := m.jsonCall("conv2d geometry", func(text **C.char, msg **C.char) C.int {
		return C.cs_conv2d_geometry(m.ptr, text, msg)
	}, &g)
	return g, err
}

// Builder makes new modules that can join one model's tree: they live in
// the model's compilation unit. A builder compiles each distinct layer
// configuration once. Close it when done; it may be used by one goroutine
// at a time.
type Builder struct {
	ptr *C.cs_builder
}

// NewBuilder returns a builder for modules that will join owner's tree.
func NewBuilder(owner *Module) (*Builder, error) {
	if err := owner.check("new builder"); err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(owner)
	var out *C.cs_builder
	var msg *C.char
	if C.cs_builder_new(owner.ptr, &out, &msg) != 0 {
		return nil, takeError("new builder", msg)
	}
	b := &Builder{ptr: out}
	runtime.SetFinalizer(b, (*Builder).Close)
	return b, nil
}

// Close releases the builder. Modules it made stay valid.
func (b *Builder) Close() {
	if b == nil || b.ptr == nil {
		return
	}
	C.cs_builder_free(b.ptr)
	b.ptr = nil
	runtime.SetFinalizer(b, nil)
}

// Conv2dSpec describes a new Conv2d layer.
type Conv2dSpec struct {
	InChannels, OutChannels, Groups       int
	KernelSize, Stride, Padding, Dilation [2]int
	// PaddingMode is zeros (the default when empty), reflect, replicate or
	// circular.
	PaddingMode string
	// PaddingString is "same" or "valid" to build the layer with a padding
	// string in place of Padding, or empty.
	PaddingString string
	Bias          bool
	DType         DType
	ChannelsLast  bool
	Training      bool
}

// Conv2d makes a Conv2d module like torch.jit.script(torch.nn.Conv2d(...))
// with default-initialized parameters: the weight uniform in
// (-1/sqrt(fan_in), 1/sqrt(fan_in)), then the bias in the same range, drawn
// in float32 from libtorch's default generator before the cast to DType.
func (b *Builder) Conv2d(spec Conv2dSpec) (*Module, error) {
	if b == nil || b.ptr == nil {
		return nil, fmt.Errorf("conv2d: %w", ErrClosed)
	}
	defer runtime.KeepAlive(b)
	cspec, free := spec.toC()
	defer free()
	var out *C.cs_module
	var msg *C.char
	if C.cs_builder_conv2d(b.ptr, cspec, &out, &msg) != 0 {
		return nil, takeError("conv2d", msg)
	}
	return newModule(out), nil
}

// Conv2dWith makes a Conv2d module like Conv2d that holds the given weight
// and bias (nil when spec has no bias) instead of drawing new ones. The
// module shares the tensors: later changes to them show in the module.
func (b *Builder) Conv2dWith(spec Conv2dSpec, weight, bias *Tensor) (*Module, error) {
	if b == nil || b.ptr == nil {
		return nil, fmt.Errorf("conv2d: %w", ErrClosed)
	}
	cweight, cbias, err := parameterPointers("conv2d", weight, bias)
	if err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(b)
	defer runtime.KeepAlive(weight)
	defer runtime.KeepAlive(bias)
	cspec, free := spec.toC()
	defer free()
	var out *C.cs_module
	var msg *C.char
	if C.cs_builder_conv2d_with(b.ptr, cspec, cweight, cbias, &out, &msg) != 0 {
		return nil, takeError("conv2d", msg)
	}
	return newModule(out), nil
}

// NewConv2dParameters allocates the weight and bias (nil when spec has no
// bias) of a Conv2d in spec's dtype and layout. Their values are undefined
// until DrawConv2dParameters fills them.
func NewConv2dParameters(spec Conv2dSpec) (weight, bias *Tensor, err error) {
	cspec, free := spec.toC()
	defer free()
	var w, b *C.cs_tensor
	var msg *C.char
	if C.cs_conv2d_parameters(cspec, &w, &b, &msg) != 0 {
		return nil, nil, takeError("conv2d parameters", msg)
	}
	weight = newTensor(w)
	if b != nil {
		bias = newTensor(b)
	}
	return weight, bias, nil
}

// DrawConv2dParameters fills a Conv2d's weight, then its bias (may be nil),
// from libtorch's default generator as torch.nn.Conv2d's constructor does,
// so that after the same seed the values equal Builder.Conv2d's.
//
// It touches only the two tensors and the generator. It may therefore run on
// one goroutine while a Builder or Replace works on another, as long as
// nothing else uses the tensors or draws from the generator meanwhile.
func DrawConv2dParameters(weight, bias *Tensor) error {
	cweight, cbias, err := parameterPointers("draw", weight, bias)
	if err != nil {
		return err
	}
	defer runtime.KeepAlive(weight)
	defer runtime.KeepAlive(bias)
	var msg *C.char
	if C.cs_conv2d_draw(cweight, cbias, &msg) != 0 {
		return takeError("draw", msg)
	}
	return nil
}

// parameterPointers returns the shim handles of a Conv2d's weight and of its
// bias, nil when bias is nil. A closed tensor gives an error naming op.
func parameterPointers(op string, weight, bias *Tensor) (*C.cs_tensor, *C.cs_tensor, error) {
	if err := weight.check(op); err != nil {
		return nil, nil, err
	}
	if bias == nil {
		return weight.ptr, nil, nil
	}
	if err := bias.check(op); err != nil {
		return nil, nil, err
	}
	return weight.ptr, bias.ptr, nil
}

// toC converts the spec for the shim; free releases its strings.
func (spec Conv2dSpec) toC() (*C.cs_conv2d_spec, func()) {
	mode := spec.PaddingMode
	if mode == "" {
		mode = "zeros"
	}
	cmode := C.CString(mode)
	cpadding := C.CString(spec.PaddingString)
	cspec := &C.cs_conv2d_spec{
		in_channels:    C.int64_t(spec.InChannels),
		out_channels:   C.int64_t(spec.OutChannels),
		groups:         C.int64_t(spec.Groups),
		padding_mode:   cmode,
		padding_string: cpadding,
		bias:           cBool(spec.Bias),
		dtype:          C.int(spec.DType),
		channels_last:  cBool(spec.ChannelsLast),
		training:       cBool(spec.Training),
	}
	for i := 0; i < 2; i++ {
		cspec.kernel_size[i] = C.int64_t(spec.KernelSize[i])
		cspec.stride[i] = C.int64_t(spec.Stride[i])
		cspec.padding[i] = C.int64_t(spec.Padding[i])
		cspec.dilation[i] = C.int64_t(spec.Dilation[i])
	}
	return cspec, func() {
		C.free(unsafe.Pointer(cmode))
		C.free(unsafe.Pointer(cpadding))
	}
}

// Sequential makes a torch.nn.Sequential of the children, named "0", "1"
// and so on. Each alias names an extra method that runs forward; traced
// models call a layer that runs more than once as forward1, forward2...
func (b *Builder) Sequential(children []*Module, aliases []string, training bool) (*Module, error) {
	if b == nil || b.ptr == nil {
		return nil, fmt.Errorf("sequential: %w", ErrClosed)
	}
	defer runtime.KeepAlive(b)
	defer runtime.KeepAlive(children)
	kids := make([]*C.cs_module, len(children))
	for i, c := range children {
		if err := c.check("sequential"); err != nil {
			return nil, err
		}
		kids[i] = c.ptr
	}
	names, free := cStrings(aliases)
	defer free()
	var kidv **C.cs_module
	if len(kids) > 0 {
		kidv = &kids[0]
	}
	var namev **C.char
	if len(names) > 0 {
		namev = &names[0]
	}
	var out *C.cs_module
	var msg *C.char
	if C.cs_builder_sequential(b.ptr, kidv, C.int(len(kids)), namev, C.int(len(names)), cBool(training), &out, &msg) != 0 {
		return nil, takeError("sequential", msg)
	}
	return newModule(out), nil
}

func cBool(v bool) C.int {
	if v {
		return 1
	}
	return 0
}

// Replace puts each module of replacements at the dotted path of the same
// index, in place. Every check runs before anything changes, so after an
// error the model is as it was. A layer may only be called by its parents'
// methods (prim::CallMethod of a method the replacement also has): a parent
// that reads the layer's attributes or passes the layer along is rejected.
// A replacement may wrap the layer it replaces, but may not contain any
// other module of the model.
//
// Modules between the root and a layer whose class type is shared with other
// modules get a new object of a new type, while the root object stays the
// same. Replace must be called on a model's root handle. A handle from
// Submodule is rejected, because its parents' methods would still expect the
// old types.
func (m *Module) Replace(paths []string, replacements []*Module) error {
	return m.ReplaceAfter(paths, replacements, nil)
}

// ReplaceAfter is Replace with a pause before the change. Once every check
// has passed and the new types are built, it calls ready (when not nil). It
// changes the model only if ready returns nil. Otherwise it returns ready's
// error and the model is as it was.
//
// ready must not use the model or the replacements' types. It may wait for
// work on their tensors, such as DrawConv2dParameters on another goroutine.
func (m *Module) ReplaceAfter(paths []string, replacements []*Module, ready func() error) error {
	if err := m.check("replace"); err != nil {
		return err
	}
	if len(paths) != len(replacements) {
		return fmt.Errorf("replace: %d paths for %d modules", len(paths), len(replacements))
	}
	defer runtime.KeepAlive(m)
	defer runtime.KeepAlive(replacements)
	mods := make([]*C.cs_module, len(replacements))
	for i, r := range replacements {
		if err := r.check("replace"); err != nil {
			return err
		}
		mods[i] = r.ptr
	}
	names, free := cStrings(paths)
	defer free()
	if len(paths) == 0 {
		if ready != nil {
			return ready()
		}
		return nil
	}

	var plan *C.cs_replace_plan
	var msg *C.char
	if C.cs_module_replace_prepare(m.ptr, &names[0], &mods[0], C.int(len(paths)), &plan, &msg) != 0 {
		return takeError("replace", msg)
	}
	defer C.cs_replace_plan_free(plan)
	if ready != nil {
		if err := ready(); err != nil {
			return err
		}
	}
	if C.cs_replace_commit(plan, &msg) != 0 {
		return takeError("replace", msg)
	}
	return nil
}

// Layer describes one module of a model for planning a decomposition.
type Layer struct {
	// Found is false when the model has no module at the path.
	Found bool `json:"found"`
	// Type, Class and Conv2d are as in ModuleInfo.
	Type   string `json:"type"`
	Class  string `json:"class"`
	Conv2d bool   `json:"conv2d"`
	// Geometry is the Conv2d's geometry, unless GeometryError gives the
	// reason it could not be read.
	Geometry      Conv2d `json:"geometry"`
	GeometryError string `json:"geometry_error"`
	// Methods lists the Conv2d's methods.
	Methods []string `json:"methods"`
	// Weight and Bias are the Conv2d's parameters (nil when absent); the
	// caller closes them.
	Weight, Bias *Tensor `json:"-"`
}

// DescribeLayer describes the module at a dotted path in one call: whether
// it exists, its class, and for a Conv2d its geometry, methods and
// parameters.
func (m *Module) DescribeLayer(path string) (Layer, error) {
	var layer Layer
	if err := m.check("describe layer"); err != nil {
		return layer, err
	}
	if strings.ContainsRune(path, 0) {
		return layer, nil // a C string would cut the path short
	}
	defer runtime.KeepAlive(m)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	// A struct rather than JSON: planning describes every listed layer, and
	// decoding JSON took most of the time of each description.
	var out C.cs_layer
	var msg *C.char
	if C.cs_describe_layer(m.ptr, cpath, &out, &msg) != 0 {
		return layer, takeError("describe layer", msg)
	}
	defer C.cs_layer_free(&out)

	layer.Found = out.found != 0
	layer.Type = C.GoString(out._type)
	layer.Class = C.GoString(out.class_name)
	layer.Conv2d = out.conv2d != 0
	layer.GeometryError = C.GoString(out.geometry_error)
	if out.methods != nil {
		layer.Methods = strings.Split(strings.TrimSuffix(C.GoString(out.methods), "\n"), "\n")
	}
	if layer.Conv2d && layer.GeometryError == "" {
		layer.Geometry = conv2dOf(&out)
	}
	// The handles move to Go; cs_layer_free must not release them.
	if out.weight != nil {
		layer.Weight = newTensor(out.weight)
		out.weight = nil
	}
	if out.bias_tensor != nil {
		layer.Bias = newTensor(out.bias_tensor)
		out.bias_tensor = nil
	}
	return layer, nil
}

// conv2dOf reads the geometry fields of a layer description.
func conv2dOf(out *C.cs_layer) Conv2d {
	g := Conv2d{
		InChannels: int(out.in_channels), OutChannels: int(out.out_channels), Groups: int(out.groups),
		PaddingMode: C.GoString(out.padding_mode), PaddingString: C.GoString(out.padding_string),
		Bias: out.bias != 0, Scripted: out.scripted != 0, ChannelsLast: out.channels_last != 0,
		Training: out.training != 0, DType: C.GoString(out.dtype),
		WeightShape: make([]int64, int(out.weight_ndim)),
	}
	for i := 0; i < 2; i++ {
		g.KernelSize[i] = int(out.kernel_size[i])
		g.Stride[i] = int(out.stride[i])
		g.Padding[i] = int(out.padding[i])
		g.Dilation[i] = int(out.dilation[i])
	}
	for i := range g.WeightShape {
		g.WeightShape[i] = int64(out.weight_shape[i])
	}
	return g
}
