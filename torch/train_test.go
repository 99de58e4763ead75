package torch_test

import (
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// sgdCase is one run of a few SGD steps, made in Python with
// torch.optim.SGD and in Go with the same settings.
type sgdCase struct {
	name string
	loss string // "cross_entropy" or "mse"
	opts torch.SGDOptions
}

var sgdCases = []sgdCase{
	{"plain_cross_entropy", "cross_entropy", torch.SGDOptions{LR: 0.1}},
	{"momentum_weight_decay", "cross_entropy", torch.SGDOptions{LR: 0.1, Momentum: 0.9, WeightDecay: 1e-2}},
	{"nesterov_mse", "mse", torch.SGDOptions{LR: 0.05, Momentum: 0.9, Nesterov: true}},
	{"dampening_mse", "mse", torch.SGDOptions{LR: 0.05, Momentum: 0.9, Dampening: 0.5, WeightDecay: 1e-3}},
}

const sgdSteps = 3

// pythonSGD writes small.pt (a scripted model), data.pt (input x, class
// labels and an MSE target) and, for each case NAME, NAME.pt (the state dict
// after the steps) and NAME_losses.pt (the loss of each step).
const pythonSGD = `
import collections, json, os, sys, torch
out, cases, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))

torch.manual_seed(0)
initial = Small()
torch.jit.script(initial).save(os.path.join(out, 'small.pt'))
x = torch.randn(4, 3, 8, 8)
labels = torch.tensor([0, 3, 1, 4])
target = torch.randn(4, 5)
torch.save({'x': x, 'labels': labels, 'target': target}, os.path.join(out, 'data.pt'))
for case in cases:
    model = Small()
    model.load_state_dict(initial.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=case['lr'], momentum=case['momentum'],
                          dampening=case['dampening'], weight_decay=case['weight_decay'],
                          nesterov=case['nesterov'])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        if case['loss'] == 'mse':
            loss = torch.nn.functional.mse_loss(logits, target)
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.save(model.state_dict(), os.path.join(out, case['name'] + '.pt'))
    torch.save({'losses': torch.tensor(losses, dtype=torch.float64)}, os.path.join(out, case['name'] + '_losses.pt'))
`

func sgdCasesJSON() string {
	s := "["
	for i, c := range sgdCases {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf(`{"name": %q, "loss": %q, "lr": %g, "momentum": %g, "dampening": %g, "weight_decay": %g, "nesterov": %t}`,
			c.name, c.loss, c.opts.LR, c.opts.Momentum, c.opts.Dampening, c.opts.WeightDecay, c.opts.Nesterov)
	}
	return s + "]"
}

// trainSteps runs steps of SGD on one batch and returns each step's loss,
// computed before that step's update as Python's loop does.
func trainSteps(t *testing.T, model *torch.Module, opts torch.SGDOptions, steps int, x *torch.Tensor,
	lossFn func(out *torch.Tensor) (*torch.Tensor, error)) []float64 {
	t.Helper()
	require.NoError(t, model.Train(true))
	params, err := model.Parameters()
	require.NoError(t, err)
	optimizer, err := torch.NewSGD(params, opts)
	require.NoError(t, err)
	defer optimizer.Close()

	losses := make([]float64, steps)
	for i := range losses {
		require.NoError(t, optimizer.ZeroGrad())
		out, err := model.ForwardTrain(x)
		require.NoError(t, err)
		require.Len(t, out, 1)
		loss, err := lossFn(out[0])
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

func TestSGDMatchesPython(t *testing.T) {
	dir := t.TempDir()
	// torch.jit.script reads the class's source, so the code runs from a file.
	script := filepath.Join(dir, "sgd.py")
	require.NoError(t, os.WriteFile(script, []byte(pythonSGD), 0o644))
	testutil.PythonCode(t, "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
		script, dir, sgdCasesJSON(), fmt.Sprint(sgdSteps))
	data, err := torch.LoadStateDictFile(filepath.Join(dir, "data.pt"))
	require.NoError(t, err)
	defer data.Close()
	x, _ := data.Get("x")
	labels, _ := data.Get("labels")
	target, _ := data.Get("target")
	require.Equal(t, torch.Int64, labels.DType())

	for _, tc := range sgdCases {
		t.Run(tc.name, func(t *testing.T) {
			model, err := torch.Load(filepath.Join(dir, "small.pt"))
			require.NoError(t, err)
			defer model.Close()
			losses := trainSteps(t, model, tc.opts, sgdSteps, x, func(out *torch.Tensor) (*torch.Tensor, error) {
				if tc.loss == "mse" {
					return torch.MSELoss(out, target)
				}
				return torch.CrossEntropyLoss(out, labels)
			})

			pyLosses, err := torch.LoadStateDictFile(filepath.Join(dir, tc.name+"_losses.pt"))
			require.NoError(t, err)
			defer pyLosses.Close()
			want, _ := pyLosses.Get("losses")
			wantLosses, err := want.Float64s()
			require.NoError(t, err)
			assert.InDeltaSlice(t, wantLosses, losses, 1e-5)

			pyState, err := torch.LoadStateDictFile(filepath.Join(dir, tc.name+".pt"))
			require.NoError(t, err)
			defer pyState.Close()
			goState, err := torch.StateDictOf(model)
			require.NoError(t, err)
			defer goState.Close()
			require.Equal(t, pyState.Keys(), goState.Keys())
			for _, key := range pyState.Keys() {
				wantParam, _ := pyState.Get(key)
				gotParam, _ := goState.Get(key)
				assert.LessOrEqual(t, maxAbsDifference(t, valuesOf(t, gotParam), valuesOf(t, wantParam)), 1e-5, key)
			}
		})
	}
}

func TestParametersListsSharedOnce(t *testing.T) {
	model := loadDecomposed(t, "shared_weight")
	params, err := model.Parameters()
	require.NoError(t, err)
	names := make([]string, len(params))
	for i, p := range params {
		names[i] = p.Name
		assert.True(t, p.Tensor.RequiresGrad(), p.Name)
	}
	assert.Equal(t, []string{"c1.0.weight", "c1.1.weight"}, names)
}

func TestParametersAreTheModules(t *testing.T) {
	model := loadDecomposed(t, "mixed")
	params, err := model.Parameters()
	require.NoError(t, err)
	entries, err := model.StateDict()
	require.NoError(t, err)
	var want []string
	for _, e := range entries {
		if e.Parameter {
			want = append(want, e.Name)
		}
	}
	names := make([]string, len(params))
	for i, p := range params {
		names[i] = p.Name
	}
	assert.Equal(t, want, names)

	conv, err := model.Submodule("down.0")
	require.NoError(t, err)
	defer conv.Close()
	weight, err := conv.Parameter("weight")
	require.NoError(t, err)
	defer weight.Close()
	assert.True(t, params[2].Tensor.Same(weight), "%s is the module's parameter", params[2].Name)
}

func TestGradAfterBackward(t *testing.T) {
	model := loadDecomposed(t, "root_conv")
	params, err := model.Parameters()
	require.NoError(t, err)
	require.NotEmpty(t, params)
	grad, err := params[0].Tensor.Grad()
	require.NoError(t, err)
	assert.Nil(t, grad, "no gradient before the first backward")

	x := randomInput(t, 1, 1, 64, 8, 8)
	out, err := model.ForwardTrain(x)
	require.NoError(t, err)
	zeros, err := torch.FromFloat32(make([]float32, out[0].Numel()), out[0].Shape()...)
	require.NoError(t, err)
	loss, err := torch.MSELoss(out[0], zeros)
	require.NoError(t, err)
	require.NoError(t, loss.Backward())

	grad, err = params[0].Tensor.Grad()
	require.NoError(t, err)
	require.NotNil(t, grad)
	assert.Equal(t, params[0].Tensor.Shape(), grad.Shape())
	assert.Greater(t, maxAbsValue(valuesOf(t, grad)), 0.0)
}

func TestBackwardNeedsForwardTrain(t *testing.T) {
	model := loadDecomposed(t, "root_conv")
	x := randomInput(t, 1, 1, 64, 8, 8)
	out, err := model.Forward(x)
	require.NoError(t, err)
	zeros, err := torch.FromFloat32(make([]float32, out[0].Numel()), out[0].Shape()...)
	require.NoError(t, err)
	loss, err := torch.MSELoss(out[0], zeros)
	require.NoError(t, err)

	err = loss.Backward()
	require.ErrorIs(t, err, torch.ErrTorch)
	assert.Contains(t, err.Error(), "ForwardTrain")
}

func TestLossErrors(t *testing.T) {
	a, err := torch.FromFloat32(make([]float32, 6), 2, 3)
	require.NoError(t, err)
	b, err := torch.FromFloat32(make([]float32, 4), 2, 2)
	require.NoError(t, err)
	labels, err := torch.FromInt64([]int64{0, 7}, 2)
	require.NoError(t, err)
	floatLabels, err := torch.FromFloat32([]float32{0, 1}, 2)
	require.NoError(t, err)

	cases := []struct {
		name    string
		run     func() (*torch.Tensor, error)
		message string
	}{
		{"mse shapes", func() (*torch.Tensor, error) { return torch.MSELoss(a, b) }, "differs from target shape"},
		{"class out of range", func() (*torch.Tensor, error) { return torch.CrossEntropyLoss(a, labels) }, "out of bounds"},
		{"float labels", func() (*torch.Tensor, error) { return torch.CrossEntropyLoss(a, floatLabels) }, ""},
		{"closed input", func() (*torch.Tensor, error) { return torch.MSELoss(nil, b) }, "closed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			loss, err := tc.run()
			require.Error(t, err)
			assert.Nil(t, loss)
			assert.Contains(t, err.Error(), tc.message)
		})
	}
}

func TestLossValues(t *testing.T) {
	logits, err := torch.FromFloat32([]float32{1, 2, 3, 0, 0, 0}, 2, 3)
	require.NoError(t, err)
	labels, err := torch.FromInt64([]int64{2, 0}, 2)
	require.NoError(t, err)
	target, err := torch.FromFloat32([]float32{1, 2, 2, 0, 1, 0}, 2, 3)
	require.NoError(t, err)

	ce, err := torch.CrossEntropyLoss(logits, labels)
	require.NoError(t, err)
	got, err := ce.Item()
	require.NoError(t, err)
	want := (math.Log(math.Exp(1)+math.Exp(2)+math.Exp(3)) - 3 + math.Log(3)) / 2
	assert.InDelta(t, want, got, 1e-6)

	mse, err := torch.MSELoss(logits, target)
	require.NoError(t, err)
	got, err = mse.Item()
	require.NoError(t, err)
	assert.InDelta(t, 2.0/6, got, 1e-7)

	_, err = logits.Item()
	assert.ErrorContains(t, err, "6 elements")
}

func TestSGDOptionsInvalid(t *testing.T) {
	model := loadDecomposed(t, "root_conv")
	params, err := model.Parameters()
	require.NoError(t, err)
	cases := []struct {
		name   string
		params []torch.NamedTensor
		opts   torch.SGDOptions
	}{
		{"zero learning rate", params, torch.SGDOptions{}},
		{"negative learning rate", params, torch.SGDOptions{LR: -1}},
		{"NaN learning rate", params, torch.SGDOptions{LR: math.NaN()}},
		{"negative momentum", params, torch.SGDOptions{LR: 0.1, Momentum: -0.5}},
		{"negative dampening", params, torch.SGDOptions{LR: 0.1, Dampening: -1}},
		{"negative weight decay", params, torch.SGDOptions{LR: 0.1, WeightDecay: -1}},
		{"nesterov without momentum", params, torch.SGDOptions{LR: 0.1, Nesterov: true}},
		{"nesterov with dampening", params, torch.SGDOptions{LR: 0.1, Momentum: 0.9, Dampening: 0.1, Nesterov: true}},
		{"no parameters", nil, torch.SGDOptions{LR: 0.1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			optimizer, err := torch.NewSGD(tc.params, tc.opts)
			assert.ErrorIs(t, err, torch.ErrInvalidOptions)
			assert.Nil(t, optimizer)
		})
	}

	optimizer, err := torch.NewSGD(params, torch.SGDOptions{LR: 0.1})
	require.NoError(t, err)
	optimizer.Close()
	assert.ErrorIs(t, optimizer.Step(), torch.ErrClosed)
	assert.ErrorIs(t, optimizer.ZeroGrad(), torch.ErrClosed)
}

// randomInput returns a tensor of normal values drawn from Go's generator.
func randomInput(t *testing.T, seed int64, shape ...int64) *torch.Tensor {
	t.Helper()
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	rng := rand.New(rand.NewSource(seed))
	values := make([]float32, n)
	for i := range values {
		values[i] = float32(rng.NormFloat64())
	}
	x, err := torch.FromFloat32(values, shape...)
	require.NoError(t, err)
	t.Cleanup(x.Close)
	return x
}

// fineTuneCases are the AMCT models fine-tuned to match their original on
// random inputs. lowrank's planted weights are about 50 times larger than
// default ones, which makes its outputs near 1e7 and its gradients so large
// that only a learning rate near 3e-15 lowers the loss.
var fineTuneCases = []struct {
	name  string
	input []int64
	opts  torch.SGDOptions
}{
	{"mixed", []int64{2, 3, 32, 32}, torch.SGDOptions{LR: 0.1, Momentum: 0.9}},
	{"lowrank", []int64{2, 256, 16, 16}, torch.SGDOptions{LR: 3e-15, Momentum: 0.9}},
}

func TestFineTuneDecomposed(t *testing.T) {
	for _, tc := range fineTuneCases {
		t.Run(tc.name, func(t *testing.T) {
			teacher, err := torch.Load(testutil.Fixture(t, tc.name))
			require.NoError(t, err)
			defer teacher.Close()
			x := randomInput(t, 1, tc.input...)
			target := evalForward(t, teacher, x)

			model := loadDecomposed(t, tc.name)
			_, err = model.LoadStateDictFromFile(testutil.AMCT(tc.name, "decomposed_state.pt"), true)
			require.NoError(t, err)
			losses := trainSteps(t, model, tc.opts, 10, x, func(out *torch.Tensor) (*torch.Tensor, error) {
				return torch.MSELoss(out, target)
			})
			t.Logf("losses: %.4g", losses)
			for i := 1; i < len(losses); i++ {
				assert.Less(t, losses[i], losses[i-1], "step %d lowers the loss", i)
			}

			// Python reads what Go saved and computes Go's output from it.
			dir := t.TempDir()
			statePath := filepath.Join(dir, "state.pt")
			scriptPath := filepath.Join(dir, "model.pt")
			ioPath := filepath.Join(dir, "io.pt")
			require.NoError(t, model.SaveStateDict(statePath))
			require.NoError(t, model.Save(scriptPath))
			io := torch.NewStateDict()
			defer io.Close()
			ioInput, _ := readIOFile(t, testutil.AMCT(tc.name, "io.pt"))
			output := evalForward(t, model, ioInput)
			input, err := torch.FromFloat32(valuesOf(t, ioInput), ioInput.Shape()...)
			require.NoError(t, err)
			io.Set("input", input)
			io.Set("output", output)
			require.NoError(t, io.Save(ioPath))

			out := testutil.RunPython(t, "finetune_check.py", tc.name, "--state", statePath, "--io", ioPath, "--script", scriptPath)
			t.Log(out)
			assert.Contains(t, out, "ok   "+tc.name)
		})
	}
}
