package torch_test

import (
	"archive/zip"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// TestMain makes the zoo fixture that the examples load, because examples
// have no testing.T to make it on demand.
func TestMain(m *testing.M) {
	path := filepath.Join(testutil.FixtureDir(), "mixed.pt")
	if _, err := os.Stat(path); err != nil {
		out, err := exec.Command(testutil.Python, testutil.Path("scripts", "fixtures.py"), testutil.FixtureDir(), "mixed").CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "making fixture %s failed: %v\n%s", path, err, out)
		}
	}
	os.Exit(m.Run())
}

// pyModule is one entry of Python's named_modules(), with original_name as
// the class.
type pyModule struct {
	Name  string `json:"name"`
	Class string `json:"class"`
}

// pyStateEntry is one entry of Python's state_dict().
type pyStateEntry struct {
	Name      string  `json:"name"`
	Shape     []int64 `json:"shape"`
	DType     string  `json:"dtype"`
	Parameter bool    `json:"parameter"`
}

// pyConv is the geometry Python reports for a Conv2d case, or Error when
// convsplit must reject the case's graph.
type pyConv struct {
	torch.Conv2d
	Error bool `json:"error"`
}

// pyOutput is one output tensor of a Python forward call.
type pyOutput struct {
	Shape  []int64   `json:"shape"`
	Values []float32 `json:"values"`
}

// pyForward is a Python forward call on testInput(InputShape).
type pyForward struct {
	InputShape []int64    `json:"input_shape"`
	Outputs    []pyOutput `json:"outputs"`
}

// pyReference is reference.json, written by scripts/torch_test_models.py.
type pyReference struct {
	Modules   map[string][]pyModule     `json:"modules"`
	StateDict map[string][]pyStateEntry `json:"state_dict"`
	Conv      map[string]pyConv         `json:"conv"`
	Forward   map[string]pyForward      `json:"forward"`
}

var (
	testModelsOnce sync.Once
	testModelsDir  string
	testModelsErr  error
	testReference  pyReference
)

// testModelsFixtures are the zoo fixtures that torch_test_models.py reads.
var testModelsFixtures = []string{"mixed", "mixed_traced", "resnet18", "resnet18_traced"}

// testModels returns the folder of the models written by
// scripts/torch_test_models.py, running the script when its output is
// missing or older than the script or the zoo fixtures it describes.
func testModels(t testing.TB) string {
	t.Helper()
	var fixtures []string
	for _, name := range testModelsFixtures {
		fixtures = append(fixtures, testutil.Fixture(t, name))
	}
	testModelsOnce.Do(func() {
		dir := filepath.Join(testutil.FixtureDir(), "torch_test")
		script := testutil.Path("scripts", "torch_test_models.py")
		reference := filepath.Join(dir, "reference.json")
		if !newerThanAll(reference, append([]string{script}, fixtures...)) {
			out, err := exec.Command(testutil.Python, script, dir, testutil.FixtureDir()).CombinedOutput()
			if err != nil {
				testModelsErr = fmt.Errorf("%s failed: %w\n%s", script, err, out)
				return
			}
		}
		data, err := os.ReadFile(reference)
		if err != nil {
			testModelsErr = err
			return
		}
		if err := json.Unmarshal(data, &testReference); err != nil {
			testModelsErr = fmt.Errorf("decoding %s: %w", reference, err)
			return
		}
		testModelsDir = dir
	})
	require.NoError(t, testModelsErr)
	return testModelsDir
}

func newerThanAll(path string, sources []string) bool {
	info, err := os.Stat(path)
	if err != nil {
		return false
	}
	for _, source := range sources {
		sourceInfo, err := os.Stat(source)
		if err != nil || !info.ModTime().After(sourceInfo.ModTime()) {
			return false
		}
	}
	return true
}

// reference returns Python's values for the test models and zoo fixtures.
func reference(t testing.TB) *pyReference {
	t.Helper()
	testModels(t)
	return &testReference
}

// modelPath returns the path of a test model: a zoo fixture such as
// "mixed_traced" or a model of scripts/torch_test_models.py such as
// "twice_traced" or "conv_reflect".
func modelPath(t testing.TB, name string) string {
	t.Helper()
	for _, fixture := range []string{"mixed", "mixed_traced", "resnet18", "resnet18_traced", "root_conv", "shared_weight", "lowrank"} {
		if name == fixture {
			return testutil.Fixture(t, name)
		}
	}
	return filepath.Join(testModels(t), name+".pt")
}

