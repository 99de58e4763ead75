package torch_test

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// ioCases are the AMCT models with decomposed_state.pt and io.pt. lowrank's
// planted weights give outputs near 1e7, so its tolerance has a relative
// part: 1e-4 + 1e-6*max|y|.
var ioCases = []struct {
	name string
	rtol float64
}{
	{"mixed", 0},
	{"lowrank", 1e-6},
}

// decomposedModel loads the TorchScript fixture NAME and restructures it
// with AMCT's information file.
func loadDecomposed(t *testing.T, name string) *torch.Module {
	t.Helper()
	model, err := torch.Load(testutil.Fixture(t, name))
	require.NoError(t, err)
	t.Cleanup(model.Close)
	result, _, err := decompose.Network(model, testutil.AMCT(name, "decompose_info.json"))
	require.NoError(t, err)
	t.Cleanup(result.Close)
	return result
}

// readIO returns the input and output tensors of an io.pt file.
func readIOFile(t *testing.T, path string) (x, y *torch.Tensor) {
	t.Helper()
	sd, err := torch.LoadStateDictFile(path)
	require.NoError(t, err)
	t.Cleanup(sd.Close)
	require.Equal(t, []string{"input", "output"}, sd.Keys())
	x, _ = sd.Get("input")
	y, _ = sd.Get("output")
	return x, y
}

func valuesOf(t *testing.T, tensor *torch.Tensor) []float32 {
	t.Helper()
	values, err := tensor.Float32s()
	require.NoError(t, err)
	return values
}

func maxAbsValue(values []float32) float64 {
	m := 0.0
	for _, v := range values {
		m = math.Max(m, math.Abs(float64(v)))
	}
	return m
}

func maxAbsDifference(t *testing.T, got, want []float32) float64 {
	t.Helper()
	require.Len(t, got, len(want))
	m := 0.0
	for i := range got {
		m = math.Max(m, math.Abs(float64(got[i])-float64(want[i])))
	}
	return m
}

// evalOutput runs the module in eval mode on x and returns its one output.
func evalForward(t *testing.T, m *torch.Module, x *torch.Tensor) *torch.Tensor {
	t.Helper()
	require.NoError(t, m.Eval())
	out, err := m.Forward(x)
	require.NoError(t, err)
	require.Len(t, out, 1)
	t.Cleanup(out[0].Close)
	return out[0]
}

// tensorBytes returns every tensor of a state dict as bytes, by key.
func stateBytes(t *testing.T, sd *torch.StateDict) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, key := range sd.Keys() {
		tensor, _ := sd.Get(key)
		data, err := tensor.Bytes()
		require.NoError(t, err)
		out[key] = data
	}
	return out
}

// moduleBytes returns a copy of every tensor of the module's state dict.
func moduleStateBytes(t *testing.T, m *torch.Module) map[string][]byte {
	t.Helper()
	sd, err := torch.StateDictOf(m)
	require.NoError(t, err)
	defer sd.Close()
	return stateBytes(t, sd)
}

func TestDecomposedStateMatchesIO(t *testing.T) {
	for _, tc := range ioCases {
		t.Run(tc.name, func(t *testing.T) {
			model := loadDecomposed(t, tc.name)
			sd, err := torch.LoadStateDictFile(testutil.AMCT(tc.name, "decomposed_state.pt"))
			require.NoError(t, err)
			defer sd.Close()

			entries, err := model.StateDict()
			require.NoError(t, err)
			names := make([]string, len(entries))
			for i, e := range entries {
				names[i] = e.Name
			}
			assert.Equal(t, names, sd.Keys(), "the file's keys in the module's state_dict order")

			report, err := model.LoadStateDict(sd, true)
			require.NoError(t, err)
			assert.Equal(t, names, report.Loaded)
			assert.True(t, report.OK())

			x, y := readIOFile(t, testutil.AMCT(tc.name, "io.pt"))
			want := valuesOf(t, y)
			got := valuesOf(t, evalForward(t, model, x))
			bound := 1e-4 + tc.rtol*maxAbsValue(want)
			diff := maxAbsDifference(t, got, want)
			t.Logf("max abs difference %.3g, allowed %.3g", diff, bound)
			assert.LessOrEqual(t, diff, bound)
		})
	}
}

