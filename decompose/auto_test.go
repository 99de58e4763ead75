package decompose_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// largeEnv enables the tests and benchmarks on resnet50 and vgg16, whose
// fixtures take a while to generate (vgg16's TorchScript file is 528 MB).
const largeEnv = "CONVSPLIT_LARGE"

// quietLogger discards Auto's records, which tests that do not check them
// would otherwise print.
func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(nopWriter{}, &slog.HandlerOptions{Level: slog.LevelError}))
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

// runAuto runs Auto with a quiet logger and fails the test on error.
func runAuto(t *testing.T, model *torch.Module) (*torch.Module, decompose.Changes, *decompose.Info) {
	t.Helper()
	result, changes, info, err := decompose.Auto(model, decompose.AutoOptions{Logger: quietLogger()})
	require.NoError(t, err)
	if !result.SameObject(model) {
		t.Cleanup(result.Close)
	}
	return result, changes, info
}

// checkAutoMatchesAMCT runs Auto on the fixture and compares the information
// with AMCT's file byte for byte and the changes with AMCT's.
func checkAutoMatchesAMCT(t *testing.T, fixture, amctName string) {
	model := loadModel(t, testutil.Fixture(t, fixture))
	result, changes, info := runAuto(t, model)

	want, err := os.ReadFile(testutil.AMCT(amctName, "decompose_info.json"))
	require.NoError(t, err)
	assert.Equal(t, string(want), string(info.Marshal()), "decompose_info.json")
	assert.Equal(t, readReference(t, amctName).changes, changes, "changes")

	state, err := result.StateDict()
	require.NoError(t, err)
	shapes := make(map[string][]int64, len(state))
	for _, e := range state {
		shapes[e.Name] = e.Shape
	}
	for _, e := range info.Entries {
		prefix := e.Layer.Name + "."
		if e.Layer.Name == "" {
			prefix = ""
		}
		assert.Equal(t, int64s(e.FirstShape), shapes[prefix+"0.weight"], "%s first weight", e.Layer.Name)
		assert.Equal(t, int64s(e.LastShape), shapes[prefix+"1.weight"], "%s last weight", e.Layer.Name)
	}
}

func int64s(values [4]int) []int64 {
	out := make([]int64, len(values))
	for i, v := range values {
		out[i] = int64(v)
	}
	return out
}

func TestAutoMatchesAMCT(t *testing.T) {
	tests := []struct{ fixture, amct string }{
		{"resnet18", "resnet18"},
		{"resnet18_traced", "resnet18"},
		{"mixed", "mixed"},
		{"mixed_traced", "mixed"},
		{"lowrank", "lowrank"},
		{"root_conv", "root_conv"},
		{"shared_weight", "shared_weight"},
	}
	for _, tt := range tests {
		t.Run(tt.fixture, func(t *testing.T) {
			checkAutoMatchesAMCT(t, tt.fixture, tt.amct)
		})
	}
}

func TestAutoMatchesAMCTLarge(t *testing.T) {
	if os.Getenv(largeEnv) != "1" {
		t.Skipf("set %s=1 to run Auto on resnet50 and vgg16", largeEnv)
	}
	for _, name := range []string{"resnet50", "vgg16"} {
		t.Run(name, func(t *testing.T) {
			checkAutoMatchesAMCT(t, name, name)
		})
	}
}