// loadModel loads a test model and closes it when the test ends.
func loadModel(t testing.TB, name string) *torch.Module {
	t.Helper()
	m, err := torch.Load(modelPath(t, name))
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

// testInputShapes are the input shapes used with each test model.
var testInputShapes = map[string][]int64{
	"mixed": {1, 3, 32, 32}, "mixed_traced": {1, 3, 32, 32},
	"resnet18": {1, 3, 64, 64}, "resnet18_traced": {1, 3, 64, 64},
	"two_outputs": {1, 3, 8, 8}, "returns_list": {1, 3, 8, 8}, "returns_dict": {1, 3, 8, 8}, "twice_traced": {1, 8, 8, 8}, "interface": {1, 4, 8, 8}, "aliased": {1, 4, 8, 8},
	"reads_weight": {1, 4, 8, 8}, "export_reads_weight": {1, 4, 8, 8}, "branches": {1, 4, 8, 8}, "with_extras": {1, 3, 8, 8}, "bias_pair": {1, 4, 8, 8},
	"shared_weight": {1, 64, 8, 8}, "root_conv": {1, 64, 8, 8},
}

// testValues returns the values scripts/torch_test_models.py's test_input
// gives: element i is ((7 * i) % 19 - 9) / 9, exact in float32.
func testValues(shape ...int64) []float32 {
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	values := make([]float32, n)
	for i := range values {
		values[i] = float32((int64(i)*7)%19-9) / 9
	}
	return values
}

// testTensor returns testValues(shape) as a tensor closed when the test ends.
func testTensor(t testing.TB, shape ...int64) *torch.Tensor {
	t.Helper()
	x, err := torch.FromFloat32(testValues(shape...), shape...)
	require.NoError(t, err)
	t.Cleanup(x.Close)
	return x
}

// forwardValues runs the model on testValues of the model's input shape and
// returns the values of its outputs.
func forwardValues(t testing.TB, m *torch.Module, modelName string) [][]float32 {
	t.Helper()
	shape, ok := testInputShapes[modelName]
	require.True(t, ok, "no input shape for model %s", modelName)
	outputs, err := m.Forward(testTensor(t, shape...))
	require.NoError(t, err)
	values := make([][]float32, len(outputs))
	for i, out := range outputs {
		values[i], err = out.Float32s()
		require.NoError(t, err)
		out.Close()
	}
	return values
}

// assertClose checks that two float lists agree within tolerance, relative
// to the larger magnitude of the two values, with an absolute floor.
func assertClose(t testing.TB, want, got []float32, tolerance float64, what string) {
	t.Helper()
	if !assert.Len(t, got, len(want), what) {
		return
	}
	bad := 0
	for i := range want {
		w, g := float64(want[i]), float64(got[i])
		scale := max(1, abs(w), abs(g))
		if abs(w-g) > tolerance*scale {
			if bad < 3 {
				t.Errorf("%s: element %d is %g, want %g", what, i, g, w)
			}
			bad++
		}
	}
	if bad > 0 {
		t.Errorf("%s: %d of %d elements differ by more than %g", what, bad, len(want), tolerance)
	}
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// snapshot is what a failed Replace must leave unchanged.
type snapshot struct {
	modules []torch.ModuleInfo
	state   []torch.StateEntry
	output  [][]float32
}

func takeSnapshot(t testing.TB, m *torch.Module, modelName string) snapshot {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	state, err := m.StateDict()
	require.NoError(t, err)
	return snapshot{modules: modules, state: state, output: forwardValues(t, m, modelName)}
}

func assertSnapshot(t testing.TB, want snapshot, m *torch.Module, modelName string) {
	t.Helper()
	got := takeSnapshot(t, m, modelName)
	assert.Equal(t, want.modules, got.modules, "named modules")
	assert.Equal(t, want.state, got.state, "state dict")
	require.Len(t, got.output, len(want.output))
	for i := range want.output {
		assert.Equal(t, want.output[i], got.output[i], "forward output %d", i)
	}
}

// moduleNames returns the names of NamedModules in order.
func moduleNames(t testing.TB, m *torch.Module) []string {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	names := make([]string, len(modules))
	for i, info := range modules {
		names[i] = info.Name
	}
	return names
}

// moduleClass returns the class of the module at path.
func moduleClass(t testing.TB, m *torch.Module, path string) string {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	for _, info := range modules {
		if info.Name == path {
			return info.Class
		}
	}
	t.Fatalf("module %q not found", path)
	return ""
}

// pyLoaded is the content Python's torch.jit.load reads from a saved file.
type pyLoaded struct {
	Modules []struct {
		Name     string `json:"name"`
		Class    string `json:"class"`
		Training bool   `json:"training"`
	} `json:"modules"`
	StateDict []struct {
		Name         string  `json:"name"`
		Shape        []int64 `json:"shape"`
		RequiresGrad bool    `json:"requires_grad"`
	} `json:"state_dict"`
	Extra   map[string]string `json:"extra"`
	Outputs []pyOutput        `json:"outputs"`
}

// describeSaved loads each file with torch.jit.load, asking for the named
// extra files, and runs it on test_input(shape) when a shape is given.
const describeSaved = `
import json, sys, torch
requests = json.loads(sys.argv[1])
results = []
for request in requests:
    extra = {name: '' for name in request['extra']}
    m = torch.jit.load(request['path'], _extra_files=extra)
    result = {
        'modules': [{'name': n, 'class': c.original_name, 'training': c.training} for n, c in m.named_modules()],
        'state_dict': [{'name': n, 'shape': list(v.shape), 'requires_grad': v.requires_grad}
                       for n, v in m.state_dict(keep_vars=True).items()],
        'extra': {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()},
        'outputs': [],
    }
    if request['shape']:
        shape = request['shape']
        count = 1
        for s in shape:
            count *= s
        x = (((torch.arange(count) * 7) % 19 - 9).to(torch.float32) / 9).reshape(shape)
        with torch.no_grad():
            out = m(x)
        for t in (out if isinstance(out, tuple) else (out,)):
            result['outputs'].append({'shape': list(t.shape), 'values': t.flatten().tolist()})
    results.append(result)
print(json.dumps(results))
`

// pyRequest is one file for describeSaved to describe.
type pyRequest struct {
	Path  string   `json:"path"`
	Shape []int64  `json:"shape"`
	Extra []string `json:"extra"`
}

// loadInPython runs describeSaved on the requests in one Python process.
func loadInPython(t testing.TB, requests ...pyRequest) []pyLoaded {
	t.Helper()
	for i := range requests {
		if requests[i].Extra == nil {
			requests[i].Extra = []string{}
		}
	}
	arg, err := json.Marshal(requests)
	require.NoError(t, err)
	var loaded []pyLoaded
	require.NoError(t, json.Unmarshal([]byte(testutil.PythonCode(t, describeSaved, string(arg))), &loaded))
	require.Len(t, loaded, len(requests))
	return loaded
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	mixed, err := os.ReadFile(modelPath(t, "mixed"))
	require.NoError(t, err)

	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, data, 0o644))
		return path
	}
	zipWith := func(name string, files map[string]string) string {
		path := filepath.Join(dir, name)
		f, err := os.Create(path)
		require.NoError(t, err)
		w := zip.NewWriter(f)
		for entry, content := range files {
			fw, err := w.Create(entry)
			require.NoError(t, err)
			_, err = fw.Write([]byte(content))
			require.NoError(t, err)
		}
		require.NoError(t, w.Close())
		require.NoError(t, f.Close())
		return path
	}
	subdir := filepath.Join(dir, "folder.pt")
	require.NoError(t, os.Mkdir(subdir, 0o755))

	tests := []struct {
		name     string
		path     string
		notExist bool // the error wraps fs.ErrNotExist
		torchErr bool // the error wraps torch.ErrTorch
	}{
		{name: "missing file", path: filepath.Join(dir, "missing.pt"), notExist: true},
		{name: "directory", path: subdir},
		{name: "empty file", path: write("empty.pt", nil), torchErr: true},
		{name: "truncated file", path: write("truncated.pt", mixed[:len(mixed)/2]), torchErr: true},
		{name: "truncated header", path: write("header.pt", mixed[:100]), torchErr: true},
		{name: "not a zip", path: write("text.pt", []byte("this is not a TorchScript archive\n")), torchErr: true},
		{name: "zip without model", path: zipWith("other.pt", map[string]string{"archive/readme.txt": "hello"}), torchErr: true},
		{name: "zip without code", path: zipWith("data.pt", map[string]string{"archive/data.pkl": "x", "archive/version": "3\n"}), torchErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := torch.Load(tt.path)
			require.Error(t, err)
			assert.Nil(t, m)
			assert.Contains(t, err.Error(), tt.path, "the error names the file")
			assert.NotContains(t, err.Error(), "\n", "the error is one line")
			assert.NotContains(t, err.Error(), "Exception raised from")
			assert.Equal(t, tt.notExist, errors.Is(err, fs.ErrNotExist), "errors.Is(err, fs.ErrNotExist)")
			assert.Equal(t, tt.torchErr, errors.Is(err, torch.ErrTorch), "errors.Is(err, torch.ErrTorch)")
		})
	}
}

