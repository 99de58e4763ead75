package decompose_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// The tests in this file restructure the models of scripts/shape_models.py:
// the shapes of models users bring (nested containers, layers a traced
// parent calls several times, interface-typed attributes, other dtypes and
// memory formats, every padding mode, padding='same', class types shared by
// several modules, resnet18) and models convsplit must reject. The script
// builds them once into the fixture folder, with the output and parameters
// that scripts/amct_eager.py, an eager re-implementation of AMCT's
// decompose_network, gives for the same seed, and checks from Python what Go
// saved. Like the other tests of this package, they draw from libtorch's
// global generator, so none runs in parallel.

// shapeOutputRTol is the allowed output difference, relative to the largest
// absolute value of the expected output.
const shapeOutputRTol = 1e-5

// shapeTensorFile describes a raw tensor file of scripts/shape_models.py:
// little-endian values in row-major order.
type shapeTensorFile struct {
	File  string  `json:"file"`
	Shape []int64 `json:"shape"`
	DType string  `json:"dtype"`
}

// shapeChange is one change as manifest.json lists it.
type shapeChange struct {
	Layer     string    `json:"layer"`
	NewLayers [2]string `json:"new_layers"`
}

// shapeCase is one case of manifest.json.
type shapeCase struct {
	Model     string `json:"model"`
	Info      string `json:"info"`
	Form      string `json:"form"`
	Decompose bool   `json:"decompose"`
	// ParameterDType is the dtype of the model's parameters. Input is in
	// float32 when it is float16, because torch 1.13 has no float16
	// convolution on the CPU.
	ParameterDType string          `json:"parameter_dtype"`
	Input          shapeTensorFile `json:"input"`
	// The fields below are set for cases that decompose.
	Seed    uint64            `json:"seed"`
	Changes []shapeChange     `json:"changes"`
	SHA256  map[string]string `json:"sha256"`
	Output  shapeTensorFile   `json:"output"`
}

// shapeManifest is scripts/shape_models.py's manifest.json.
type shapeManifest struct {
	// Sources maps each file the set was built from, relative to the
	// repository, to the SHA-256 of its content then.
	Sources map[string]string    `json:"sources"`
	Cases   map[string]shapeCase `json:"cases"`
}

var (
	shapeSetMu       sync.Mutex
	shapeSetDir      string
	shapeSetManifest *shapeManifest
)

// shapeSet returns the folder of the shape models and their manifest,
// running scripts/shape_models.py build once when the folder is missing or
// was built from other sources.
func shapeSet(t *testing.T) (string, *shapeManifest) {
	t.Helper()
	shapeSetMu.Lock()
	defer shapeSetMu.Unlock()
	if shapeSetManifest != nil {
		return shapeSetDir, shapeSetManifest
	}
	testutil.RequirePython(t)
	dir := filepath.Join(testutil.FixtureDir(), "shapes")
	manifest, err := readShapeManifest(dir)
	if err != nil || !shapeSourcesMatch(t, manifest) {
		testutil.RunPython(t, "shape_models.py", "build", dir)
		manifest, err = readShapeManifest(dir)
		require.NoError(t, err)
		require.True(t, shapeSourcesMatch(t, manifest), "shape_models.py build wrote a manifest of other sources")
	}
	shapeSetDir, shapeSetManifest = dir, manifest
	return dir, manifest
}

func readShapeManifest(dir string) (*shapeManifest, error) {
	data, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var m shapeManifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "manifest.json"), err)
	}
	return &m, nil
}

// shapeSourcesMatch reports whether every source file the manifest lists,
// the script itself among them, still has the content it was built from.
func shapeSourcesMatch(t *testing.T, m *shapeManifest) bool {
	t.Helper()
	if _, ok := m.Sources["scripts/shape_models.py"]; !ok {
		return false
	}
	for path, want := range m.Sources {
		data, err := os.ReadFile(testutil.Path(filepath.FromSlash(path)))
		if err != nil {
			return false
		}
		sum := sha256.Sum256(data)
		if hex.EncodeToString(sum[:]) != want {
			return false
		}
	}
	return true
}

// shapeCaseOf returns the manifest's case name, failing when it is missing.
func shapeCaseOf(t *testing.T, m *shapeManifest, name string) shapeCase {
	t.Helper()
	c, ok := m.Cases[name]
	require.True(t, ok, "case %s is not in scripts/shape_models.py's CASES", name)
	return c
}