// compareWithAMCT is Python that compares the restructured model in argv[2]
// with AMCT's decomposed weights and outputs for zoo model argv[1]. For each
// decomposed layer it prints the relative reconstruction error
// ||W - W_pair|| / ||W|| of convsplit's pair and of AMCT's, and the largest
// output difference on io.pt's input.
const compareWithAMCT = `
import json, os, sys, torch
name, ours_path, amct_dir = sys.argv[1:4]
sys.path.insert(0, amct_dir)
import zoo_models

def compose(first, last):
    # One of the two kernels is 1 along each axis.
    w = torch.einsum('ojab,jicd->oiacbd', last.double(), first.double())
    o, i, a, c, b, d = w.shape
    return w.reshape(o, i, a * c, b * d)

original = zoo_models.build(name).eval()
ours = torch.jit.load(ours_path).eval()
ours_state = ours.state_dict()
amct_state = torch.load(os.path.join(amct_dir, name, 'decomposed_state.pt'))
errors = {}
biases = {}
for layer, module in original.named_modules():
    if not isinstance(module, torch.nn.Conv2d):
        continue
    prefix = layer + '.' if layer else ''
    if prefix + '0.weight' not in amct_state:
        continue
    w = module.weight.detach().double()
    def error(state):
        pair = compose(state[prefix + '0.weight'], state[prefix + '1.weight'])
        return (torch.linalg.norm(w - pair) / torch.linalg.norm(w)).item()
    errors[layer] = [error(ours_state), error(amct_state)]
    if module.bias is not None:
        biases[layer] = bool(torch.equal(ours_state[prefix + '1.bias'], module.bias.detach()))
io = torch.load(os.path.join(amct_dir, name, 'io.pt'))
with torch.no_grad():
    output = ours(io['input'])
print(json.dumps({'errors': errors, 'biases': biases,
                  'output_diff': (output - io['output']).abs().max().item(),
                  'output_max': io['output'].abs().max().item()}))
`

func TestAutoWeightsMatchAMCT(t *testing.T) {
	for _, name := range []string{"mixed", "lowrank"} {
		t.Run(name, func(t *testing.T) {
			model := loadModel(t, testutil.Fixture(t, name))
			result, changes, _ := runAuto(t, model)
			saved := filepath.Join(t.TempDir(), name+".pt")
			require.NoError(t, result.Save(saved))

			var report struct {
				Errors     map[string][2]float64 `json:"errors"`
				Biases     map[string]bool       `json:"biases"`
				OutputDiff float64               `json:"output_diff"`
				OutputMax  float64               `json:"output_max"`
			}
			out := testutil.PythonCode(t, compareWithAMCT, name, saved, testutil.AMCT())
			require.NoError(t, json.Unmarshal([]byte(out), &report), out)

			require.Len(t, report.Errors, len(changes), "decomposed layers")
			for layer, e := range report.Errors {
				assert.InDelta(t, e[1], e[0], 1e-6, "%s: relative reconstruction error, convsplit against AMCT", layer)
			}
			for layer, equal := range report.Biases {
				assert.True(t, equal, "%s: the last layer's bias equals the original", layer)
			}
			// lowrank's planted weights are not scaled by their fan-in, so its
			// outputs reach 1e7 and float32 rounding alone differs by more than
			// 1e-4. The tolerance is relative to the largest output above 1.
			tolerance := 1e-4 * max(1, report.OutputMax)
			assert.LessOrEqual(t, report.OutputDiff, tolerance, "largest output difference from AMCT's model (largest output %g)", report.OutputMax)
		})
	}
}

// structure lists what Network must rebuild: module names and classes,
// Conv2d geometry and the state dict.
type structure struct {
	Modules []string
	Convs   map[string]torch.Conv2d
	State   []torch.StateEntry
}

func readStructure(t *testing.T, m *torch.Module) structure {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	s := structure{Convs: map[string]torch.Conv2d{}}
	for _, info := range modules {
		s.Modules = append(s.Modules, info.Name+" "+info.Class)
		if !info.Conv2d {
			continue
		}
		sub, err := m.Submodule(info.Name)
		require.NoError(t, err)
		conv, err := sub.Conv2d()
		sub.Close()
		require.NoError(t, err)
		s.Convs[info.Name] = conv
	}
	s.State, err = m.StateDict()
	require.NoError(t, err)
	return s
}

func TestAutoInfoRebuildsWithNetwork(t *testing.T) {
	for _, name := range []string{"mixed", "shared_weight", "root_conv", "resnet18_traced"} {
		t.Run(name, func(t *testing.T) {
			path := testutil.Fixture(t, name)
			result, changes, info := runAuto(t, loadModel(t, path))
			infoPath := filepath.Join(t.TempDir(), "decompose_info.json")
			require.NoError(t, info.WriteFile(infoPath))

			rebuilt, rebuiltChanges, err := decompose.Network(loadModel(t, path), infoPath)
			require.NoError(t, err)
			defer rebuilt.Close()
			assert.Equal(t, changes, rebuiltChanges, "changes")
			assert.Equal(t, readStructure(t, result), readStructure(t, rebuilt))
		})
	}
}