func TestSaveRoundTrip(t *testing.T) {
	names := []string{"mixed", "mixed_traced"}
	outputs := map[string][]float32{}
	modules := map[string][]string{}
	var requests []pyRequest
	dir := t.TempDir() // outlives the subtests, for the Python check at the end
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			m := loadModel(t, name)
			want := takeSnapshot(t, m, name)
			path := filepath.Join(dir, name+".pt")
			require.NoError(t, m.Save(path))

			loaded, err := torch.Load(path)
			require.NoError(t, err)
			defer loaded.Close()
			assertSnapshot(t, want, loaded, name)
			outputs[name] = want.output[0]
			modules[name] = moduleNames(t, m)
			requests = append(requests, pyRequest{Path: path, Shape: testInputShapes[name]})
		})
	}
	require.Len(t, requests, len(names))

	// Python's torch.jit.load reads the saved files and computes the same.
	results := loadInPython(t, requests...)
	ref := reference(t)
	for i, name := range names {
		python := results[i]
		require.Len(t, python.Outputs, 1, name)
		assertClose(t, outputs[name], python.Outputs[0].Values, 1e-5, name+": Python's output of the saved file")
		assertClose(t, ref.Forward[name].Outputs[0].Values, python.Outputs[0].Values, 1e-5, name+": Python's output of the original")
		var pythonNames []string
		for _, module := range python.Modules {
			pythonNames = append(pythonNames, module.Name)
		}
		assert.Equal(t, modules[name], pythonNames, name)
	}
}