func TestLoadStateDictCopiesInPlace(t *testing.T) {
	model := loadDecomposed(t, "mixed")
	conv, err := model.Submodule("down.0")
	require.NoError(t, err)
	defer conv.Close()
	before, err := conv.Parameter("weight")
	require.NoError(t, err)
	defer before.Close()

	_, err = model.LoadStateDictFromFile(testutil.AMCT("mixed", "decomposed_state.pt"), true)
	require.NoError(t, err)

	after, err := conv.Parameter("weight")
	require.NoError(t, err)
	defer after.Close()
	assert.True(t, before.Same(after), "the parameter is the same tensor after the load")
	assert.True(t, after.RequiresGrad())

	sd, err := torch.LoadStateDictFile(testutil.AMCT("mixed", "decomposed_state.pt"))
	require.NoError(t, err)
	defer sd.Close()
	want, _ := sd.Get("down.0.weight")
	assert.Equal(t, valuesOf(t, want), valuesOf(t, after))
}

func TestLoadStateDictKeepsSharing(t *testing.T) {
	model := loadDecomposed(t, "shared_weight")
	parameter := func(path string) *torch.Tensor {
		sub, err := model.Submodule(path)
		require.NoError(t, err)
		defer sub.Close()
		p, err := sub.Parameter("weight")
		require.NoError(t, err)
		t.Cleanup(p.Close)
		return p
	}
	require.True(t, parameter("c1.0").Same(parameter("c2.0")), "decompose.Network shares the new weights")

	sd, err := torch.StateDictOf(model)
	require.NoError(t, err)
	defer sd.Close()
	for _, key := range sd.Keys() {
		tensor, _ := sd.Get(key)
		values := valuesOf(t, tensor)
		for i := range values {
			values[i] = float32(i%7) * 0.25
		}
		replacement, err := torch.FromFloat32(values, tensor.Shape()...)
		require.NoError(t, err)
		sd.Set(key, replacement)
	}
	_, err = model.LoadStateDict(sd, true)
	require.NoError(t, err)

	assert.True(t, parameter("c1.0").Same(parameter("c2.0")), "shared weights stay shared")
	assert.True(t, parameter("c1.1").Same(parameter("c2.1")))
	assert.Equal(t, float32(0.25), valuesOf(t, parameter("c2.0"))[1])
}

func TestLoadStateDictKeepsChannelsLast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channels_last.pt")
	testutil.PythonCode(t, `
import sys, torch
torch.manual_seed(0)
conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
torch.jit.script(conv).save(sys.argv[1])
torch.save(torch.nn.Conv2d(4, 8, 3).state_dict(), sys.argv[1] + '.state')
`, path)
	model, err := torch.Load(path)
	require.NoError(t, err)
	defer model.Close()
	weight, err := model.Parameter("weight")
	require.NoError(t, err)
	defer weight.Close()
	require.True(t, weight.ChannelsLast())

	_, err = model.LoadStateDictFromFile(path+".state", true)
	require.NoError(t, err)

	after, err := model.Parameter("weight")
	require.NoError(t, err)
	defer after.Close()
	assert.True(t, after.ChannelsLast(), "the weight stays channels-last")
	sd, err := torch.LoadStateDictFile(path + ".state")
	require.NoError(t, err)
	defer sd.Close()
	want, _ := sd.Get("weight")
	assert.False(t, want.ChannelsLast())
	assert.Equal(t, valuesOf(t, want), valuesOf(t, after))
}

// brokenStateDict returns mixed's decomposed state dict with one key
// missing, one unexpected key, one tensor of the wrong shape and one of the
// wrong dtype.
func brokenStateDict(t *testing.T) *torch.StateDict {
	t.Helper()
	sd, err := torch.LoadStateDictFile(testutil.AMCT("mixed", "decomposed_state.pt"))
	require.NoError(t, err)
	t.Cleanup(sd.Close)
	sd.Delete("tall.1.bias")

	extra, err := torch.FromFloat32([]float32{1, 2}, 2)
	require.NoError(t, err)
	sd.Set("tall.2.weight", extra)

	wrongShape, err := torch.FromFloat32(make([]float32, 6), 2, 3)
	require.NoError(t, err)
	sd.Set("stem.bias", wrongShape)

	wrongDType, err := torch.FromFloat64(make([]float64, 96), 96)
	require.NoError(t, err)
	sd.Set("tail.0.1.1.bias", wrongDType)
	return sd
}

