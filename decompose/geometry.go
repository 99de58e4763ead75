package decompose

import (
	"errors"
	"fmt"
)

// Kernel axes, as indexed in LayerInfo and ConvGeometry pairs.
const (
	heightAxis = 0
	widthAxis  = 1
)

func (m Mode) isKnown() bool {
	switch m {
	case FCFK, FCSK, SCFK, SCSK:
		return true
	}
	return false
}

// firstKeepsHeight reports whether the first new layer has a (kh, 1) kernel
// and the last a (1, kw) kernel, as in SCFK and FCSK. In FCFK and SCSK it is
// the other way round.
func (m Mode) firstKeepsHeight() bool {
	return m == SCFK || m == FCSK
}

// Rank returns the number of channels between the two new layers: the
// output channels of the first weight.
func (e Entry) Rank() int {
	return e.FirstShape[0]
}

// Check verifies that the entry describes a layer convsplit can decompose.
// The error names the layer and the field. The rules are:
//   - every number lies in 1..2^20 (ErrInvalidInfo);
//   - groups is 1 (ErrUnsupportedGroups), because AMCT never writes other
//     values and the geometry of their new layers is undefined;
//   - the mode is FCFK, FCSK, SCFK or SCSK (ErrUnknownMode);
//   - the shapes fit the layer and the mode (ErrInconsistentShapes):
//     first.in == in_channels, last.out == out_channels, last.in ==
//     first.out (the rank), and the kernels are (kh, 1) then (1, kw) in SCFK
//     and FCSK, or (1, kw) then (kh, 1) in FCFK and SCSK, and the rank is at
//     most the pair's full rank, min(in_channels x first kernel size,
//     out_channels x last kernel size).
func (e Entry) Check() error {
	if err := e.checkRanges(); err != nil {
		return err
	}
	if e.Layer.Groups != 1 {
		return e.errorf("ori_layer_info.groups", ErrUnsupportedGroups,
			"groups is %d, but only 1 is supported", e.Layer.Groups)
	}
	if !e.Mode.isKnown() {
		return e.errorf("mode", ErrUnknownMode,
			"unknown mode %q, want FCFK, FCSK, SCFK or SCSK", string(e.Mode))
	}

	first, last := e.FirstShape, e.LastShape
	if first[1] != e.Layer.InChannels {
		return e.errorf("decom_nodes.first.weight_shape[1]", ErrInconsistentShapes,
			"input channels %d differ from ori_layer_info.in_channels %d", first[1], e.Layer.InChannels)
	}
	if last[0] != e.Layer.OutChannels {
		return e.errorf("decom_nodes.last.weight_shape[0]", ErrInconsistentShapes,
			"output channels %d differ from ori_layer_info.out_channels %d", last[0], e.Layer.OutChannels)
	}
	if last[1] != first[0] {
		return e.errorf("decom_nodes.last.weight_shape[1]", ErrInconsistentShapes,
			"input channels %d differ from the rank %d in decom_nodes.first.weight_shape[0]", last[1], first[0])
	}

	wantFirst, wantLast := e.kernelShapes()
	kernels := []struct {
		node string
		got  [2]int
		want [2]int
	}{
		{"first", [2]int{first[2], first[3]}, wantFirst},
		{"last", [2]int{last[2], last[3]}, wantLast},
	}
	for _, kernel := range kernels {
		for axis, name := range []string{"height", "width"} {
			if kernel.got[axis] != kernel.want[axis] {
				return e.errorf(fmt.Sprintf("decom_nodes.%s.weight_shape[%d]", kernel.node, 2+axis), ErrInconsistentShapes,
					"kernel %s is %d, want %d for mode %s and kernel_size %v",
					name, kernel.got[axis], kernel.want[axis], e.Mode, e.Layer.KernelSize)
			}
		}
	}

	// A rank above the pair's full rank adds nothing but size, and a small
	// file could otherwise demand gigabytes of new weights.
	fullRank := min(first[1]*first[2]*first[3], last[0]*last[2]*last[3])
	if first[0] > fullRank {
		return e.errorf("decom_nodes.first.weight_shape[0]", ErrInconsistentShapes,
			"rank %d exceeds the layer's full rank %d", first[0], fullRank)
	}
	return nil
}

// kernelShapes returns the (height, width) kernels that the mode gives the
// two new layers.
func (e Entry) kernelShapes() (first, last [2]int) {
	column := [2]int{e.Layer.KernelSize[heightAxis], 1}
	row := [2]int{1, e.Layer.KernelSize[widthAxis]}
	if e.Mode.firstKeepsHeight() {
		return column, row
	}
	return row, column
}

// checkRanges verifies that every number of the entry lies in 1..maxDim.
func (e Entry) checkRanges() error {
	type field struct {
		name  string
		value int
	}
	l := e.Layer
	fields := []field{
		{"ori_layer_info.in_channels", l.InChannels},
		{"ori_layer_info.out_channels", l.OutChannels},
		{"ori_layer_info.kernel_size[0]", l.KernelSize[0]},
		{"ori_layer_info.kernel_size[1]", l.KernelSize[1]},
		{"ori_layer_info.stride[0]", l.Stride[0]},
		{"ori_layer_info.stride[1]", l.Stride[1]},
		{"ori_layer_info.dilation[0]", l.Dilation[0]},
		{"ori_layer_info.dilation[1]", l.Dilation[1]},
		{"ori_layer_info.groups", l.Groups},
	}
	for i, value := range e.FirstShape {
		fields = append(fields, field{fmt.Sprintf("decom_nodes.first.weight_shape[%d]", i), value})
	}
	for i, value := range e.LastShape {
		fields = append(fields, field{fmt.Sprintf("decom_nodes.last.weight_shape[%d]", i), value})
	}

	for _, f := range fields {
		switch {
		case f.value < 1:
			return e.errorf(f.name, ErrInvalidInfo, "want a positive integer, got %d", f.value)
		case f.value > maxDim:
			return e.errorf(f.name, ErrInvalidInfo, "%d is above the maximum %d", f.value, maxDim)
		}
	}
	return nil
}