// dirEntries lists the names in dir.
func dirEntries(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, entry := range entries {
		names = append(names, entry.Name())
	}
	sort.Strings(names)
	return names
}

func TestSaveAtomic(t *testing.T) {
	m := loadModel(t, "mixed")

	t.Run("target is a directory", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(dir, "model.pt")
		require.NoError(t, os.Mkdir(target, 0o755))
		inside := filepath.Join(target, "keep.txt")
		require.NoError(t, os.WriteFile(inside, []byte("keep"), 0o644))
		before := dirEntries(t, dir)

		err := m.Save(target)
		require.Error(t, err)
		assert.Contains(t, err.Error(), target)
		assert.Equal(t, before, dirEntries(t, dir), "no temporary file is left")
		content, err := os.ReadFile(inside)
		require.NoError(t, err)
		assert.Equal(t, "keep", string(content))
	})

	t.Run("missing folder", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(dir, "absent", "model.pt")
		err := m.Save(target)
		require.Error(t, err)
		assert.Contains(t, err.Error(), target)
		assert.Empty(t, dirEntries(t, dir))
	})

	t.Run("replaces an existing file", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(dir, "model.pt")
		require.NoError(t, os.WriteFile(target, []byte("old content"), 0o644))
		require.NoError(t, m.Save(target))
		assert.Equal(t, []string{"model.pt"}, dirEntries(t, dir), "no temporary file is left")
		loaded, err := torch.Load(target)
		require.NoError(t, err)
		loaded.Close()
	})
}

// TestSaveKeepsExtrasGradAndTraining checks that extra files, requires_grad
// flags and training flags survive a Go load and save, also through Clone.
func TestSaveKeepsExtrasGradAndTraining(t *testing.T) {
	source := modelPath(t, "with_extras")
	m := loadModel(t, "with_extras")
	dir := t.TempDir()

	training := map[string]bool{"": true, "features": true, "features.0": true, "head": false}
	for path, want := range training {
		sub, err := m.Submodule(path)
		require.NoError(t, err)
		got, err := sub.IsTraining()
		require.NoError(t, err)
		assert.Equal(t, want, got, "training flag of %q after load", path)
		sub.Close()
	}
	grads := map[string]bool{"features.0": false, "features.2": true, "head": true}
	for path, want := range grads {
		sub, err := m.Submodule(path)
		require.NoError(t, err)
		weight, err := sub.Parameter("weight")
		require.NoError(t, err)
		assert.Equal(t, want, weight.RequiresGrad(), "requires_grad of %s.weight after load", path)
		weight.Close()
		sub.Close()
	}

	saved := filepath.Join(dir, "saved.pt")
	require.NoError(t, m.Save(saved))
	clone, err := m.Clone()
	require.NoError(t, err)
	defer clone.Close()
	cloned := filepath.Join(dir, "cloned.pt")
	require.NoError(t, clone.Save(cloned))
	require.NoError(t, m.Eval())
	evaluated := filepath.Join(dir, "eval.pt")
	require.NoError(t, m.Save(evaluated))

	extra := []string{"meta.txt", "config.json"}
	results := loadInPython(t,
		pyRequest{Path: source, Extra: extra},
		pyRequest{Path: saved, Extra: extra},
		pyRequest{Path: cloned, Extra: extra},
		pyRequest{Path: evaluated, Extra: extra},
	)
	original := results[0]
	require.NotEmpty(t, original.Extra["meta.txt"])
	require.NotEmpty(t, original.Extra["config.json"])
	for i, label := range []string{"saved", "cloned", "eval"} {
		got := results[i+1]
		assert.Equal(t, original.Extra, got.Extra, "%s: extra files", label)
		assert.Equal(t, original.StateDict, got.StateDict, "%s: state dict and requires_grad", label)
		require.Len(t, got.Modules, len(original.Modules))
		for j, module := range got.Modules {
			want := original.Modules[j].Training
			if label == "eval" {
				want = false
			}
			assert.Equal(t, want, module.Training, "%s: training flag of %q", label, module.Name)
		}
	}
}