func TestLoadStateDictStrictListsAll(t *testing.T) {
	model := loadDecomposed(t, "mixed")
	before := moduleStateBytes(t, model)

	report, err := model.LoadStateDict(brokenStateDict(t), true)
	require.Error(t, err)
	assert.ErrorIs(t, err, torch.ErrStateDictMismatch)
	var mismatch *torch.StateDictError
	require.True(t, errors.As(err, &mismatch))
	assert.Equal(t, []string{"tall.1.bias"}, mismatch.Missing)
	assert.Equal(t, []string{"tall.2.weight"}, mismatch.Unexpected)
	require.Len(t, mismatch.Mismatched, 2)
	assert.Equal(t, torch.Mismatch{Key: "stem.bias", ExpectedShape: []int64{128}, ExpectedDType: torch.Float32,
		Shape: []int64{2, 3}, DType: torch.Float32}, mismatch.Mismatched[0])
	assert.Equal(t, torch.Mismatch{Key: "tail.0.1.1.bias", ExpectedShape: []int64{96}, ExpectedDType: torch.Float32,
		Shape: []int64{96}, DType: torch.Float64}, mismatch.Mismatched[1])
	for _, key := range []string{"tall.1.bias", "tall.2.weight", "stem.bias", "tail.0.1.1.bias", "[2 3] float32"} {
		assert.Contains(t, err.Error(), key)
	}
	assert.Empty(t, report.Loaded)

	assert.Equal(t, before, moduleStateBytes(t, model), "a failed strict load changes nothing")
}

func TestLoadStateDictNonStrictSkips(t *testing.T) {
	model := loadDecomposed(t, "mixed")
	before := moduleStateBytes(t, model)
	sd := brokenStateDict(t)

	report, err := model.LoadStateDict(sd, false)
	require.NoError(t, err)
	assert.False(t, report.OK())
	assert.Equal(t, []string{"tall.1.bias"}, report.Missing)
	assert.Equal(t, []string{"tall.2.weight"}, report.Unexpected)
	assert.Equal(t, []string{"tall.2.weight", "stem.bias", "tail.0.1.1.bias"}, report.Skipped())
	assert.Len(t, report.Loaded, sd.Len()-3)

	after := moduleStateBytes(t, model)
	loaded := stateBytes(t, sd)
	for _, key := range report.Loaded {
		assert.Equal(t, loaded[key], after[key], key)
	}
	for _, key := range []string{"tall.1.bias", "stem.bias", "tail.0.1.1.bias"} {
		assert.Equal(t, before[key], after[key], "%s keeps its value", key)
	}
}

func TestLoadStateDictOfAnotherModel(t *testing.T) {
	source := loadDecomposed(t, "mixed")
	_, err := source.LoadStateDictFromFile(testutil.AMCT("mixed", "decomposed_state.pt"), true)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "tuned.pt")
	require.NoError(t, source.Save(path))

	saved, err := torch.Load(path)
	require.NoError(t, err)
	defer saved.Close()
	sd, err := torch.StateDictOf(saved)
	require.NoError(t, err)
	defer sd.Close()

	target := loadDecomposed(t, "mixed")
	_, err = target.LoadStateDict(sd, true)
	require.NoError(t, err)
	assert.Equal(t, moduleStateBytes(t, source), moduleStateBytes(t, target))

	// Loading a module's own state dict into it changes nothing.
	own, err := torch.StateDictOf(target)
	require.NoError(t, err)
	defer own.Close()
	before := moduleStateBytes(t, target)
	_, err = target.LoadStateDict(own, true)
	require.NoError(t, err)
	assert.Equal(t, before, moduleStateBytes(t, target))
}

func TestLoadStateDictIntoOriginalFails(t *testing.T) {
	model, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)
	defer model.Close()

	_, err = model.LoadStateDictFromFile(testutil.AMCT("mixed", "decomposed_state.pt"), true)
	require.ErrorIs(t, err, torch.ErrStateDictMismatch)
	var mismatch *torch.StateDictError
	require.True(t, errors.As(err, &mismatch))
	assert.Contains(t, mismatch.Missing, "down.weight")
	assert.Contains(t, mismatch.Unexpected, "down.0.weight")
	assert.Contains(t, mismatch.Unexpected, "down.1.weight")
	assert.Contains(t, err.Error(), "decomposed_state.pt")
}

func TestSaveStateDictRoundTrip(t *testing.T) {
	model := loadDecomposed(t, "mixed")
	_, err := model.LoadStateDictFromFile(testutil.AMCT("mixed", "decomposed_state.pt"), true)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "state.pt")
	require.NoError(t, model.SaveStateDict(path))

	read, err := torch.LoadStateDictFile(path)
	require.NoError(t, err)
	defer read.Close()
	original, err := torch.LoadStateDictFile(testutil.AMCT("mixed", "decomposed_state.pt"))
	require.NoError(t, err)
	defer original.Close()
	assert.Equal(t, original.Keys(), read.Keys())
	assert.Equal(t, stateBytes(t, original), stateBytes(t, read))

	out := testutil.RunPython(t, "finetune_check.py", "mixed", "--state", path,
		"--same-as", testutil.AMCT("mixed", "decomposed_state.pt"))
	assert.Contains(t, out, "ok   mixed")
}

