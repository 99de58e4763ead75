package torch_test

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// pythonConvCalls records, with forward hooks on the eager models of
// zoo_models.py, the input and output sizes of every Conv2d call, by layer
// name in named_modules() order. Its arguments are pairs of a model name and
// input sizes such as 1x3x32x32; it prints one list per pair, keyed by
// "NAME SIZES".
const pythonConvCalls = `
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import zoo_models
result = {}
for name, sizes in zip(sys.argv[2::2], sys.argv[3::2]):
    model = zoo_models.build(name).eval()
    layers = []
    for layer_name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            record = {'name': layer_name, 'calls': []}
            layers.append(record)
            module.register_forward_hook(
                lambda m, args, out, record=record: record['calls'].append(
                    {'input': list(args[0].shape), 'output': list(out.shape)}))
    with torch.no_grad():
        model(torch.zeros([int(s) for s in sizes.split('x')]))
    result[name + ' ' + sizes] = layers
print(json.dumps(result))
`

type pythonLayer struct {
	Name  string             `json:"name"`
	Calls []torch.Conv2dCall `json:"calls"`
}

func TestProbeConv2dShapesMatchesPython(t *testing.T) {
	cases := []struct {
		fixture, model string
		shape          []int64
		shapeText      string
	}{
		{"mixed", "mixed", []int64{1, 3, 32, 32}, "1x3x32x32"},
		{"mixed_traced", "mixed", []int64{2, 3, 20, 24}, "2x3x20x24"},
		{"resnet18", "resnet18", []int64{1, 3, 64, 64}, "1x3x64x64"},
		{"root_conv", "root_conv", []int64{1, 64, 9, 7}, "1x64x9x7"},
	}
	args := []string{testutil.AMCT()}
	for _, tc := range cases {
		args = append(args, tc.model, tc.shapeText)
	}
	var python map[string][]pythonLayer
	require.NoError(t, json.Unmarshal([]byte(testutil.PythonCode(t, pythonConvCalls, args...)), &python))

	for _, tc := range cases {
		t.Run(tc.fixture, func(t *testing.T) {
			want := python[tc.model+" "+tc.shapeText]
			require.NotEmpty(t, want)
			model, err := torch.Load(testutil.Fixture(t, tc.fixture))
			require.NoError(t, err)
			defer model.Close()

			probe, err := model.ProbeConv2dShapes(tc.shape...)
			require.NoError(t, err)
			assert.Equal(t, "Float", probe.DType)
			require.Len(t, probe.Layers, len(want))
			for i, layer := range probe.Layers {
				assert.Equal(t, want[i].Name, layer.Name, "layer %d", i)
				assert.True(t, layer.Probed, "layer %s: %s", layer.Name, layer.Reason)
				assert.Equal(t, want[i].Calls, layer.Calls, "layer %s", layer.Name)
			}
		})
	}
}

func TestProbeConv2dShapesLeavesModel(t *testing.T) {
	model, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)
	defer model.Close()
	require.NoError(t, model.Train(true))
	before, err := model.NamedModules()
	require.NoError(t, err)

	_, err = model.ProbeConv2dShapes(1, 3, 16, 16)
	require.NoError(t, err)

	after, err := model.NamedModules()
	require.NoError(t, err)
	assert.Equal(t, before, after)
	training, err := model.IsTraining()
	require.NoError(t, err)
	assert.True(t, training, "the model's training flag changed")

	// A second probe finds the original layers again, not the first probe's.
	probe, err := model.ProbeConv2dShapes(1, 3, 8, 8)
	require.NoError(t, err)
	require.NotEmpty(t, probe.Layers)
	assert.Equal(t, []int64{1, 128, 8, 8}, probe.Layers[0].Calls[0].Output)
	assert.Len(t, probe.Layers[0].Calls, 1)
}

func TestProbeConv2dShapesSpecialLayers(t *testing.T) {
	dir := t.TempDir()
	testutil.RunPython(t, "bad_models.py", dir)

	t.Run("parent reads weight", func(t *testing.T) {
		model, err := torch.Load(filepath.Join(dir, "weight_reader.pt"))
		require.NoError(t, err)
		defer model.Close()
		probe, err := model.ProbeConv2dShapes(1, 16, 8, 8)
		require.NoError(t, err)
		require.Len(t, probe.Layers, 2)

		first, reader := probe.Layers[0], probe.Layers[1]
		assert.Equal(t, "first", first.Name)
		assert.True(t, first.Probed)
		assert.Equal(t, []torch.Conv2dCall{{Input: []int64{1, 16, 8, 8}, Output: []int64{1, 16, 8, 8}}}, first.Calls)
		assert.Equal(t, "reader", reader.Name)
		assert.False(t, reader.Probed)
		assert.Contains(t, reader.Reason, "reader")
		assert.Empty(t, reader.Calls)
	})

	t.Run("model casts for float64 layer", func(t *testing.T) {
		// The first layer is float64, but the model takes float32 and casts.
		model, err := torch.Load(filepath.Join(dir, "dtypes.pt"))
		require.NoError(t, err)
		defer model.Close()
		probe, err := model.ProbeConv2dShapes(1, 16, 8, 8)
		require.NoError(t, err)
		assert.Equal(t, "Float", probe.DType)
		require.Len(t, probe.Layers, 2)
		for _, layer := range probe.Layers {
			assert.Equal(t, []int64{1, 32, 8, 8}, layer.Calls[0].Output, "layer %s", layer.Name)
		}
	})
}

func TestProbeConv2dShapesErrors(t *testing.T) {
	model, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)

	_, err = model.ProbeConv2dShapes()
	assert.Error(t, err, "empty shape")

	_, err = model.ProbeConv2dShapes(1, 5, 8, 8)
	assert.ErrorIs(t, err, torch.ErrTorch, "wrong channel count")

	model.Close()
	_, err = model.ProbeConv2dShapes(1, 3, 8, 8)
	assert.ErrorIs(t, err, torch.ErrClosed)
}

func TestNumThreads(t *testing.T) {
	original := torch.NumThreads()
	require.Positive(t, original)
	defer func() { require.NoError(t, torch.SetNumThreads(original)) }()

	require.NoError(t, torch.SetNumThreads(1))
	assert.Equal(t, 1, torch.NumThreads())
	assert.ErrorIs(t, torch.SetNumThreads(0), torch.ErrTorch)
}
