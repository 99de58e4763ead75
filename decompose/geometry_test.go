package decompose

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// referenceConv is a Conv2d as recorded in reference.json, which was made by
// running AMCT's decompose_network on the eager models.
type referenceConv struct {
	InChannels  int    `json:"in_channels"`
	OutChannels int    `json:"out_channels"`
	KernelSize  [2]int `json:"kernel_size"`
	Stride      [2]int `json:"stride"`
	Padding     [2]int `json:"padding"`
	Dilation    [2]int `json:"dilation"`
	Groups      int    `json:"groups"`
	Bias        bool   `json:"bias"`
	PaddingMode string `json:"padding_mode"`
	WeightShape [4]int `json:"weight_shape"`
}

type referenceModule struct {
	Name string         `json:"name"`
	Type string         `json:"type"`
	Conv *referenceConv `json:"conv"`
}

type reference struct {
	Changes           map[string][]string `json:"changes"`
	Structure         []referenceModule   `json:"structure"`
	OriginalStructure []referenceModule   `json:"original_structure"`
}

// convsByName returns the Conv2d modules of a structure list by name.
func convsByName(modules []referenceModule) map[string]referenceConv {
	convs := make(map[string]referenceConv)
	for _, module := range modules {
		if module.Type == "Conv2d" && module.Conv != nil {
			convs[module.Name] = *module.Conv
		}
	}
	return convs
}

func (c referenceConv) geometry() ConvGeometry {
	return ConvGeometry{
		InChannels: c.InChannels, OutChannels: c.OutChannels,
		KernelSize: c.KernelSize, Stride: c.Stride, Padding: c.Padding, Dilation: c.Dilation,
		Groups: c.Groups, PaddingMode: c.PaddingMode, Bias: c.Bias,
	}
}

// assertGeometry compares a computed layer with AMCT's, field by field.
func assertGeometry(t *testing.T, want referenceConv, got ConvGeometry, layer string) {
	t.Helper()
	assert.Equal(t, want.InChannels, got.InChannels, "%s in_channels", layer)
	assert.Equal(t, want.OutChannels, got.OutChannels, "%s out_channels", layer)
	assert.Equal(t, want.KernelSize, got.KernelSize, "%s kernel_size", layer)
	assert.Equal(t, want.Stride, got.Stride, "%s stride", layer)
	assert.Equal(t, want.Padding, got.Padding, "%s padding", layer)
	assert.Equal(t, want.Dilation, got.Dilation, "%s dilation", layer)
	assert.Equal(t, want.Groups, got.Groups, "%s groups", layer)
	assert.Equal(t, want.PaddingMode, got.PaddingMode, "%s padding_mode", layer)
	assert.Equal(t, want.Bias, got.Bias, "%s bias", layer)
}

func TestSplitGeometryMatchesAMCTReference(t *testing.T) {
	paths, err := filepath.Glob("../testdata/amct/*/reference.json")
	require.NoError(t, err)
	require.Len(t, paths, 7)

	for _, path := range paths {
		t.Run(filepath.Base(filepath.Dir(path)), func(t *testing.T) {
			data, err := os.ReadFile(path)
			require.NoError(t, err)
			var ref reference
			require.NoError(t, json.Unmarshal(data, &ref))
			info, err := ReadInfo(filepath.Join(filepath.Dir(path), "decompose_info.json"))
			require.NoError(t, err)

			originals := convsByName(ref.OriginalStructure)
			replacements := convsByName(ref.Structure)
			require.Len(t, ref.Changes, len(info.Entries))
			for _, entry := range info.Entries {
				name := entry.Layer.Name
				orig, ok := originals[name]
				require.True(t, ok, "original layer %q not in original_structure", name)
				newNames := ref.Changes[name]
				require.Len(t, newNames, 2, "changes of layer %q", name)
				wantFirst, ok := replacements[newNames[0]]
				require.True(t, ok, "new layer %q not in structure", newNames[0])
				wantLast, ok := replacements[newNames[1]]
				require.True(t, ok, "new layer %q not in structure", newNames[1])

				first, last, err := entry.SplitGeometry(orig.geometry())
				require.NoError(t, err)
				assertGeometry(t, wantFirst, first, newNames[0])
				assertGeometry(t, wantLast, last, newNames[1])
				assert.Equal(t, wantFirst.WeightShape, entry.FirstShape, "%s weight_shape", newNames[0])
				assert.Equal(t, wantLast.WeightShape, entry.LastShape, "%s weight_shape", newNames[1])
			}
		})
	}
}