func TestSaveStateDictSharedWeights(t *testing.T) {
	model := loadDecomposed(t, "shared_weight")
	path := filepath.Join(t.TempDir(), "state.pt")
	require.NoError(t, model.SaveStateDict(path))

	out := testutil.PythonCode(t, `
import sys, torch
sys.path.insert(0, sys.argv[2])
import amct_eager
sd = torch.load(sys.argv[1])
print(sd['c1.0.weight'].data_ptr() == sd['c2.0.weight'].data_ptr(), list(sd.keys()))
model, _ = amct_eager.decomposed('shared_weight', 0)
model.load_state_dict(sd, strict=True)
print(torch.equal(model.c2[0].weight, sd['c1.0.weight']))
`, path, testutil.Path("scripts"))
	assert.Equal(t, "True ['c1.0.weight', 'c1.1.weight', 'c2.0.weight', 'c2.1.weight']\nTrue\n", out)
}

// pythonFiles writes torch.save files that exercise the reader.
const pythonFiles = `
import collections, os, sys, torch
out = sys.argv[1]
torch.manual_seed(0)
base = torch.arange(24, dtype=torch.float32)
kinds = collections.OrderedDict([
    ('half', torch.randn(3, 2).half()),
    ('bfloat16', torch.randn(3).bfloat16()),
    ('double', torch.randn(2, 2).double()),
    ('long', torch.tensor([1, -2, 3 << 40])),
    ('int', torch.tensor([7, -8], dtype=torch.int32)),
    ('short', torch.tensor([1, -1], dtype=torch.int16)),
    ('char', torch.tensor([1, -1], dtype=torch.int8)),
    ('byte', torch.tensor([200, 3], dtype=torch.uint8)),
    ('bool', torch.tensor([True, False, True])),
    ('scalar', torch.tensor(5, dtype=torch.int64)),
    ('empty', torch.zeros(0, 3)),
    ('view', base[5:11].view(2, 3)),
    ('transposed', base.view(4, 6).t()),
    ('channels_last', torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
])
kinds['same_storage'] = base.view(6, 4)
torch.save(kinds, os.path.join(out, 'kinds.pt'))
torch.save(kinds, os.path.join(out, 'kinds_p4.pt'), pickle_protocol=4)
torch.save({'w': torch.ones(2)}, os.path.join(out, 'plain_dict.pt'))
torch.save({'w': torch.ones(2)}, os.path.join(out, 'legacy.pt'), _use_new_zipfile_serialization=False)
torch.save(torch.ones(2), os.path.join(out, 'tensor.pt'))
torch.save({'model': {'w': torch.ones(2)}, 'epoch': 3}, os.path.join(out, 'checkpoint.pt'))
torch.save({'w': torch.nn.Parameter(torch.ones(2))}, os.path.join(out, 'parameter.pt'))
torch.save({'layer': torch.nn.Linear(2, 2)}, os.path.join(out, 'module.pt'))
torch.jit.script(torch.nn.Linear(2, 2)).save(os.path.join(out, 'script.pt'))
with open(os.path.join(out, 'text.pt'), 'w') as f:
    f.write('not a torch file')
for key, t in kinds.items():
    with open(os.path.join(out, key + '.raw'), 'wb') as f:
        f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
`

func TestStateDictSetAndDelete(t *testing.T) {
	sd := torch.NewStateDict()
	defer sd.Close()
	for _, key := range []string{"a", "b", "c"} {
		tensor, err := torch.FromFloat32([]float32{1}, 1)
		require.NoError(t, err)
		sd.Set(key, tensor)
	}
	replacement, err := torch.FromFloat32([]float32{2}, 1)
	require.NoError(t, err)
	sd.Set("a", replacement)
	sd.Delete("b")
	sd.Delete("missing")

	assert.Equal(t, []string{"a", "c"}, sd.Keys())
	assert.Equal(t, 2, sd.Len())
	a, ok := sd.Get("a")
	require.True(t, ok)
	assert.Equal(t, []float32{2}, valuesOf(t, a))
	_, ok = sd.Get("b")
	assert.False(t, ok)
}