func TestCloneHasOwnTypes(t *testing.T) {
	tests := []struct {
		model string
		path  string
	}{
		{model: "mixed", path: "down"},
		{model: "mixed", path: "tail.0.1"},
		{model: "mixed_traced", path: "blocks.1"},
		{model: "resnet18", path: "layer1.0.conv1"},
		{model: "resnet18_traced", path: "layer2.1.conv2"},
	}
	for _, tt := range tests {
		t.Run(tt.model+"/"+tt.path, func(t *testing.T) {
			original := loadModel(t, tt.model)
			before := takeSnapshot(t, original, tt.model)

			clone, err := original.Clone()
			require.NoError(t, err)
			defer clone.Close()
			assert.False(t, clone.SameObject(original))
			cloned := takeSnapshot(t, clone, tt.model)
			require.Len(t, cloned.modules, len(before.modules))
			for i, info := range cloned.modules {
				assert.Equal(t, before.modules[i].Name, info.Name)
				assert.Equal(t, before.modules[i].Class, info.Class, "class of %q", info.Name)
			}
			assert.Equal(t, before.state, cloned.state)
			assert.Equal(t, before.output, cloned.output)

			layer, err := clone.Submodule(tt.path)
			require.NoError(t, err)
			defer layer.Close()
			replacement := equivalentSequential(t, clone, layer)
			require.NoError(t, clone.Replace([]string{tt.path}, []*torch.Module{replacement}))
			assert.Equal(t, "Sequential", moduleClass(t, clone, tt.path))

			assertSnapshot(t, before, original, tt.model)
			assert.Equal(t, "Conv2d", moduleClass(t, original, tt.path))
			changed := takeSnapshot(t, clone, tt.model)
			assertClose(t, before.output[0], changed.output[0], 1e-4, "output of the changed clone")

			// A change of the original does not reach the copy either.
			require.NoError(t, replaceWith(t, original, []string{tt.path}, decomposedLayer))
			assert.Equal(t, "Sequential", moduleClass(t, original, tt.path))
			assertSnapshot(t, changed, clone, tt.model)
		})
	}
}

// TestCloneIsAnotherModel checks that a copy is a model of its own: a
// replacement built for the original is rejected by the copy, as one built
// for any other model is.
func TestCloneIsAnotherModel(t *testing.T) {
	original := loadModel(t, "mixed")
	clone, err := original.Clone()
	require.NoError(t, err)
	defer clone.Close()
	before := takeSnapshot(t, clone, "mixed")

	err = clone.Replace([]string{"down"}, []*torch.Module{sequentialOf(t, original, "down")})
	require.Error(t, err, "the copy accepted a replacement built for the original")
	assert.Contains(t, err.Error(), "another model")
	assertSnapshot(t, before, clone, "mixed")
}

func TestNamedModulesMatchPython(t *testing.T) {
	for _, name := range []string{"mixed", "mixed_traced", "resnet18", "resnet18_traced", "interface", "twice_traced", "two_outputs", "with_extras", "conv_subclass", "conv_subclass_traced"} {
		t.Run(name, func(t *testing.T) {
			want := reference(t).Modules[name]
			if strings.HasPrefix(name, "conv_") {
				want = []pyModule{{Name: "", Class: "SubConv"}}
			}
			require.NotEmpty(t, want)
			m := loadModel(t, name)
			got, err := m.NamedModules()
			require.NoError(t, err)
			require.Len(t, got, len(want))
			for i, info := range got {
				assert.Equal(t, want[i].Name, info.Name, "module %d", i)
				assert.Equal(t, want[i].Class, info.Class, "class of %q", info.Name)
				assert.Equal(t, want[i].Class == "Conv2d", info.Conv2d, "Conv2d flag of %q", info.Name)
				assert.True(t, strings.HasPrefix(info.Type, "__torch__."), "type %q of %q", info.Type, info.Name)
			}
		})
	}
}