func TestSplitGeometryModes(t *testing.T) {
	// A 3x5 layer with distinct values on both axes, so a reset of the wrong axis shows.
	orig := ConvGeometry{
		InChannels: 64, OutChannels: 128,
		KernelSize: [2]int{3, 5}, Stride: [2]int{2, 3}, Padding: [2]int{4, 6}, Dilation: [2]int{2, 3},
		Groups: 1, PaddingMode: "circular", Bias: true,
	}
	// A column layer keeps the height axis and resets the width axis, and a row layer does the opposite.
	column := func(in, out int, bias bool) ConvGeometry {
		return ConvGeometry{
			InChannels: in, OutChannels: out,
			KernelSize: [2]int{3, 1}, Stride: [2]int{2, 1}, Padding: [2]int{4, 0}, Dilation: [2]int{2, 1},
			Groups: 1, PaddingMode: "circular", Bias: bias,
		}
	}
	row := func(in, out int, bias bool) ConvGeometry {
		return ConvGeometry{
			InChannels: in, OutChannels: out,
			KernelSize: [2]int{1, 5}, Stride: [2]int{1, 3}, Padding: [2]int{0, 6}, Dilation: [2]int{1, 3},
			Groups: 1, PaddingMode: "circular", Bias: bias,
		}
	}

	tests := []struct {
		mode        Mode
		first, last ConvGeometry
	}{
		{SCFK, column(64, 32, false), row(32, 128, true)},
		{FCSK, column(64, 32, false), row(32, 128, true)},
		{FCFK, row(64, 32, false), column(32, 128, true)},
		{SCSK, row(64, 32, false), column(32, 128, true)},
	}
	for _, test := range tests {
		t.Run(string(test.mode), func(t *testing.T) {
			entry := validEntry("conv", test.mode)
			entry.Layer.Stride = orig.Stride
			entry.Layer.Dilation = orig.Dilation

			first, last, err := entry.SplitGeometry(orig)
			require.NoError(t, err)
			assert.Equal(t, test.first, first)
			assert.Equal(t, test.last, last)
		})
	}
}

func TestSplitGeometryWithoutBias(t *testing.T) {
	entry := validEntry("conv", FCFK)
	orig := ConvGeometry{
		InChannels: 64, OutChannels: 128, KernelSize: [2]int{3, 5}, Stride: [2]int{1, 1},
		Dilation: [2]int{1, 1}, Padding: [2]int{1, 2}, Groups: 1, PaddingMode: "zeros",
	}

	first, last, err := entry.SplitGeometry(orig)
	require.NoError(t, err)
	assert.False(t, first.Bias)
	assert.False(t, last.Bias)
}

func TestSplitGeometryRejectsMismatch(t *testing.T) {
	base := ConvGeometry{
		InChannels: 64, OutChannels: 128, KernelSize: [2]int{3, 5}, Stride: [2]int{1, 1},
		Dilation: [2]int{1, 1}, Padding: [2]int{1, 2}, Groups: 1, PaddingMode: "zeros", Bias: true,
	}
	tests := []struct {
		name    string
		edit    func(*ConvGeometry)
		message string
	}{
		{"in channels", func(g *ConvGeometry) { g.InChannels = 32 },
			"layer conv: ori_layer_info.in_channels: layer has 32, the information file has 64"},
		{"out channels", func(g *ConvGeometry) { g.OutChannels = 64 },
			"layer conv: ori_layer_info.out_channels: layer has 64, the information file has 128"},
		{"groups", func(g *ConvGeometry) { g.Groups = 2 },
			"layer conv: ori_layer_info.groups: layer has 2, the information file has 1"},
		{"kernel size", func(g *ConvGeometry) { g.KernelSize = [2]int{5, 3} },
			"layer conv: ori_layer_info.kernel_size: layer has [5 3], the information file has [3 5]"},
		{"stride", func(g *ConvGeometry) { g.Stride = [2]int{2, 2} },
			"layer conv: ori_layer_info.stride: layer has [2 2], the information file has [1 1]"},
		{"dilation", func(g *ConvGeometry) { g.Dilation = [2]int{1, 2} },
			"layer conv: ori_layer_info.dilation: layer has [1 2], the information file has [1 1]"},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			orig := base
			test.edit(&orig)

			first, last, err := validEntry("conv", SCFK).SplitGeometry(orig)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrAttributeMismatch)
			assert.Equal(t, test.message, err.Error())
			assert.Zero(t, first)
			assert.Zero(t, last)
		})
	}
}

func TestSplitGeometryChecksEntry(t *testing.T) {
	entry := validEntry("conv", SCFK)
	entry.FirstShape[3] = 5
	orig := ConvGeometry{
		InChannels: 64, OutChannels: 128, KernelSize: [2]int{3, 5}, Stride: [2]int{1, 1},
		Dilation: [2]int{1, 1}, Groups: 1, PaddingMode: "zeros",
	}

	_, _, err := entry.SplitGeometry(orig)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInconsistentShapes)
	assert.Contains(t, err.Error(), "decom_nodes.first.weight_shape[3]")
}

func TestEntryRank(t *testing.T) {
	entry := validEntry("conv", SCSK)
	assert.Equal(t, 32, entry.Rank())
}