// TestTorchSaveFiles reads and writes files that Python's torch.save made;
// Python writes them once for all subtests.
func TestTorchSaveFiles(t *testing.T) {
	dir := t.TempDir()
	testutil.PythonCode(t, pythonFiles, dir)

	t.Run("kinds", func(t *testing.T) {
		wantShapes := map[string][]int64{
			"half": {3, 2}, "bfloat16": {3}, "double": {2, 2}, "long": {3}, "int": {2}, "short": {2},
			"char": {2}, "byte": {2}, "bool": {3}, "scalar": {}, "empty": {0, 3}, "view": {2, 3},
			"transposed": {6, 4}, "channels_last": {2, 3, 4, 5}, "same_storage": {6, 4},
		}
		wantDTypes := map[string]torch.DType{
			"half": torch.Float16, "bfloat16": torch.BFloat16, "double": torch.Float64, "long": torch.Int64,
			"int": torch.Int32, "short": torch.Int16, "char": torch.Int8, "byte": torch.Uint8, "bool": torch.Bool,
			"scalar": torch.Int64, "empty": torch.Float32, "view": torch.Float32, "transposed": torch.Float32,
			"channels_last": torch.Float32, "same_storage": torch.Float32,
		}
		for _, file := range []string{"kinds.pt", "kinds_p4.pt"} {
			t.Run(file, func(t *testing.T) {
				sd, err := torch.LoadStateDictFile(filepath.Join(dir, file))
				require.NoError(t, err)
				defer sd.Close()
				require.Equal(t, []string{"half", "bfloat16", "double", "long", "int", "short", "char", "byte",
					"bool", "scalar", "empty", "view", "transposed", "channels_last", "same_storage"}, sd.Keys())
				for _, key := range sd.Keys() {
					tensor, _ := sd.Get(key)
					assert.Equal(t, wantShapes[key], tensor.Shape(), key)
					assert.Equal(t, wantDTypes[key], tensor.DType(), key)
					raw, err := os.ReadFile(filepath.Join(dir, key+".raw"))
					require.NoError(t, err)
					data, err := tensor.Bytes()
					require.NoError(t, err)
					assert.Equal(t, raw, data, key)
				}
				channelsLast, _ := sd.Get("channels_last")
				assert.True(t, channelsLast.ChannelsLast())
			})
		}
	})
	t.Run("parameter", func(t *testing.T) {
		sd, err := torch.LoadStateDictFile(filepath.Join(dir, "parameter.pt"))
		require.NoError(t, err)
		defer sd.Close()
		w, ok := sd.Get("w")
		require.True(t, ok)
		assert.Equal(t, []float32{1, 1}, valuesOf(t, w))
	})
	t.Run("rejected", func(t *testing.T) {
		cases := []struct {
			file    string
			message string
		}{
			{"legacy.pt", "_use_new_zipfile_serialization=False"},
			{"text.pt", "not a zip archive"},
			{"tensor.pt", "contains a tensor, not a dict"},
			{"checkpoint.pt", `value of "model" is a dict`},
			{"module.pt", "torch.nn.modules.linear.Linear"},
			{"script.pt", "TorchScript archive"},
		}
		for _, tc := range cases {
			t.Run(tc.file, func(t *testing.T) {
				sd, err := torch.LoadStateDictFile(filepath.Join(dir, tc.file))
				require.Error(t, err)
				assert.Nil(t, sd)
				assert.ErrorIs(t, err, torch.ErrNotStateDictFile)
				assert.Contains(t, err.Error(), tc.message)
				assert.True(t, strings.Contains(err.Error(), tc.file), "the message names the file: %v", err)
			})
		}

		_, err := torch.LoadStateDictFile(filepath.Join(dir, "missing.pt"))
		assert.ErrorIs(t, err, os.ErrNotExist)
	})
	t.Run("resaved", func(t *testing.T) {
		sd, err := torch.LoadStateDictFile(filepath.Join(dir, "kinds.pt"))
		require.NoError(t, err)
		defer sd.Close()
		path := filepath.Join(dir, "resaved.pt")
		require.NoError(t, sd.Save(path))

		out := testutil.PythonCode(t, `
import collections, sys, torch
got, want = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert type(got) is collections.OrderedDict, type(got)
assert list(got) == list(want), list(got)
for key in want:
    g, w = got[key], want[key]
    assert g.dtype == w.dtype, key
    assert g.shape == w.shape, key
    assert g.stride() == w.stride(), key
    assert torch.equal(g, w), key
    assert not g.requires_grad, key
assert got['view'].storage_offset() == 5
assert got['view'].data_ptr() - 5 * 4 == got['same_storage'].data_ptr()
print('ok')
`, path, filepath.Join(dir, "kinds.pt"))
		assert.Equal(t, "ok\n", out)
	})
}