func TestAutoSharedWeight(t *testing.T) {
	model := loadModel(t, testutil.Fixture(t, "shared_weight"))
	_, changes, _ := runAuto(t, model)
	require.Len(t, changes, 2)

	for _, key := range []string{"0.weight", "1.weight"} {
		a := parameter(t, model, "c1."+key)
		b := parameter(t, model, "c2."+key)
		assert.True(t, a.Same(b), "c1.%s and c2.%s are one tensor", key, key)
	}
}

func TestAutoRootConv(t *testing.T) {
	model := loadModel(t, testutil.Fixture(t, "root_conv"))
	before := parameter(t, model, "weight")
	result, changes, _ := runAuto(t, model)

	assert.False(t, result.SameObject(model), "a new Sequential is returned")
	assert.Equal(t, decompose.Changes{{Layer: "", NewLayers: [2]string{"0", "1"}}}, changes)
	conv, err := model.Conv2d()
	require.NoError(t, err, "the original model is still a Conv2d")
	assert.Equal(t, 64, conv.InChannels)
	assert.True(t, before.Same(parameter(t, model, "weight")), "the original weight stays")
	assert.Equal(t, []int64{128, 32, 1, 3}, parameter(t, result, "1.weight").Shape())
}

// dtypeModel is Python that scripts a model with a float16, a float64, a
// channels-last, a bfloat16 and a frozen Conv2d and two layers sharing a
// bias, and saves it to argv[1].
const dtypeModel = `
import sys, torch, torch.nn as nn

class DTypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.f16 = nn.Conv2d(64, 64, 3, padding=1).half()
        self.f64 = nn.Conv2d(64, 96, 3, padding=1).double()
        self.cl = nn.Conv2d(96, 64, (5, 3), padding=(2, 1)).to(memory_format=torch.channels_last)
        self.bf16 = nn.Conv2d(64, 64, 3, padding=1).bfloat16()
        self.frozen = nn.Conv2d(64, 64, 3, padding=1)
        self.frozen.weight.requires_grad_(False)
        self.shared_a = nn.Conv2d(64, 64, 3, padding=1)
        self.shared_b = nn.Conv2d(64, 64, (3, 5), padding=(1, 2))
        self.shared_b.bias = self.shared_a.bias

    def forward(self, x):
        y = torch.cat([self.f16(x.half()).float(), self.f64(x.double()).float()[:, :32]], 1)
        y = self.cl(y) + self.bf16(x.to(torch.bfloat16)).float()
        return self.shared_b(self.shared_a(self.frozen(y)))

torch.manual_seed(1)
torch.jit.script(DTypes().eval()).save(sys.argv[1])
`

// optimalErrors is Python that compares pairs with the optimal rank-r
// approximation. For each layer of the JSON object argv[3] (layer to mode),
// it prints the relative reconstruction error of the pair in the model
// argv[2] and the optimal error from an SVD of the original weight in the
// model argv[1].
const optimalErrors = `
import json, sys, torch
original = torch.jit.load(sys.argv[1])
ours = torch.jit.load(sys.argv[2])
modes = json.loads(sys.argv[3])

def unfold(w, mode):
    if mode.endswith('SK'):
        w = w.permute(0, 1, 3, 2)
    w = w.permute(0, 2, 1, 3) if mode.startswith('FC') else w.permute(1, 2, 0, 3)
    a, ka, b, kb = w.shape
    return w.reshape(a * ka, b * kb)

result = {}
for layer, mode in modes.items():
    w = getattr(original, layer).weight.detach().double()
    pair = getattr(ours, layer)
    first, last = getattr(pair, '0').weight.detach().double(), getattr(pair, '1').weight.detach().double()
    c = torch.einsum('ojab,jicd->oiacbd', last, first)
    o, i, a, k, b, d = c.shape
    c = c.reshape(o, i, a * k, b * d)
    s = torch.linalg.svdvals(unfold(w, mode))
    r = first.shape[0]
    result[layer] = [(torch.linalg.norm(w - c) / torch.linalg.norm(w)).item(),
                     (s[r:].square().sum().sqrt() / s.square().sum().sqrt()).item()]
print(json.dumps(result))
`

