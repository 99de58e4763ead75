package decompose

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChooseModeRules(t *testing.T) {
	ones := [2]int{1, 1}
	tests := []struct {
		name         string
		in, out      int
		kernel       [2]int
		stride       [2]int
		dilation     [2]int
		groups       int
		wantMode     Mode
		wantEligible bool
	}{
		{"square kernel more outputs", 64, 128, [2]int{3, 3}, ones, ones, 1, SCFK, true},
		{"square kernel equal channels", 64, 64, [2]int{3, 3}, ones, ones, 1, SCFK, true},
		{"wide kernel more outputs", 64, 128, [2]int{3, 5}, ones, ones, 1, SCFK, true},
		{"tall kernel more outputs", 256, 256, [2]int{5, 3}, ones, ones, 1, SCSK, true},
		{"square kernel fewer outputs", 256, 128, [2]int{3, 3}, ones, ones, 1, FCFK, true},
		{"wide kernel fewer outputs", 256, 128, [2]int{3, 7}, ones, ones, 1, FCFK, true},
		{"tall kernel fewer outputs", 128, 64, [2]int{5, 3}, ones, ones, 1, FCSK, true},
		{"stride 2", 64, 64, [2]int{3, 3}, [2]int{2, 2}, ones, 1, SCFK, true},
		{"non-square stride", 64, 64, [2]int{3, 3}, [2]int{2, 1}, ones, 1, SCFK, true},
		{"7x7 kernel on 3 channels", 3, 64, [2]int{7, 7}, [2]int{2, 2}, ones, 1, SCFK, true},
		{"groups 2", 64, 64, [2]int{3, 3}, ones, ones, 2, "", false},
		{"depthwise", 64, 64, [2]int{3, 3}, ones, ones, 64, "", false},
		{"dilation 2", 64, 64, [2]int{3, 3}, ones, [2]int{2, 2}, 1, "", false},
		{"dilation 2 on width", 64, 64, [2]int{3, 3}, ones, [2]int{1, 2}, 1, "", false},
		{"stride 3", 64, 64, [2]int{3, 3}, [2]int{3, 3}, ones, 1, "", false},
		{"stride 3 on height", 64, 64, [2]int{3, 3}, [2]int{3, 1}, ones, 1, "", false},
		{"1x1 kernel", 64, 64, [2]int{1, 1}, ones, ones, 1, "", false},
		{"1x3 kernel", 256, 256, [2]int{1, 3}, ones, ones, 1, "", false},
		{"kernel side x channels below 16", 2, 64, [2]int{7, 7}, ones, ones, 1, "", false},
		{"kernel side x channels 16 with kernel 8", 2, 64, [2]int{8, 8}, ones, ones, 1, SCFK, true},
		{"3 input channels 3x3", 3, 128, [2]int{3, 3}, ones, ones, 1, "", false},
		{"63 channels 3x3", 63, 128, [2]int{3, 3}, ones, ones, 1, "", false},
		{"63 channels 6x6", 128, 63, [2]int{6, 6}, ones, ones, 1, "", false},
		{"63 channels 7x7", 128, 63, [2]int{7, 7}, ones, ones, 1, FCFK, true},
		{"zero input channels", 0, 64, [2]int{3, 3}, ones, ones, 1, "", false},
		{"zero kernel side", 64, 64, [2]int{0, 3}, ones, ones, 1, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mode, eligible, reason := ChooseMode(tt.in, tt.out, tt.kernel, tt.stride, tt.dilation, tt.groups)
			assert.Equal(t, tt.wantEligible, eligible)
			assert.Equal(t, tt.wantMode, mode)
			if tt.wantEligible {
				assert.Empty(t, reason)
			} else {
				assert.NotEmpty(t, reason)
			}
		})
	}
}

// ruleConvModule is the Conv2d geometry of one module in reference.json's
// original_structure; Conv is nil for other module types.
type ruleConvModule struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Conv *struct {
		InChannels  int    `json:"in_channels"`
		OutChannels int    `json:"out_channels"`
		KernelSize  [2]int `json:"kernel_size"`
		Stride      [2]int `json:"stride"`
		Dilation    [2]int `json:"dilation"`
		Groups      int    `json:"groups"`
	} `json:"conv"`
}

// ruleInfoEntry is the part of a decompose_info.json entry that ChooseMode decides.
type ruleInfoEntry struct {
	Layer struct {
		Name string `json:"name"`
	} `json:"ori_layer_info"`
	Mode string `json:"mode"`
}

// TestChooseModeMatchesAMCT checks every Conv2d of every model in
// testdata/amct: the layers in decompose_info.json get their mode, and all
// other Conv2d layers are left unchanged.
func TestChooseModeMatchesAMCT(t *testing.T) {
	folders, err := filepath.Glob(filepath.Join("..", "testdata", "amct", "*", "decompose_info.json"))
	require.NoError(t, err)
	require.NotEmpty(t, folders)

	for _, infoPath := range folders {
		dir := filepath.Dir(infoPath)
		t.Run(filepath.Base(dir), func(t *testing.T) {
			var entries []ruleInfoEntry
			readRuleTestJSON(t, infoPath, &entries)
			var reference struct {
				OriginalStructure []ruleConvModule `json:"original_structure"`
			}
			readRuleTestJSON(t, filepath.Join(dir, "reference.json"), &reference)

			modes := make(map[string]string, len(entries))
			for _, entry := range entries {
				modes[entry.Layer.Name] = entry.Mode
			}

			convs := 0
			for _, module := range reference.OriginalStructure {
				if module.Type != "Conv2d" {
					continue
				}
				require.NotNil(t, module.Conv, "Conv2d %q has no geometry", module.Name)
				convs++
				c := module.Conv
				mode, eligible, reason := ChooseMode(c.InChannels, c.OutChannels, c.KernelSize, c.Stride, c.Dilation, c.Groups)

				want, listed := modes[module.Name]
				delete(modes, module.Name)
				if !listed {
					assert.False(t, eligible, "layer %q is not in decompose_info.json but ChooseMode picks %s", module.Name, mode)
					continue
				}
				assert.True(t, eligible, "layer %q is in decompose_info.json but ChooseMode rejects it: %s", module.Name, reason)
				assert.Equal(t, Mode(want), mode, "mode of layer %q", module.Name)
			}
			assert.Positive(t, convs)
			assert.Empty(t, modes, "decompose_info.json layers missing from original_structure")
		})
	}
}

func readRuleTestJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(data, v), "parse %s", path)
}
