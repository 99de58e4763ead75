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

// pythonConvCalls records, with forward hooks on the eager model of
// zoo_models.py, the input and output sizes of every Conv2d call, by layer
// name in named_modules() order.
const pythonConvCalls = `
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import zoo_models
model = zoo_models.build(sys.argv[2]).eval()
shape = [int(s) for s in sys.argv[3].split('x')]
layers = []
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Conv2d):
        record = {'name': name, 'calls': []}
        layers.append(record)
        module.register_forward_hook(
            lambda m, args, out, record=record: record['calls'].append(
                {'input': list(args[0].shape), 'output': list(out.shape)}))
with torch.no_grad():
    model(torch.zeros(shape))
print(json.dumps(layers))
`

type pythonLayer struct {
	Name  string             `json:"name"`
	Calls []torch.Conv2dCall `json:"calls"`
}

func pythonCalls(t *testing.T, model, shape string) []pythonLayer {
	t.Helper()
	out := testutil.PythonCode(t, pythonConvCalls, testutil.AMCT(), model, shape)
	var layers []pythonLayer
	require.NoError(t, json.Unmarshal([]byte(out), &layers))
	return layers
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
	for _, tc := range cases {
		t.Run(tc.fixture, func(t *testing.T) {
			want := pythonCalls(t, tc.model, tc.shapeText)
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

	// A second probe sees the original layers again, not the first probe's.
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