// runPythonFile runs Python source from a file, because torch.jit.script
// reads the source of the classes it compiles, which code run with -c lacks.
func runPythonFile(t *testing.T, code string, args ...string) {
	t.Helper()
	testutil.RequirePython(t)
	script := filepath.Join(t.TempDir(), "script.py")
	require.NoError(t, os.WriteFile(script, []byte(code), 0o644))
	out, err := exec.Command(testutil.Python, append([]string{script}, args...)...).CombinedOutput()
	require.NoError(t, err, "%s", out)
}

func TestAutoDTypesAndSharing(t *testing.T) {
	dir := t.TempDir()
	original := filepath.Join(dir, "dtypes.pt")
	runPythonFile(t, dtypeModel, original)
	model := loadModel(t, original)
	sharedBias := parameter(t, model, "shared_a.bias")

	var logs bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	_, changes, info, err := decompose.Auto(model, decompose.AutoOptions{Logger: logger})
	require.NoError(t, err)

	var decomposed []string
	modes := map[string]decompose.Mode{}
	for _, e := range info.Entries {
		decomposed = append(decomposed, e.Layer.Name)
		modes[e.Layer.Name] = e.Mode
	}
	assert.Equal(t, []string{"f16", "f64", "cl", "frozen", "shared_a", "shared_b"}, decomposed, "bf16 is left unchanged")
	assert.Len(t, changes, 6)
	assert.Equal(t, decompose.FCSK, modes["cl"])
	assert.Contains(t, logs.String(), `"level":"WARN","msg":"layer left unchanged: weight dtype not supported, want float16, float32 or float64","layer":"bf16"`)

	tests := []struct {
		key          string
		dtype        torch.DType
		channelsLast bool
		requiresGrad bool
	}{
		{"f16.0.weight", torch.Float16, false, true},
		{"f16.1.weight", torch.Float16, false, true},
		{"f16.1.bias", torch.Float16, false, true},
		{"f64.0.weight", torch.Float64, false, true},
		{"f64.1.weight", torch.Float64, false, true},
		{"cl.0.weight", torch.Float32, true, true},
		{"cl.1.weight", torch.Float32, true, true},
		{"frozen.0.weight", torch.Float32, false, false},
		{"frozen.1.weight", torch.Float32, false, false},
		{"bf16.weight", torch.BFloat16, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			p := parameter(t, model, tt.key)
			assert.Equal(t, tt.dtype, p.DType(), "dtype")
			assert.Equal(t, tt.channelsLast, p.ChannelsLast(), "channels-last")
			assert.Equal(t, tt.requiresGrad, p.RequiresGrad(), "requires_grad")
		})
	}

	a := parameter(t, model, "shared_a.1.bias")
	b := parameter(t, model, "shared_b.1.bias")
	assert.True(t, a.Same(b), "the new layers share the copied bias")
	assert.False(t, a.Same(sharedBias), "the bias is a copy")
	assert.Equal(t, float32s(t, sharedBias), float32s(t, a), "bias values")

	saved := filepath.Join(dir, "auto.pt")
	require.NoError(t, model.Save(saved))
	modeJSON, err := json.Marshal(modes)
	require.NoError(t, err)
	var errorsByLayer map[string][2]float64
	out := testutil.PythonCode(t, optimalErrors, original, saved, string(modeJSON))
	require.NoError(t, json.Unmarshal([]byte(out), &errorsByLayer), out)
	for layer, e := range errorsByLayer {
		// float16 factors round to 11 bits.
		delta := 1e-6
		if layer == "f16" {
			delta = 2e-3
		}
		assert.InDelta(t, e[1], e[0], delta, "%s: reconstruction error against the optimal rank-r error", layer)
	}
}

