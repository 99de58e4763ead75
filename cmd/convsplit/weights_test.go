package main

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// runWeights runs a command line in-process and returns its exit status and
// output.
func runWeights(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// ioOutput returns the input of NAME's io.pt and the largest difference
// between its output and m's eval output, with the bound allowed:
// 1e-4 + rtol*max|y|.
func ioOutput(t *testing.T, m *torch.Module, name string, rtol float64) (x *torch.Tensor, diff, bound float64) {
	t.Helper()
	io, err := torch.LoadStateDictFile(testutil.AMCT(name, "io.pt"))
	require.NoError(t, err)
	t.Cleanup(io.Close)
	x, _ = io.Get("input")
	y, _ := io.Get("output")
	want, err := y.Float32s()
	require.NoError(t, err)

	require.NoError(t, m.Eval())
	out, err := m.Forward(x)
	require.NoError(t, err)
	require.Len(t, out, 1)
	defer out[0].Close()
	got, err := out[0].Float32s()
	require.NoError(t, err)
	require.Len(t, got, len(want))

	largest := 0.0
	for i := range want {
		diff = math.Max(diff, math.Abs(float64(got[i])-float64(want[i])))
		largest = math.Max(largest, math.Abs(float64(want[i])))
	}
	return x, diff, 1e-4 + rtol*largest
}

func TestApplyWeightsMatchesIO(t *testing.T) {
	// lowrank's outputs are near 1e7, so its bound has a relative part.
	cases := []struct {
		name    string
		tensors string
		rtol    float64
	}{
		{"mixed", "loaded 23 tensors", 0},
		{"lowrank", "loaded 11 tensors", 1e-6},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.pt")
			weights := testutil.AMCT(tc.name, "decomposed_state.pt")
			code, stdout, stderr := runWeights("apply", "-model", testutil.Fixture(t, tc.name),
				"-info", testutil.AMCT(tc.name, "decompose_info.json"), "-weights", weights, "-o", out)
			require.Equal(t, 0, code, stderr)
			assert.Contains(t, stdout, tc.tensors+" from "+weights)

			model, err := torch.Load(out)
			require.NoError(t, err)
			defer model.Close()
			_, diff, bound := ioOutput(t, model, tc.name, tc.rtol)
			assert.LessOrEqual(t, diff, bound)
		})
	}
}

// fineTune runs ten SGD steps that pull m's outputs for x towards target
// and returns the loss of each step.
func fineTune(t *testing.T, m *torch.Module, x, target *torch.Tensor, opts torch.SGDOptions) []float64 {
	t.Helper()
	require.NoError(t, m.Train(true))
	params, err := m.Parameters()
	require.NoError(t, err)
	optimizer, err := torch.NewSGD(params, opts)
	require.NoError(t, err)
	defer optimizer.Close()

	losses := make([]float64, 10)
	for i := range losses {
		require.NoError(t, optimizer.ZeroGrad())
		out, err := m.ForwardTrain(x)
		require.NoError(t, err)
		loss, err := torch.MSELoss(out[0], target)
		require.NoError(t, err)
		losses[i], err = loss.Item()
		require.NoError(t, err)
		require.NoError(t, loss.Backward())
		require.NoError(t, optimizer.Step())
		loss.Close()
		out[0].Close()
	}
	return losses
}

func TestApplyWeightsThenFineTune(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out.pt")
	code, _, stderr := runWeights("apply", "-model", testutil.Fixture(t, "mixed"),
		"-info", testutil.AMCT("mixed", "decompose_info.json"),
		"-weights", testutil.AMCT("mixed", "decomposed_state.pt"), "-o", out)
	require.Equal(t, 0, code, stderr)

	// Fine-tune the written model towards io.pt's output for a shifted
	// input, so that its weights leave AMCT's.
	model, err := torch.Load(out)
	require.NoError(t, err)
	defer model.Close()
	x, diff, bound := ioOutput(t, model, "mixed", 0)
	require.LessOrEqual(t, diff, bound)
	values := mustFloat32s(t, x)
	for i := range values {
		values[i] += 0.1
	}
	shifted, err := torch.FromFloat32(values, x.Shape()...)
	require.NoError(t, err)
	defer shifted.Close()
	target, err := model.Forward(x)
	require.NoError(t, err)
	defer target[0].Close()
	losses := fineTune(t, model, shifted, target[0], torch.SGDOptions{LR: 0.1, Momentum: 0.9})
	for i := 1; i < len(losses); i++ {
		assert.Less(t, losses[i], losses[i-1], "step %d lowers the loss", i)
	}

	// Python loads the tuned state dict into AMCT's decomposed eager model,
	// and runs the tuned TorchScript file: both give Go's output.
	require.NoError(t, model.Eval())
	tunedPath := filepath.Join(dir, "tuned.pt")
	statePath := filepath.Join(dir, "state.pt")
	require.NoError(t, model.Save(tunedPath))
	require.NoError(t, model.SaveStateDict(statePath))
	outputs, err := model.Forward(x)
	require.NoError(t, err)
	inputCopy, err := torch.FromFloat32(mustFloat32s(t, x), x.Shape()...)
	require.NoError(t, err)
	io := torch.NewStateDict()
	defer io.Close()
	io.Set("input", inputCopy)
	io.Set("output", outputs[0])
	ioPath := filepath.Join(dir, "io.pt")
	require.NoError(t, io.Save(ioPath))

	report := testutil.RunPython(t, "finetune_check.py", "mixed", "--state", statePath,
		"--io", ioPath, "--script", tunedPath)
	assert.Contains(t, report, "ok   mixed")
}

func mustFloat32s(t *testing.T, x *torch.Tensor) []float32 {
	t.Helper()
	values, err := x.Float32s()
	require.NoError(t, err)
	return values
}

func TestApplyWeightsErrors(t *testing.T) {
	cases := []struct {
		name     string
		weights  string
		messages []string
	}{
		{"other model's weights", testutil.AMCT("lowrank", "decomposed_state.pt"),
			[]string{"state dict does not match the module", "missing keys (23)", "unexpected keys (11)", "stem.weight", "a.0.weight"}},
		{"missing file", filepath.Join(os.TempDir(), "convsplit-no-such-state.pt"),
			[]string{"convsplit-no-such-state.pt", "no such file"}},
		{"TorchScript file", testutil.Fixture(t, "mixed"),
			[]string{"TorchScript archive"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.pt")
			code, _, stderr := runWeights("apply", "-model", testutil.Fixture(t, "mixed"),
				"-info", testutil.AMCT("mixed", "decompose_info.json"), "-weights", tc.weights, "-o", out)
			assert.Equal(t, 1, code)
			for _, message := range tc.messages {
				assert.Contains(t, stderr, message)
			}
			_, err := os.Stat(out)
			assert.ErrorIs(t, err, os.ErrNotExist, "nothing is written after an error")
		})
	}
}

func TestApplyWeightsDryRun(t *testing.T) {
	weights := testutil.AMCT("mixed", "decomposed_state.pt")
	code, stdout, stderr := runWeights("apply", "-model", testutil.Fixture(t, "mixed"),
		"-info", testutil.AMCT("mixed", "decompose_info.json"), "-weights", weights, "-dry-run")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "loaded 23 tensors from "+weights)
	assert.Contains(t, stdout, "dry run: nothing written")
}