func TestSubmodule(t *testing.T) {
	m := loadModel(t, "mixed")
	found := []struct {
		path  string
		class string
	}{
		{path: "", class: "Mixed"},
		{path: "stem", class: "Conv2d"},
		{path: "blocks", class: "ModuleList"},
		{path: "blocks.1", class: "Conv2d"},
		{path: "heads.b", class: "Conv2d"},
		{path: "tail.0", class: "Sequential"},
		{path: "tail.0.0", class: "ReLU"},
		{path: "tail.0.1", class: "Conv2d"},
	}
	for _, tt := range found {
		t.Run("found "+tt.path, func(t *testing.T) {
			sub, err := m.Submodule(tt.path)
			require.NoError(t, err)
			defer sub.Close()
			modules, err := sub.NamedModules()
			require.NoError(t, err)
			assert.Equal(t, tt.class, modules[0].Class)
			again, err := m.Submodule(tt.path)
			require.NoError(t, err)
			defer again.Close()
			assert.True(t, sub.SameObject(again), "two handles to %q", tt.path)
			assert.Equal(t, tt.path == "", sub.SameObject(m), "handle to %q is the root", tt.path)
		})
	}

	missing := []string{"nope", "blocks.2", "heads.c", "tail.0.1.x", "down.weight", "training", "blocks..1", ".down", "down.", "stem.0"}
	for _, path := range missing {
		t.Run("missing "+path, func(t *testing.T) {
			sub, err := m.Submodule(path)
			require.Error(t, err)
			assert.Nil(t, sub)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), "'"+path+"'", "the error names the path")
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestMethodNames(t *testing.T) {
	tests := []struct {
		model string
		path  string
		want  []string
	}{
		{model: "mixed", path: "", want: []string{"forward"}},
		{model: "mixed", path: "down", want: []string{"forward", "_conv_forward"}},
		{model: "mixed", path: "tail", want: []string{"forward", "__len__"}},
		{model: "mixed", path: "blocks", want: []string{"__len__"}},
		{model: "mixed_traced", path: "down", want: []string{"forward"}},
		{model: "twice_traced", path: "conv", want: []string{"forward", "forward1"}},
	}
	for _, tt := range tests {
		t.Run(tt.model+"/"+tt.path, func(t *testing.T) {
			sub, err := loadModel(t, tt.model).Submodule(tt.path)
			require.NoError(t, err)
			defer sub.Close()
			got, err := sub.MethodNames()
			require.NoError(t, err)
			assert.ElementsMatch(t, tt.want, got)
		})
	}
}

func TestStateDictMatchesPython(t *testing.T) {
	for _, name := range []string{"mixed", "mixed_traced", "resnet18", "resnet18_traced", "with_extras", "bias_pair", "interface"} {
		t.Run(name, func(t *testing.T) {
			want := reference(t).StateDict[name]
			require.NotEmpty(t, want)
			got, err := loadModel(t, name).StateDict()
			require.NoError(t, err)
			require.Len(t, got, len(want))
			for i, entry := range got {
				assert.Equal(t, want[i].Name, entry.Name, "entry %d", i)
				assert.Equal(t, want[i].Shape, entry.Shape, "shape of %s", entry.Name)
				assert.Equal(t, want[i].Parameter, entry.Parameter, "parameter flag of %s", entry.Name)
				dtype, err := torch.ParseDType(entry.DType)
				if assert.NoError(t, err, "dtype of %s", entry.Name) {
					assert.Equal(t, want[i].DType, dtype.String(), "dtype of %s", entry.Name)
				}
			}
		})
	}
}

func TestTrainAndEval(t *testing.T) {
	m := loadModel(t, "resnet18")
	assertAll := func(want bool) {
		t.Helper()
		assertTraining(t, m, want)
	}
	assertAll(false) // the fixture was scripted in eval mode

	require.NoError(t, m.Train(true))
	assertAll(true)
	conv, err := m.Submodule("layer1.0.conv1")
	require.NoError(t, err)
	defer conv.Close()
	geometry, err := conv.Conv2d()
	require.NoError(t, err)
	assert.True(t, geometry.Training)

	require.NoError(t, m.Eval())
	assertAll(false)

	// Train on a submodule reaches its subtree only.
	layer, err := m.Submodule("layer2")
	require.NoError(t, err)
	defer layer.Close()
	require.NoError(t, layer.Train(true))
	for name, want := range map[string]bool{"": false, "layer1": false, "layer2": true, "layer2.0.bn1": true, "layer3.0": false} {
		sub, err := m.Submodule(name)
		require.NoError(t, err)
		got, err := sub.IsTraining()
		require.NoError(t, err)
		assert.Equal(t, want, got, "training flag of %q", name)
		sub.Close()
	}
}

func TestParameterSharing(t *testing.T) {
	param := func(t *testing.T, m *torch.Module, path, name string) *torch.Tensor {
		t.Helper()
		sub, err := m.Submodule(path)
		require.NoError(t, err)
		defer sub.Close()
		p, err := sub.Parameter(name)
		require.NoError(t, err)
		t.Cleanup(p.Close)
		return p
	}

	t.Run("shared weight", func(t *testing.T) {
		m := loadModel(t, "shared_weight")
		assert.True(t, param(t, m, "c1", "weight").Same(param(t, m, "c2", "weight")))
	})

	t.Run("distinct weights", func(t *testing.T) {
		m := loadModel(t, "mixed")
		assert.False(t, param(t, m, "stem", "weight").Same(param(t, m, "down", "weight")))
		assert.True(t, param(t, m, "stem", "weight").Same(param(t, m, "stem", "weight")))
	})

	t.Run("buffer", func(t *testing.T) {
		m := loadModel(t, "resnet18")
		mean := param(t, m, "bn1", "running_mean")
		assert.Equal(t, []int64{64}, mean.Shape())
		assert.False(t, mean.RequiresGrad())
		assert.True(t, param(t, m, "conv1", "weight").RequiresGrad())
	})

	t.Run("set parameter", func(t *testing.T) {
		m := loadModel(t, "mixed")
		// tail.0.1 is the last layer: with a zero weight the output is its bias.
		layer, err := m.Submodule("tail.0.1")
		require.NoError(t, err)
		defer layer.Close()
		zeros, err := torch.FromFloat32(make([]float32, 96*64*3*3), 96, 64, 3, 3)
		require.NoError(t, err)
		defer zeros.Close()
		biasValues := make([]float32, 96)
		for i := range biasValues {
			biasValues[i] = float32(i) / 4
		}
		bias, err := torch.FromFloat32(biasValues, 96)
		require.NoError(t, err)
		defer bias.Close()

		require.NoError(t, layer.SetParameter("weight", zeros))
		require.NoError(t, layer.SetParameter("bias", bias))
		assert.True(t, param(t, m, "tail.0.1", "weight").Same(zeros))
		assert.True(t, param(t, m, "tail.0.1", "bias").Same(bias))

		out := forwardValues(t, m, "mixed")[0]
		require.Len(t, out, 96*8*16)
		for c := 0; c < 96; c++ {
			for i := 0; i < 8*16; i++ {
				if out[c*8*16+i] != biasValues[c] {
					t.Fatalf("output channel %d element %d is %g, want the bias %g", c, i, out[c*8*16+i], biasValues[c])
				}
			}
		}
	})

	errorsTable := []struct {
		name string
		call func(m *torch.Module) error
		want string
	}{
		{name: "unknown parameter", call: func(m *torch.Module) error { _, err := m.Parameter("nope"); return err }, want: "nope"},
		{name: "absent bias", call: func(m *torch.Module) error { _, err := m.Parameter("bias"); return err }, want: "bias"},
		{name: "not a parameter", call: func(m *torch.Module) error { _, err := m.Parameter("training"); return err }, want: "training"},
		{name: "set unknown", call: func(m *torch.Module) error {
			x, err := torch.FromFloat32([]float32{1}, 1)
			if err != nil {
				return err
			}
			defer x.Close()
			return m.SetParameter("nope", x)
		}, want: "nope"},
	}
	for _, tt := range errorsTable {
		t.Run(tt.name, func(t *testing.T) {
			down, err := loadModel(t, "mixed").Submodule("down") // down has no bias
			require.NoError(t, err)
			defer down.Close()
			err = tt.call(down)
			require.Error(t, err)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestClosedModule(t *testing.T) {
	m, err := torch.Load(modelPath(t, "mixed"))
	require.NoError(t, err)
	m.Close()
	m.Close() // a second Close is a no-op
	x := testTensor(t, 1, 3, 32, 32)

	calls := map[string]func() error{
		"Save":         func() error { return m.Save(filepath.Join(t.TempDir(), "x.pt")) },
		"Clone":        func() error { _, err := m.Clone(); return err },
		"Submodule":    func() error { _, err := m.Submodule("down"); return err },
		"NamedModules": func() error { _, err := m.NamedModules(); return err },
		"MethodNames":  func() error { _, err := m.MethodNames(); return err },
		"StateDict":    func() error { _, err := m.StateDict(); return err },
		"Train":        func() error { return m.Train(true) },
		"IsTraining":   func() error { _, err := m.IsTraining(); return err },
		"Parameter":    func() error { _, err := m.Parameter("weight"); return err },
		"SetParameter": func() error { return m.SetParameter("weight", x) },
		"Forward":      func() error { _, err := m.Forward(x); return err },
		"Conv2d":       func() error { _, err := m.Conv2d(); return err },
		"Replace":      func() error { return m.Replace(nil, nil) },
		"NewBuilder":   func() error { _, err := torch.NewBuilder(m); return err },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			assert.ErrorIs(t, call(), torch.ErrClosed)
		})
	}
	assert.False(t, m.SameObject(m))
}

// splitLayer replaces the Conv2d at path by a Sequential of two Conv2d
// layers of its geometry. It reports failures as errors rather than through
// testing.T, so that goroutines can call it.
func splitLayer(m *torch.Module, path string) error {
	layer, err := m.Submodule(path)
	if err != nil {
		return err
	}
	g, err := layer.Conv2d()
	layer.Close()
	if err != nil {
		return err
	}
	b, err := torch.NewBuilder(m)
	if err != nil {
		return err
	}
	defer b.Close()
	dtype, err := torch.ParseDType(g.DType)
	if err != nil {
		return err
	}
	spec := torch.Conv2dSpec{
		InChannels: g.InChannels, OutChannels: g.OutChannels, Groups: g.Groups,
		KernelSize: g.KernelSize, Stride: g.Stride, Padding: g.Padding, Dilation: g.Dilation,
		PaddingMode: g.PaddingMode, Bias: g.Bias, DType: dtype, Training: g.Training,
	}
	first, err := b.Conv2d(spec)
	if err != nil {
		return err
	}
	defer first.Close()
	spec.InChannels, spec.Stride = spec.OutChannels, [2]int{1, 1}
	second, err := b.Conv2d(spec)
	if err != nil {
		return err
	}
	defer second.Close()
	seq, err := b.Sequential([]*torch.Module{first, second}, nil, g.Training)
	if err != nil {
		return err
	}
	defer seq.Close()
	return m.Replace([]string{path}, []*torch.Module{seq})
}

// TestConcurrentModels changes and runs distinct models from several
// goroutines at once, which Module's documentation allows for models loaded
// separately and for copies made with Clone.
func TestConcurrentModels(t *testing.T) {
	const workers = 6
	layers := []string{"stem", "down", "tall", "squeeze", "blocks.0", "blocks.1", "heads.a", "heads.b", "tail.0.1"}
	paths := append([]string{}, layers...)
	for _, layer := range layers {
		paths = append(paths, layer+".1") // the second layer of the new Sequential
	}
	x := testTensor(t, 1, 3, 16, 16)

	for _, source := range []string{"load", "clone"} {
		t.Run(source, func(t *testing.T) {
			if source == "clone" {
			}
			base := loadModel(t, "mixed")
			models := make([]*torch.Module, workers)
			for i := range models {
				var err error
				if source == "load" {
					models[i], err = torch.Load(modelPath(t, "mixed"))
				} else {
					models[i], err = base.Clone()
				}
				require.NoError(t, err)
				t.Cleanup(models[i].Close)
			}

			var wg sync.WaitGroup
			start := make(chan struct{})
			failures := make(chan error, workers)
			for _, m := range models {
				wg.Add(1)
				go func(m *torch.Module) {
					defer wg.Done()
					<-start
					for _, path := range paths {
						if err := splitLayer(m, path); err != nil {
							failures <- fmt.Errorf("replacing %s: %w", path, err)
							return
						}
					}
					outputs, err := m.Forward(x)
					if err != nil {
						failures <- fmt.Errorf("forward: %w", err)
						return
					}
					for _, out := range outputs {
						out.Close()
					}
				}(m)
			}
			close(start)
			wg.Wait()
			close(failures)
			for err := range failures {
				t.Error(err)
			}
			if t.Failed() {
				return
			}
			for _, m := range models {
				for _, path := range paths {
					assert.Equal(t, "Sequential", moduleClass(t, m, path))
				}
			}
			assert.Equal(t, "Conv2d", moduleClass(t, base, "stem"), "the original keeps its layers")
		})
	}
}