// shapeReadTensor reads a raw tensor file of the manifest into a tensor that
// is closed when the test ends.
func shapeReadTensor(t *testing.T, dir string, f shapeTensorFile) *torch.Tensor {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, f.File))
	require.NoError(t, err)
	var x *torch.Tensor
	switch f.DType {
	case "float32":
		values := make([]float32, len(data)/4)
		require.NoError(t, binary.Read(bytes.NewReader(data), binary.LittleEndian, values))
		x, err = torch.FromFloat32(values, f.Shape...)
	case "float64":
		values := make([]float64, len(data)/8)
		require.NoError(t, binary.Read(bytes.NewReader(data), binary.LittleEndian, values))
		x, err = torch.FromFloat64(values, f.Shape...)
	default:
		t.Fatalf("%s: unsupported dtype %s", f.File, f.DType)
	}
	require.NoError(t, err)
	t.Cleanup(x.Close)
	return x
}

// shapeValues returns a float32 or float64 tensor's values as float64.
func shapeValues(t *testing.T, x *torch.Tensor) []float64 {
	t.Helper()
	switch x.DType() {
	case torch.Float32:
		values, err := x.Float32s()
		require.NoError(t, err)
		out := make([]float64, len(values))
		for i, v := range values {
			out[i] = float64(v)
		}
		return out
	case torch.Float64:
		values, err := x.Float64s()
		require.NoError(t, err)
		return values
	}
	t.Fatalf("tensor of dtype %v has no float values", x.DType())
	return nil
}

// shapeForward runs m on x and returns its only output, closed when the
// test ends.
func shapeForward(t *testing.T, m *torch.Module, x *torch.Tensor) *torch.Tensor {
	t.Helper()
	outs, err := m.Forward(x)
	require.NoError(t, err)
	for _, out := range outs {
		t.Cleanup(out.Close)
	}
	require.Len(t, outs, 1)
	return outs[0]
}

// shapeParameterHash returns the SHA-256 of the bytes of the parameter or
// buffer at a dotted state-dict key.
func shapeParameterHash(t *testing.T, m *torch.Module, key string) string {
	t.Helper()
	path, name := "", key
	if i := strings.LastIndexByte(key, '.'); i >= 0 {
		path, name = key[:i], key[i+1:]
	}
	sub, err := m.Submodule(path)
	require.NoError(t, err, "submodule %q", path)
	defer sub.Close()
	p, err := sub.Parameter(name)
	require.NoError(t, err, "parameter %q", key)
	defer p.Close()
	data, err := p.Bytes()
	require.NoError(t, err)
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// shapeState is everything a rejected Network must leave as it was.
type shapeState struct {
	Modules []torch.ModuleInfo
	State   []torch.StateEntry
	// Values maps each state-dict key to the SHA-256 of its bytes.
	Values map[string]string
	// Output is the forward output's shape and values.
	OutputShape []int64
	Output      []float64
}

func shapeSnapshot(t *testing.T, m *torch.Module, input *torch.Tensor) shapeState {
	t.Helper()
	var s shapeState
	var err error
	s.Modules, err = m.NamedModules()
	require.NoError(t, err)
	s.State, err = m.StateDict()
	require.NoError(t, err)
	s.Values = make(map[string]string, len(s.State))
	for _, entry := range s.State {
		s.Values[entry.Name] = shapeParameterHash(t, m, entry.Name)
	}
	out := shapeForward(t, m, input)
	s.OutputShape = out.Shape()
	s.Output = shapeValues(t, out)
	return s
}

// shapeMaxDifference returns max |got - want| and max |want|.
func shapeMaxDifference(got, want []float64) (diff, scale float64) {
	for i := range want {
		diff = math.Max(diff, math.Abs(got[i]-want[i]))
		scale = math.Max(scale, math.Abs(want[i]))
	}
	return diff, scale
}

// shapeReport is the reply of scripts/shape_models.py check for one model.
type shapeReport struct {
	Case     string   `json:"case"`
	Checks   int      `json:"checks"`
	Failures []string `json:"failures"`
}

// shapeChecker is a running `shape_models.py check`, which imports torch
// once and then checks one saved model per request.
type shapeChecker struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	replies *bufio.Reader
	stderr  bytes.Buffer
	// waitErr is the result of cmd.Wait once the process has exited.
	waitErr error
	exited  bool
}

// stop closes the checker's input, so that it exits, and waits for it.
func (c *shapeChecker) stop() error {
	if !c.exited {
		c.stdin.Close()
		c.waitErr = c.cmd.Wait()
		c.exited = true
	}
	return c.waitErr
}