func (e Entry) errorf(field string, kind error, format string, args ...any) *infoError {
	return &infoError{
		entry: -1, layer: e.Layer.Name, hasName: true, field: field,
		detail: fmt.Sprintf(format, args...),
		kinds:  []error{kind},
	}
}

// Check runs Entry.Check on every entry and verifies that no two entries
// name the same layer (ErrDuplicateLayer) and that there are at most 100000
// entries (ErrInvalidInfo). It returns the first problem in file order, with
// the entry index in the message.
func (info *Info) Check() error {
	if len(info.Entries) > maxEntries {
		return &infoError{
			entry:  -1,
			detail: fmt.Sprintf("%d entries, more than the maximum of %d", len(info.Entries), maxEntries),
			kinds:  []error{ErrInvalidInfo},
		}
	}

	entryOf := make(map[string]int, len(info.Entries))
	for index, entry := range info.Entries {
		if err := entry.Check(); err != nil {
			var entryErr *infoError
			if !errors.As(err, &entryErr) {
				return fmt.Errorf("entry %d: %w", index, err)
			}
			located := *entryErr
			located.entry = index
			return &located
		}
		if first, ok := entryOf[entry.Layer.Name]; ok {
			return &infoError{
				entry: index, layer: entry.Layer.Name, hasName: true,
				field:  "ori_layer_info.name",
				detail: fmt.Sprintf("duplicate layer, already listed in entry %d", first),
				kinds:  []error{ErrDuplicateLayer},
			}
		}
		entryOf[entry.Layer.Name] = index
	}
	return nil
}

// ConvGeometry is the configuration of a torch.nn.Conv2d. Pairs are
// (height, width), and Padding holds explicit amounts.
type ConvGeometry struct {
	InChannels, OutChannels               int
	KernelSize, Stride, Padding, Dilation [2]int
	Groups                                int
	// PaddingMode is "zeros", "reflect", "replicate" or "circular".
	PaddingMode string
	// PaddingString is "same" or "valid" for a layer built with a padding
	// string (Padding is then unused), and empty otherwise. The new layers
	// keep it: each same-padded layer of the pair pads along its kernel's
	// long axis, so the pair keeps the output size of the original.
	PaddingString string
	Bias          bool
}

// SplitGeometry returns the geometry of the two Conv2d layers that replace
// the original layer orig. Channels and kernels come from the weight shapes.
// Each new layer copies the stride, padding, dilation, groups and padding mode
// of orig, then resets the axis along which its kernel is 1 to stride 1,
// padding 0 and dilation 1. That axis is the width for the first layer in
// FCSK and SCFK and for the last layer in FCFK and SCSK, and the height
// otherwise. Only the last layer has a bias, and only when orig has one.
//
// The entry must pass Check. The channels, kernel size, stride, dilation and
// groups of orig must equal the entry's, or the error wraps
// ErrAttributeMismatch and names the field.
func (e Entry) SplitGeometry(orig ConvGeometry) (first, last ConvGeometry, err error) {
	if err := e.Check(); err != nil {
		return ConvGeometry{}, ConvGeometry{}, err
	}
	if err := e.matchGeometry(orig); err != nil {
		return ConvGeometry{}, ConvGeometry{}, err
	}

	first = newLayerGeometry(orig, e.FirstShape)
	first.Bias = false
	last = newLayerGeometry(orig, e.LastShape)
	if e.Mode.firstKeepsHeight() {
		resetAxis(&first, widthAxis)
		resetAxis(&last, heightAxis)
	} else {
		resetAxis(&first, heightAxis)
		resetAxis(&last, widthAxis)
	}
	return first, last, nil
}

func newLayerGeometry(orig ConvGeometry, shape [4]int) ConvGeometry {
	layer := orig
	layer.OutChannels = shape[0]
	layer.InChannels = shape[1]
	layer.KernelSize = [2]int{shape[2], shape[3]}
	return layer
}

func resetAxis(layer *ConvGeometry, axis int) {
	layer.Stride[axis] = 1
	layer.Padding[axis] = 0
	layer.Dilation[axis] = 1
}

// matchGeometry verifies that orig has the geometry that the entry records.
func (e Entry) matchGeometry(orig ConvGeometry) error {
	l := e.Layer
	ints := []struct {
		field      string
		got, entry int
	}{
		{"ori_layer_info.in_channels", orig.InChannels, l.InChannels},
		{"ori_layer_info.out_channels", orig.OutChannels, l.OutChannels},
		{"ori_layer_info.groups", orig.Groups, l.Groups},
	}
	for _, value := range ints {
		if value.got != value.entry {
			return e.errorf(value.field, ErrAttributeMismatch,
				"layer has %d, the information file has %d", value.got, value.entry)
		}
	}

	pairs := []struct {
		field      string
		got, entry [2]int
	}{
		{"ori_layer_info.kernel_size", orig.KernelSize, l.KernelSize},
		{"ori_layer_info.stride", orig.Stride, l.Stride},
		{"ori_layer_info.dilation", orig.Dilation, l.Dilation},
	}
	for _, pair := range pairs {
		if pair.got != pair.entry {
			return e.errorf(pair.field, ErrAttributeMismatch,
				"layer has %v, the information file has %v", pair.got, pair.entry)
		}
	}
	return nil
}