func TestAutoNonFiniteWeight(t *testing.T) {
	cases := []struct {
		name  string
		value float32
	}{
		{"NaN", float32(math.NaN())},
		{"Inf", float32(math.Inf(1))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			model := loadModel(t, testutil.Fixture(t, "mixed"))
			tall, err := model.Submodule("tall")
			require.NoError(t, err)
			defer tall.Close()
			weight, err := tall.Parameter("weight")
			require.NoError(t, err)
			data := float32s(t, weight)
			data[1234] = tc.value
			broken, err := torch.FromFloat32(data, weight.Shape()...)
			require.NoError(t, err)
			require.NoError(t, tall.SetParameter("weight", broken))
			before := readStructure(t, model)

			_, _, _, err = decompose.Auto(model, decompose.AutoOptions{Logger: quietLogger()})
			require.Error(t, err)
			assert.True(t, errors.Is(err, decompose.ErrNonFiniteWeight), "errors.Is ErrNonFiniteWeight: %v", err)
			assert.Contains(t, err.Error(), "layer tall")
			assert.Equal(t, before, readStructure(t, model), "the model is unchanged")
		})
	}
}

func TestAutoProgressAndLog(t *testing.T) {
	model := loadModel(t, testutil.Fixture(t, "mixed"))
	type call struct {
		done, total int
		layer       string
	}
	var calls []call
	var logs bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	_, _, _, err := decompose.Auto(model, decompose.AutoOptions{
		Logger:   logger,
		Progress: func(done, total int, layer string) { calls = append(calls, call{done, total, layer}) },
	})
	require.NoError(t, err)

	assert.Equal(t, []call{
		{1, 6, "down"}, {2, 6, "tall"}, {3, 6, "squeeze"},
		{4, 6, "blocks.0"}, {5, 6, "blocks.1"}, {6, 6, "tail.0.1"},
	}, calls)

	type record struct {
		Level, Msg, Layer, Mode, Reason string
		L, M, Estimate, Rank            int
		Seconds                         *float64
	}
	decomposed := map[string]record{}
	unchanged := map[string]string{}
	warned := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var r record
		require.NoError(t, json.Unmarshal([]byte(line), &r), line)
		switch {
		case r.Msg == "decomposed layer":
			decomposed[r.Layer] = r
		case r.Msg == "layer left unchanged":
			unchanged[r.Layer] = r.Reason
		case r.Level == "WARN":
			warned[r.Layer] = true
		}
	}
	require.Contains(t, decomposed, "tall")
	tall := decomposed["tall"]
	assert.Equal(t, record{Level: "DEBUG", Msg: "decomposed layer", Layer: "tall", Mode: "SCSK", L: 768, M: 1280, Rank: 160, Seconds: tall.Seconds}, tall)
	require.NotNil(t, tall.Seconds, "seconds")
	assert.Len(t, decomposed, 6)
	assert.Equal(t, map[string]string{
		"stem":    "smaller kernel side x smaller channel count is 3 x 3, below 16",
		"heads.a": "smaller kernel side 1 is below 3",
		"heads.b": "groups is 2 (only 1 is decomposed)",
	}, unchanged)
	// The weights are random, so every estimate is 0.
	assert.Len(t, warned, 6, "a warning per estimate of 0")
	assert.True(t, warned["down"], "warning names the layer")
}

func TestAutoNothingEligible(t *testing.T) {
	path := filepath.Join(t.TempDir(), "small.pt")
	testutil.PythonCode(t, `
import sys, torch
torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=2))).save(sys.argv[1])
`, path)
	model := loadModel(t, path)
	before := readStructure(t, model)

	result, changes, info := runAuto(t, model)
	assert.True(t, result.SameObject(model), "the model itself is returned")
	assert.Empty(t, changes)
	assert.Equal(t, "[]", string(info.Marshal()))
	assert.Equal(t, before, readStructure(t, model))
}