// startShapeChecker starts the checker for the models in dir and stops it
// when the test ends.
func startShapeChecker(t *testing.T, dir string) *shapeChecker {
	t.Helper()
	c := &shapeChecker{cmd: exec.Command(testutil.Python, testutil.Path("scripts", "shape_models.py"), "check", dir)}
	c.cmd.Stderr = &c.stderr
	var err error
	c.stdin, err = c.cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := c.cmd.StdoutPipe()
	require.NoError(t, err)
	c.replies = bufio.NewReader(stdout)
	require.NoError(t, c.cmd.Start())
	t.Cleanup(func() {
		if err := c.stop(); err != nil {
			t.Errorf("shape_models.py check: %v\n%s", err, c.stderr.String())
		}
	})
	return c
}

// check sends the checker the model saved at path for case name and returns
// its report.
func (c *shapeChecker) check(t *testing.T, name, path string) shapeReport {
	t.Helper()
	request, err := json.Marshal(map[string]string{"case": name, "model": path})
	require.NoError(t, err)
	_, err = c.stdin.Write(append(request, '\n'))
	require.NoError(t, err, "sending a request to shape_models.py check")
	line, err := c.replies.ReadBytes('\n')
	if err != nil {
		// The checker has died. Its standard error, complete once it has
		// exited, gives the cause.
		_ = c.stop()
		t.Fatalf("reading the reply of shape_models.py check: %v\n%s", err, c.stderr.String())
	}
	var report shapeReport
	require.NoError(t, json.Unmarshal(line, &report), "reply %q", line)
	require.Equal(t, name, report.Case)
	return report
}

func TestShapesDecompose(t *testing.T) {
	dir, manifest := shapeSet(t)
	checker := startShapeChecker(t, dir)

	// Each case is described in scripts/shape_models.py, which lists its
	// layers and builds its model.
	tests := []struct {
		name string
	}{
		// Containers with numeric names nested four levels deep, reached by
		// the root's own graph.
		{name: "nested"},
		{name: "nested_traced"},
		{name: "sequential_of_containers_traced"},
		// A traced Conv2d that runs three times (forward, forward1,
		// forward2) and one inside a Sequential that runs twice.
		{name: "called_twice_traced"},
		// A Conv2d inside the implementation of an interface-typed
		// attribute, and a Conv2d that is itself such an attribute.
		{name: "interface_implementation"},
		{name: "interface_attribute"},
		// zoo_models' Mixed with AMCT's own information file.
		{name: "mixed_float64"},
		{name: "mixed_float64_traced"},
		{name: "mixed_float16"},
		{name: "mixed_channels_last"},
		{name: "mixed_channels_last_traced"},
		{name: "mixed_float64_channels_last"},
		// zeros, reflect, replicate and circular padding.
		{name: "padding_modes"},
		{name: "padding_modes_traced"},
		// padding='same' with 3x3, 5x3 and 4x4 kernels.
		{name: "same_zeros"},
		{name: "same_reflect"},
		{name: "same_zeros_traced"},
		// Five blocks of one class type, two of them changed.
		{name: "shared_types"},
		{name: "shared_types_traced"},
		// resnet18 with layer1.0.conv1 and layer3.1.conv2 listed.
		{name: "resnet18"},
	}
	for _, tt := range tests {
		name := tt.name
		t.Run(name, func(t *testing.T) {
			c := shapeCaseOf(t, manifest, name)
			require.True(t, c.Decompose, "case %s is a rejection case", name)
			model, err := torch.Load(filepath.Join(dir, c.Model))
			require.NoError(t, err)
			defer model.Close()

			torch.ManualSeed(c.Seed)
			result, changes, err := decompose.Network(model, filepath.Join(dir, c.Info))
			require.NoError(t, err)
			defer result.Close()
			assert.True(t, result.SameObject(model), "the model must change in place")

			want := make(decompose.Changes, len(c.Changes))
			for i, change := range c.Changes {
				want[i] = decompose.Change{Layer: change.Layer, NewLayers: change.NewLayers}
			}
			assert.Equal(t, want, changes)

			keys := make([]string, 0, len(c.SHA256))
			for key := range c.SHA256 {
				keys = append(keys, key)
			}
			sort.Strings(keys)
			for _, key := range keys {
				assert.Equal(t, c.SHA256[key], shapeParameterHash(t, result, key),
					"SHA-256 of %s after torch.ManualSeed(%d)", key, c.Seed)
			}

			if c.ParameterDType == "float16" {
				t.Log("torch 1.13 has no float16 convolution on the CPU: the output is compared in Python, with the model cast to float32")
			} else {
				got := shapeValues(t, shapeForward(t, result, shapeReadTensor(t, dir, c.Input)))
				wantOut := shapeValues(t, shapeReadTensor(t, dir, c.Output))
				if assert.Len(t, got, len(wantOut), "output size before saving") {
					diff, scale := shapeMaxDifference(got, wantOut)
					assert.LessOrEqual(t, diff, shapeOutputRTol*scale, "max abs difference from the expected output before saving")
				}
			}

			out := filepath.Join(t.TempDir(), name+".pt")
			require.NoError(t, result.Save(out))
			report := checker.check(t, name, out)
			assert.Positive(t, report.Checks, "Python made no check")
			for _, failure := range report.Failures {
				assert.Fail(t, "Python check failed", "%s", failure)
			}
		})
	}
}

// nextDraws returns the hash of the weight of a small Conv2d drawn from
// libtorch's default generator: after the same seed it is the same, so it
// shows whether a call put the generator back where it found it.
func nextDraws(t *testing.T, model *torch.Module) string {
	t.Helper()
	builder, err := torch.NewBuilder(model)
	require.NoError(t, err)
	defer builder.Close()
	conv, err := builder.Conv2d(torch.Conv2dSpec{
		InChannels: 4, OutChannels: 4, Groups: 1, KernelSize: [2]int{3, 3}, Stride: [2]int{1, 1},
		Dilation: [2]int{1, 1}, PaddingMode: "zeros", Bias: true, DType: torch.Float32,
	})
	require.NoError(t, err)
	defer conv.Close()
	return tensorHash(t, parameter(t, conv, "weight"))
}

func TestShapesReject(t *testing.T) {
	dir, manifest := shapeSet(t)

	tests := []struct {
		name string
		want error
		// message lists the parts the error message must contain besides
		// the information file's path.
		message []string
	}{
		{"reads_weight", decompose.ErrUnsupportedLayer, []string{"conv", "method 'forward'", "weight"}},
		{"reads_weight_elsewhere", decompose.ErrUnsupportedLayer, []string{"conv", "method 'weight_norm'", "weight"}},
		{"passes_to_method", decompose.ErrUnsupportedLayer, []string{"conv", "method 'forward'"}},
		{"passes_to_function", decompose.ErrUnsupportedLayer, []string{"conv", "method 'forward'"}},
		{"frozen", decompose.ErrLayerNotFound, []string{"entry 0", "conv"}},
		{"subclass", decompose.ErrNotConv2d, []string{"entry 1", "conv", "MyConv"}},
		{"duplicate", decompose.ErrDuplicateLayer, []string{"entry 2", "conv"}},
		{"extra_op_traced", decompose.ErrUnsupportedLayer, []string{"entry 1", "conv"}},
		// A traced reflect-padded 'same' layer with an even kernel pads
		// unequally on the two sides, which no Conv2d padding amount
		// describes.
		{"same_reflect_even_traced", decompose.ErrUnsupportedLayer, []string{"entry 2", "even"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := shapeCaseOf(t, manifest, tt.name)
			require.False(t, c.Decompose, "case %s is a decomposition case", tt.name)
			model, err := torch.Load(filepath.Join(dir, c.Model))
			require.NoError(t, err)
			defer model.Close()
			input := shapeReadTensor(t, dir, c.Input)
			before := shapeSnapshot(t, model, input)
			infoPath := filepath.Join(dir, c.Info)
			torch.ManualSeed(21)
			wantDraws := nextDraws(t, model)

			torch.ManualSeed(21)
			result, changes, err := decompose.Network(model, infoPath)
			require.Error(t, err)
			assert.Equal(t, wantDraws, nextDraws(t, model), "the failed call left its draws in the generator")
			t.Logf("error: %v", err)
			assert.Nil(t, result)
			assert.Nil(t, changes)
			assert.Contains(t, err.Error(), infoPath, "the message must name the file")
			for _, part := range tt.message {
				assert.Contains(t, err.Error(), part)
			}
			assert.NotContains(t, err.Error(), "Exception raised from", "C++ backtrace in the message")
			assert.NotContains(t, err.Error(), "\n", "the message must be one line")

			assert.Equal(t, before, shapeSnapshot(t, model, input), "the model changed")

			assert.ErrorIs(t, err, tt.want)
		})
	}
}
