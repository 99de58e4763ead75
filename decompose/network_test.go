package decompose_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// Tests in this file seed and draw from libtorch's default generator, which
// is global, so none of them runs in parallel.

// inputShapes are the forward input shapes of zoo_models.INPUTS, by fixture
// name, plus that of the models of scripts/bad_models.py.
var inputShapes = map[string][]int64{
	"resnet18":        {1, 3, 64, 64},
	"resnet18_traced": {1, 3, 64, 64},
	"mixed":           {1, 3, 32, 32},
	"mixed_traced":    {1, 3, 32, 32},
	"root_conv":       {1, 64, 16, 16},
	"shared_weight":   {1, 64, 16, 16},
	"lowrank":         {1, 256, 16, 16},
	"bad_models":      {1, 16, 8, 8},
}

// reference is the part of testdata/amct/NAME/reference.json that Go checks.
type reference struct {
	changes decompose.Changes
	seed    uint64
	sha256  map[string]string
}

// readReference reads testdata/amct/NAME/reference.json, keeping the order
// of its changes object.
func readReference(t *testing.T, name string) reference {
	t.Helper()
	data, err := os.ReadFile(testutil.AMCT(name, "reference.json"))
	require.NoError(t, err)
	var raw struct {
		Changes json.RawMessage `json:"changes"`
		Seeded  struct {
			Seed   uint64            `json:"seed"`
			SHA256 map[string]string `json:"sha256"`
		} `json:"seeded"`
	}
	require.NoError(t, json.Unmarshal(data, &raw))
	return reference{changes: orderedChanges(t, raw.Changes), seed: raw.Seeded.Seed, sha256: raw.Seeded.SHA256}
}

// orderedChanges decodes a JSON object of old name to [new, new] in order.
func orderedChanges(t *testing.T, data []byte) decompose.Changes {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(string(data)))
	token, err := dec.Token()
	require.NoError(t, err)
	require.Equal(t, json.Delim('{'), token)
	changes := decompose.Changes{}
	for dec.More() {
		token, err := dec.Token()
		require.NoError(t, err)
		var change decompose.Change
		change.Layer = token.(string)
		require.NoError(t, dec.Decode(&change.NewLayers))
		changes = append(changes, change)
	}
	return changes
}

// loadModel loads a TorchScript file and closes it when the test ends.
func loadModel(t *testing.T, path string) *torch.Module {
	t.Helper()
	m, err := torch.Load(path)
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

// testInput returns a deterministic float32 tensor of the given shape with
// values in (-1, 1).
func testInput(t *testing.T, shape []int64) *torch.Tensor {
	t.Helper()
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	data := make([]float32, n)
	for i := range data {
		data[i] = float32(math.Sin(float64(i)*0.37 + 0.1))
	}
	x, err := torch.FromFloat32(data, shape...)
	require.NoError(t, err)
	t.Cleanup(x.Close)
	return x
}

// forward runs m on x and returns its only output, closed when the test ends.
func forward(t *testing.T, m *torch.Module, x *torch.Tensor) *torch.Tensor {
	t.Helper()
	outs, err := m.Forward(x)
	require.NoError(t, err)
	for _, out := range outs {
		t.Cleanup(out.Close)
	}
	require.Len(t, outs, 1)
	return outs[0]
}

// parameter returns the parameter or buffer at a dotted state-dict key.
func parameter(t *testing.T, m *torch.Module, key string) *torch.Tensor {
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
	t.Cleanup(p.Close)
	return p
}

func hashBytes(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

func tensorHash(t *testing.T, x *torch.Tensor) string {
	t.Helper()
	data, err := x.Bytes()
	require.NoError(t, err)
	return hashBytes(data)
}

func float32s(t *testing.T, x *torch.Tensor) []float32 {
	t.Helper()
	values, err := x.Float32s()
	require.NoError(t, err)
	return values
}

// modelState is everything a failed Network must leave as it was.
type modelState struct {
	Modules []torch.ModuleInfo
	State   []torch.StateEntry
	// Values maps each state-dict key to the SHA-256 of its bytes.
	Values map[string]string
	// Output is the SHA-256 of the forward output for testInput, and
	// OutputShape its shape.
	Output      string
	OutputShape []int64
}

func snapshot(t *testing.T, m *torch.Module, input *torch.Tensor) modelState {
	t.Helper()
	var s modelState
	var err error
	s.Modules, err = m.NamedModules()
	require.NoError(t, err)
	s.State, err = m.StateDict()
	require.NoError(t, err)
	s.Values = make(map[string]string, len(s.State))
	for _, entry := range s.State {
		s.Values[entry.Name] = tensorHash(t, parameter(t, m, entry.Name))
	}
	outs, err := m.Forward(input)
	require.NoError(t, err)
	for _, out := range outs {
		defer out.Close()
	}
	require.NotEmpty(t, outs)
	s.Output = tensorHash(t, outs[0])
	s.OutputShape = outs[0].Shape()
	return s
}

// fileState is the content and modification time of a file.
type fileState struct {
	Data    string
	ModTime time.Time
}

// statFile returns a file's state. A folder gives its modification time
// alone, and a missing file the zero state.
func statFile(t *testing.T, path string) fileState {
	t.Helper()
	info, err := os.Stat(path)
	if os.IsNotExist(err) {
		return fileState{}
	}
	require.NoError(t, err)
	s := fileState{ModTime: info.ModTime()}
	if info.Mode().IsRegular() {
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		s.Data = string(data)
	}
	return s
}

// newParameterHashes returns the SHA-256 of every state-dict entry of the
// layers the changes created.
func newParameterHashes(t *testing.T, m *torch.Module, changes decompose.Changes) map[string]string {
	t.Helper()
	state, err := m.StateDict()
	require.NoError(t, err)
	hashes := map[string]string{}
	for _, entry := range state {
		for _, c := range changes {
			for _, layer := range c.NewLayers {
				if strings.HasPrefix(entry.Name, layer+".") {
					hashes[entry.Name] = tensorHash(t, parameter(t, m, entry.Name))
				}
			}
		}
	}
	return hashes
}

func TestNetworkMatchesAMCT(t *testing.T) {
	tests := []struct {
		fixture, amct string
		traced        bool
		// io is whether testdata/amct/NAME has io.pt and decomposed_state.pt.
		io bool
	}{
		{fixture: "resnet18", amct: "resnet18"},
		{fixture: "mixed", amct: "mixed", io: true},
		{fixture: "root_conv", amct: "root_conv"},
		{fixture: "shared_weight", amct: "shared_weight"},
		{fixture: "lowrank", amct: "lowrank", io: true},
		{fixture: "resnet18_traced", amct: "resnet18", traced: true},
		{fixture: "mixed_traced", amct: "mixed", traced: true, io: true},
	}
	// The Go side runs one model at a time because it seeds the global
	// generator. The Python checks of the saved files then run in parallel.
	checks := map[string][]string{}
	// The files stay in the parent test's folder for the checks.
	saved := t.TempDir()
	for _, tt := range tests {
		t.Run(tt.fixture, func(t *testing.T) {
			ref := readReference(t, tt.amct)
			original := testutil.Fixture(t, tt.fixture)
			model := loadModel(t, original)
			input := testInput(t, inputShapes[tt.fixture])
			before := snapshot(t, model, input)

			torch.ManualSeed(ref.seed)
			result, changes, err := decompose.Network(model, testutil.AMCT(tt.amct, "decompose_info.json"))
			require.NoError(t, err)
			require.NotNil(t, result)
			t.Cleanup(result.Close)
			assert.Equal(t, ref.changes, changes)

			rootConv := len(changes) == 1 && changes[0].Layer == ""
			if rootConv {
				assert.False(t, result.SameObject(model), "a root Conv2d must give a new module")
				assert.Equal(t, before, snapshot(t, model, input), "the original root Conv2d changed")
			} else {
				assert.True(t, result.SameObject(model), "the model must change in place")
			}

			hashes := newParameterHashes(t, result, changes)
			assert.Len(t, hashes, len(ref.sha256))
			for key, want := range ref.sha256 {
				assert.Equal(t, want, hashes[key], "SHA-256 of %s after torch.ManualSeed(%d)", key, ref.seed)
			}

			dir := filepath.Join(saved, tt.fixture)
			require.NoError(t, os.Mkdir(dir, 0o755))
			out := filepath.Join(dir, "decomposed.pt")
			require.NoError(t, result.Save(out))
			changesJSON, err := changes.MarshalJSON()
			require.NoError(t, err)
			changesPath := filepath.Join(dir, "changes.json")
			require.NoError(t, os.WriteFile(changesPath, changesJSON, 0o644))

			args := []string{"--reference", testutil.AMCT(tt.amct, "reference.json"), "--model", out, "--changes", changesPath}
			if tt.traced {
				args = append(args, "--traced", original)
			} else {
				args = append(args, "--original", original)
			}
			if tt.io {
				args = append(args, "--io", testutil.AMCT(tt.amct, "io.pt"), "--state", testutil.AMCT(tt.amct, "decomposed_state.pt"))
			}
			checks[tt.fixture] = args
		})
	}

	t.Run("check_reference", func(t *testing.T) {
		for _, tt := range tests {
			args, ok := checks[tt.fixture]
			if !ok {
				continue
			}
			t.Run(tt.fixture, func(t *testing.T) {
				t.Parallel()
				report := testutil.RunPython(t, "check_reference.py", args...)
				assert.Contains(t, report, "checks passed")
			})
		}
	})
}

func TestNetworkChangesJSON(t *testing.T) {
	tests := []struct {
		name    string
		changes decompose.Changes
		want    string
	}{
		{"empty", decompose.Changes{}, `{}`},
		{"root", decompose.Changes{{Layer: "", NewLayers: [2]string{"0", "1"}}}, `{"": ["0", "1"]}`},
		{
			"file order kept",
			decompose.Changes{
				{Layer: "tall", NewLayers: [2]string{"tall.0", "tall.1"}},
				{Layer: "down", NewLayers: [2]string{"down.0", "down.1"}},
			},
			`{"tall": ["tall.0", "tall.1"], "down": ["down.0", "down.1"]}`,
		},
		{
			"quotes escaped",
			decompose.Changes{{Layer: `a"b`, NewLayers: [2]string{`a"b.0`, `a"b.1`}}},
			`{"a\"b": ["a\"b.0", "a\"b.1"]}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.changes.MarshalJSON()
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(got))
		})
	}
}

func TestNetworkDefaultInit(t *testing.T) {
	tests := []struct {
		name, path, info string
	}{
		{name: "mixed", path: testutil.Fixture(t, "mixed"), info: testutil.AMCT("mixed", "decompose_info.json")},
		{name: "mixed_traced", path: testutil.Fixture(t, "mixed_traced"), info: testutil.AMCT("mixed", "decompose_info.json")},
		{name: "lowrank", path: testutil.Fixture(t, "lowrank"), info: testutil.AMCT("lowrank", "decompose_info.json")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			model := loadModel(t, tt.path)
			info, err := decompose.ReadInfo(tt.info)
			require.NoError(t, err)
			originalBias := map[string]bool{}
			for _, e := range info.Entries {
				sub, err := model.Submodule(e.Layer.Name)
				require.NoError(t, err)
				conv, err := sub.Conv2d()
				sub.Close()
				require.NoError(t, err)
				originalBias[e.Layer.Name] = conv.Bias
			}

			torch.ManualSeed(99)
			_, changes, err := decompose.Network(model, tt.info)
			require.NoError(t, err)
			require.Len(t, changes, len(info.Entries))

			for _, c := range changes {
				for i, layer := range c.NewLayers {
					sub, err := model.Submodule(layer)
					require.NoError(t, err)
					conv, err := sub.Conv2d()
					sub.Close()
					require.NoError(t, err)

					fanIn := conv.InChannels / conv.Groups * conv.KernelSize[0] * conv.KernelSize[1]
					bound := 1 / math.Sqrt(float64(fanIn))
					checkUniform(t, layer+".weight", float32s(t, parameter(t, model, layer+".weight")), bound)

					wantBias := i == 1 && originalBias[c.Layer]
					assert.Equal(t, wantBias, conv.Bias, "%s bias", layer)
					state, err := model.StateDict()
					require.NoError(t, err)
					assert.Equal(t, wantBias, hasStateKey(state, layer+".bias"), "%s.bias in the state dict", layer)
					if wantBias {
						checkUniform(t, layer+".bias", float32s(t, parameter(t, model, layer+".bias")), bound)
					}
				}
			}
		})
	}
}

// checkUniform checks that values look drawn from U(-bound, bound): all
// inside, not all equal, and for large tensors reaching close to the bound.
func checkUniform(t *testing.T, name string, values []float32, bound float64) {
	t.Helper()
	require.NotEmpty(t, values, name)
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range values {
		lo = math.Min(lo, float64(v))
		hi = math.Max(hi, float64(v))
	}
	assert.Greater(t, lo, -bound, "%s: minimum below -1/sqrt(fan_in)", name)
	assert.Less(t, hi, bound, "%s: maximum above 1/sqrt(fan_in)", name)
	assert.Less(t, lo, hi, "%s: all values equal", name)
	if len(values) >= 1000 {
		// 1000 draws all inside 0.95 of the range happen with probability 0.95^1000.
		assert.Greater(t, math.Max(-lo, hi), 0.95*bound, "%s: values stay far inside 1/sqrt(fan_in)", name)
	}
}

func hasStateKey(state []torch.StateEntry, key string) bool {
	for _, e := range state {
		if e.Name == key {
			return true
		}
	}
	return false
}

var badModelsMu sync.Mutex

// badModels returns the folder of the models of scripts/bad_models.py,
// FixtureDir()/bad_models, writing them when they are missing or older than
// the script.
func badModels(t *testing.T) string {
	t.Helper()
	badModelsMu.Lock()
	defer badModelsMu.Unlock()
	dir := filepath.Join(testutil.FixtureDir(), "bad_models")
	script, err := os.Stat(testutil.Path("scripts", "bad_models.py"))
	require.NoError(t, err)
	// dtypes.pt is the last file the script writes.
	if made, err := os.Stat(filepath.Join(dir, "dtypes.pt")); err == nil && made.ModTime().After(script.ModTime()) {
		return dir
	}
	testutil.RunPython(t, "bad_models.py", dir)
	return dir
}

func TestNetworkDTypeAndMemoryFormat(t *testing.T) {
	model := loadModel(t, filepath.Join(badModels(t), "dtypes.pt"))
	info := &decompose.Info{Entries: []decompose.Entry{
		scfkEntry("wide", 16, 32, 3, 8),
		scfkEntry("cl", 16, 32, 3, 8),
	}}
	infoPath := writeInfo(t, info)

	_, changes, err := decompose.Network(model, infoPath)
	require.NoError(t, err)
	require.Len(t, changes, 2)

	tests := []struct {
		key          string
		dtype        torch.DType
		channelsLast bool
	}{
		{"wide.0.weight", torch.Float64, false},
		{"wide.1.weight", torch.Float64, false},
		{"wide.1.bias", torch.Float64, false},
		{"cl.0.weight", torch.Float32, true},
		{"cl.1.weight", torch.Float32, true},
		{"cl.1.bias", torch.Float32, false},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			p := parameter(t, model, tt.key)
			assert.Equal(t, tt.dtype, p.DType())
			assert.Equal(t, tt.channelsLast, p.ChannelsLast())
		})
	}

	out := forward(t, model, testInput(t, inputShapes["bad_models"]))
	assert.Equal(t, []int64{1, 32, 8, 8}, out.Shape())
}

// scfkEntry returns a valid SCFK entry for a Conv2d(in, out, kernel) with
// stride and dilation 1.
func scfkEntry(name string, in, out, kernel, rank int) decompose.Entry {
	return decompose.Entry{
		Layer: decompose.LayerInfo{
			Name: name, InChannels: in, OutChannels: out,
			KernelSize: [2]int{kernel, kernel}, Stride: [2]int{1, 1}, Dilation: [2]int{1, 1}, Groups: 1,
		},
		Mode:       decompose.SCFK,
		FirstShape: [4]int{rank, in, kernel, 1},
		LastShape:  [4]int{out, rank, 1, kernel},
	}
}

// writeInfo writes info in AMCT's layout, without validation, to a new file
// and returns its path.
func writeInfo(t *testing.T, info *decompose.Info) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "decompose_info.json")
	require.NoError(t, os.WriteFile(path, info.Marshal(), 0o644))
	return path
}

func TestNetworkSamePadding(t *testing.T) {
	bad := badModels(t)
	for _, name := range []string{"same_padding", "same_padding_traced"} {
		t.Run(name, func(t *testing.T) {
			model := loadModel(t, filepath.Join(bad, name+".pt"))
			input := testInput(t, inputShapes["bad_models"])
			before := forward(t, model, input).Shape()
			info := &decompose.Info{Entries: []decompose.Entry{
				scfkEntry("conv", 16, 32, 3, 8),
				scfkEntry("even", 32, 32, 4, 8),
			}}

			_, changes, err := decompose.Network(model, writeInfo(t, info))
			require.NoError(t, err)
			require.Len(t, changes, 2)
			for _, c := range changes {
				for _, layer := range c.NewLayers {
					sub, err := model.Submodule(layer)
					require.NoError(t, err)
					conv, err := sub.Conv2d()
					sub.Close()
					require.NoError(t, err)
					assert.Equal(t, "same", conv.PaddingString, "%s padding", layer)
				}
			}
			assert.Equal(t, before, forward(t, model, input).Shape(), "padding='same' must keep the output size")

			out := filepath.Join(t.TempDir(), "out.pt")
			require.NoError(t, model.Save(out))
			got := testutil.PythonCode(t, `
import sys, torch
m = torch.jit.load(sys.argv[1])
print(*(getattr(getattr(m, layer), index).padding for layer in ('conv', 'even') for index in '01'))
print(list(m(torch.zeros(1, 16, 8, 8)).shape))
`, out)
			assert.Equal(t, "same same same same\n[1, 32, 8, 8]\n", got)
		})
	}
}

func TestNetworkAfterForward(t *testing.T) {
	tests := []struct {
		fixture, info string
		// last is the layer that computes the model's output, and lastNew
		// its two new layers.
		last    string
		lastNew [2]string
	}{
		{"mixed", "mixed", "tail.0.1", [2]string{"tail.0.1.0", "tail.0.1.1"}},
		{"mixed_traced", "mixed", "tail.0.1", [2]string{"tail.0.1.0", "tail.0.1.1"}},
		{"root_conv", "root_conv", "", [2]string{"0", "1"}},
	}
	for _, tt := range tests {
		t.Run(tt.fixture, func(t *testing.T) {
			model := loadModel(t, testutil.Fixture(t, tt.fixture))
			input := testInput(t, inputShapes[tt.fixture])
			before := forward(t, model, input)
			beforeHash := tensorHash(t, before)

			torch.ManualSeed(5)
			result, changes, err := decompose.Network(model, testutil.AMCT(tt.info, "decompose_info.json"))
			require.NoError(t, err)
			t.Cleanup(result.Close)
			require.NotEmpty(t, changes)
			assert.Equal(t, tt.last, changes[len(changes)-1].Layer)

			after := forward(t, result, input)
			assert.Equal(t, before.Shape(), after.Shape())
			assert.NotEqual(t, beforeHash, tensorHash(t, after), "the output must come from the new weights")

			// With the first new layer's weight at zero, the output is the
			// last new layer's bias at every position.
			firstWeight := parameter(t, result, tt.lastNew[0]+".weight")
			zeros, err := torch.FromFloat32(make([]float32, firstWeight.Numel()), firstWeight.Shape()...)
			require.NoError(t, err)
			defer zeros.Close()
			sub, err := result.Submodule(tt.lastNew[0])
			require.NoError(t, err)
			defer sub.Close()
			require.NoError(t, sub.SetParameter("weight", zeros))

			bias := float32s(t, parameter(t, result, tt.lastNew[1]+".bias"))
			zeroed := forward(t, result, input)
			shape := zeroed.Shape()
			require.Len(t, shape, 4)
			require.Equal(t, int64(len(bias)), shape[1])
			values := float32s(t, zeroed)
			plane := int(shape[2] * shape[3])
			mismatches := 0
			for i, v := range values {
				if v != bias[(i/plane)%len(bias)] {
					mismatches++
				}
			}
			assert.Zero(t, mismatches, "output values that are not the bias of %s, of %d", tt.lastNew[1], len(values))

			if tt.last == "" {
				assert.Equal(t, beforeHash, tensorHash(t, forward(t, model, input)), "the original root Conv2d changed")
			}
		})
	}
}

func TestNetworkSeedReproducible(t *testing.T) {
	run := func(seed uint64) map[string]string {
		model := loadModel(t, testutil.Fixture(t, "mixed"))
		torch.ManualSeed(seed)
		_, changes, err := decompose.Network(model, testutil.AMCT("mixed", "decompose_info.json"))
		require.NoError(t, err)
		return newParameterHashes(t, model, changes)
	}
	first := run(7)
	require.Len(t, first, 17, "6 layers: 12 weights and 5 biases")

	assert.Equal(t, first, run(7), "the same seed must give the same parameters")

	other := run(8)
	require.Len(t, other, len(first))
	for key, hash := range first {
		assert.NotEqual(t, hash, other[key], "%s is the same after seeds 7 and 8", key)
	}
}

func TestNetworkEmptyInfo(t *testing.T) {
	model := loadModel(t, testutil.Fixture(t, "mixed"))
	input := testInput(t, inputShapes["mixed"])
	before := snapshot(t, model, input)
	path := filepath.Join(t.TempDir(), "empty.json")
	require.NoError(t, os.WriteFile(path, []byte("[]"), 0o644))

	result, changes, err := decompose.Network(model, path)
	require.NoError(t, err)
	assert.Empty(t, changes)
	assert.True(t, result.SameObject(model))
	assert.Equal(t, before, snapshot(t, model, input))
}

// mixedEntries returns the entries of testdata/amct/mixed/decompose_info.json:
// down, tall, squeeze, blocks.0, blocks.1 and tail.0.1.
func mixedEntries(t *testing.T) []decompose.Entry {
	t.Helper()
	info, err := decompose.ReadInfo(testutil.AMCT("mixed", "decompose_info.json"))
	require.NoError(t, err)
	require.Len(t, info.Entries, 6)
	return info.Entries
}

// editedMixed returns the entries of mixed's information file after edit.
func editedMixed(edit func(entries []decompose.Entry) []decompose.Entry) func(t *testing.T) []decompose.Entry {
	return func(t *testing.T) []decompose.Entry {
		return edit(mixedEntries(t))
	}
}

// tailEntryNamed returns the entry of tail.0.1, a Conv2d(64, 96, 3), under
// another layer name.
func tailEntryNamed(name string) func(t *testing.T) []decompose.Entry {
	return func(t *testing.T) []decompose.Entry {
		e := mixedEntries(t)[5]
		e.Layer.Name = name
		return []decompose.Entry{e}
	}
}

func TestNetworkRejectsBadInput(t *testing.T) {
	bad := badModels(t)
	mixed := testutil.Fixture(t, "mixed")
	tests := []struct {
		name string
		// model is the TorchScript file to change, and shape its input
		// shape (mixed's when empty).
		model string
		shape []int64
		// entries are written in AMCT's layout, unless file is set: then
		// file makes the information file's path in a temporary folder.
		entries func(t *testing.T) []decompose.Entry
		file    func(t *testing.T, dir string) string
		want    error
		// message lists the parts the error message must contain besides
		// the file's path.
		message []string
	}{
		{
			name: "missing file",
			file: func(t *testing.T, dir string) string { return filepath.Join(dir, "missing.json") },
			want: decompose.ErrInfoFile,
		},
		{
			name: "folder",
			file: func(t *testing.T, dir string) string { return dir },
			want: decompose.ErrInfoFile, message: []string{"directory"},
		},
		{
			name: "invalid JSON",
			file: func(t *testing.T, dir string) string {
				data, err := os.ReadFile(testutil.AMCT("mixed", "decompose_info.json"))
				require.NoError(t, err)
				path := filepath.Join(dir, "truncated.json")
				require.NoError(t, os.WriteFile(path, data[:len(data)/2], 0o644))
				return path
			},
			want: decompose.ErrInvalidInfo, message: []string{"invalid JSON"},
		},
		{
			name: "not an array",
			file: func(t *testing.T, dir string) string {
				path := filepath.Join(dir, "object.json")
				require.NoError(t, os.WriteFile(path, []byte(`{"down": 1}`), 0o644))
				return path
			},
			want: decompose.ErrInvalidInfo, message: []string{"JSON array"},
		},
		{
			name: "unknown layer",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[2].Layer.Name = "squeez"
				return e
			}),
			want: decompose.ErrLayerNotFound, message: []string{"entry 2", "squeez", "ori_layer_info.name"},
		},
		{
			name:    "Sequential",
			entries: tailEntryNamed("tail.0"),
			want:    decompose.ErrNotConv2d, message: []string{"tail.0", "ori_layer_info.name", "Sequential"},
		},
		{
			name:    "ReLU",
			entries: tailEntryNamed("tail.0.0"),
			want:    decompose.ErrNotConv2d, message: []string{"tail.0.0", "ori_layer_info.name", "ReLU"},
		},
		{
			name:    "ModuleDict",
			entries: tailEntryNamed("heads"),
			want:    decompose.ErrNotConv2d, message: []string{"heads", "ori_layer_info.name", "ModuleDict"},
		},
		{
			name:  "Conv2d subclass",
			model: filepath.Join(bad, "conv_subclass.pt"), shape: inputShapes["bad_models"],
			entries: func(t *testing.T) []decompose.Entry { return []decompose.Entry{scfkEntry("conv", 16, 32, 3, 8)} },
			want:    decompose.ErrNotConv2d, message: []string{"conv", "ori_layer_info.name", "MyConv"},
		},
		{
			name: "in_channels differ",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[2].Layer.InChannels = 128 // squeeze has 256
				e[2].FirstShape[1] = 128
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"squeeze", "ori_layer_info.in_channels", "256", "128"},
		},
		{
			name: "out_channels differ",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[5].Layer.OutChannels = 64 // tail.0.1 has 96
				e[5].LastShape[0] = 64
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"tail.0.1", "ori_layer_info.out_channels"},
		},
		{
			name: "stride differs",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[0].Layer.Stride = [2]int{1, 1} // down has stride 2
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"entry 0", "down", "ori_layer_info.stride"},
		},
		{
			name: "kernel differs",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[1].Layer.KernelSize = [2]int{3, 3} // tall has (5, 3)
				e[1].LastShape[2] = 3
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"tall", "ori_layer_info.kernel_size"},
		},
		{
			name: "dilation differs",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[4].Layer.Dilation = [2]int{2, 2}
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"blocks.1", "ori_layer_info.dilation"},
		},
		{
			name: "groups differ",
			entries: func(t *testing.T) []decompose.Entry {
				// heads.b is Conv2d(64, 64, 3, groups=2).
				return []decompose.Entry{scfkEntry("heads.b", 64, 64, 3, 16)}
			},
			want: decompose.ErrAttributeMismatch, message: []string{"heads.b", "ori_layer_info.groups"},
		},
		{
			name: "rank differs",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[0].LastShape[1] = 63 // first.out is 64
				return e
			}),
			want: decompose.ErrInconsistentShapes, message: []string{"down", "decom_nodes.last.weight_shape[1]"},
		},
		{
			name: "first input channels differ",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[3].FirstShape[1] = 64 // blocks.0 has 128 input channels
				return e
			}),
			want: decompose.ErrInconsistentShapes, message: []string{"blocks.0", "decom_nodes.first.weight_shape[1]"},
		},
		{
			name: "kernel on the wrong axis",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[0].FirstShape = [4]int{64, 128, 1, 3} // SCFK wants (3, 1) first
				e[0].LastShape = [4]int{256, 64, 3, 1}
				return e
			}),
			want: decompose.ErrInconsistentShapes, message: []string{"down", "decom_nodes.first.weight_shape[2]"},
		},
		{
			name:  "shared weight with different ranks",
			model: testutil.Fixture(t, "shared_weight"), shape: inputShapes["shared_weight"],
			entries: func(t *testing.T) []decompose.Entry {
				info, err := decompose.ReadInfo(testutil.AMCT("shared_weight", "decompose_info.json"))
				require.NoError(t, err)
				require.Len(t, info.Entries, 2)
				e := info.Entries
				e[1].FirstShape[0]--
				e[1].LastShape[1]--
				return e
			},
			want: decompose.ErrInconsistentShapes, message: []string{"c2", "decom_nodes", "c1"},
		},
		{
			name: "duplicate layer",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				return append(e, e[0])
			}),
			want: decompose.ErrDuplicateLayer, message: []string{"entry 6", "down", "ori_layer_info.name"},
		},
		{
			name: "unknown mode",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[3].Mode = "FCXK"
				return e
			}),
			want: decompose.ErrUnknownMode, message: []string{"entry 3", "blocks.0", "mode", "FCXK"},
		},
		{
			name: "groups 2",
			entries: func(t *testing.T) []decompose.Entry {
				e := scfkEntry("heads.b", 64, 64, 3, 16)
				e.Layer.Groups = 2
				return []decompose.Entry{e}
			},
			want: decompose.ErrUnsupportedGroups, message: []string{"heads.b", "ori_layer_info.groups"},
		},
		{
			name: "root listed with other layers",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				root := e[0]
				root.Layer.Name = ""
				return append(e, root)
			}),
			want: decompose.ErrInvalidInfo, message: []string{`""`, "ori_layer_info.name"},
		},
		{
			name:  "parent reads the weight",
			model: filepath.Join(bad, "weight_reader.pt"), shape: inputShapes["bad_models"],
			entries: func(t *testing.T) []decompose.Entry {
				return []decompose.Entry{scfkEntry("first", 16, 16, 3, 4), scfkEntry("reader", 16, 16, 3, 4)}
			},
			want: decompose.ErrUnsupportedLayer, message: []string{"reader", "forward", "weight"},
		},
		{
			name: "last entry bad",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				e[5].Layer.Stride = [2]int{2, 2} // tail.0.1 has stride 1
				return e
			}),
			want: decompose.ErrAttributeMismatch, message: []string{"entry 5", "tail.0.1", "ori_layer_info.stride"},
		},
		{
			name: "last entry not in the model",
			entries: editedMixed(func(e []decompose.Entry) []decompose.Entry {
				extra := e[5]
				extra.Layer.Name = "tail.1"
				return append(e, extra)
			}),
			want: decompose.ErrLayerNotFound, message: []string{"entry 6", "tail.1", "ori_layer_info.name"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			modelPath := tt.model
			if modelPath == "" {
				modelPath = mixed
			}
			model := loadModel(t, modelPath)
			shape := tt.shape
			if shape == nil {
				shape = inputShapes["mixed"]
			}
			input := testInput(t, shape)

			dir := t.TempDir()
			var infoPath string
			if tt.file != nil {
				infoPath = tt.file(t, dir)
			} else {
				infoPath = filepath.Join(dir, "decompose_info.json")
				info := &decompose.Info{Entries: tt.entries(t)}
				require.NoError(t, os.WriteFile(infoPath, info.Marshal(), 0o644))
			}
			// An old modification time shows any rewrite of the file.
			old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
			if _, err := os.Stat(infoPath); err == nil {
				require.NoError(t, os.Chtimes(infoPath, old, old))
			}
			infoBefore := statFile(t, infoPath)
			before := snapshot(t, model, input)

			result, changes, err := decompose.Network(model, infoPath)
			require.Error(t, err)
			assert.ErrorIs(t, err, tt.want)
			assert.Nil(t, result)
			assert.Nil(t, changes)
			assert.Contains(t, err.Error(), infoPath, "the message must name the file")
			for _, part := range tt.message {
				assert.Contains(t, err.Error(), part)
			}
			assert.NotContains(t, err.Error(), "Exception raised from", "C++ backtrace in the message")
			assert.NotContains(t, err.Error(), "\n", "the message must be one line")

			assert.Equal(t, before, snapshot(t, model, input), "the model changed")
			assert.Equal(t, infoBefore, statFile(t, infoPath), "the information file changed")
		})
	}
}

// TestNetworkErrorSentinelsDistinct makes sure each rejected input maps to
// one sentinel: an unknown layer is not also reported as a non-Conv2d, and
// so on.
func TestNetworkErrorSentinelsDistinct(t *testing.T) {
	model := loadModel(t, testutil.Fixture(t, "mixed"))
	sentinels := []error{
		decompose.ErrInfoFile, decompose.ErrLayerNotFound, decompose.ErrNotConv2d,
		decompose.ErrAttributeMismatch, decompose.ErrInconsistentShapes, decompose.ErrUnsupportedGroups,
		decompose.ErrUnsupportedLayer,
	}
	tests := []struct {
		name  string
		entry decompose.Entry
		want  error
	}{
		{"unknown layer", scfkEntry("nope", 64, 64, 3, 16), decompose.ErrLayerNotFound},
		{"not a Conv2d", scfkEntry("tail", 64, 64, 3, 16), decompose.ErrNotConv2d},
		{"attribute mismatch", scfkEntry("heads.b", 64, 64, 3, 16), decompose.ErrAttributeMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeInfo(t, &decompose.Info{Entries: []decompose.Entry{tt.entry}})
			_, _, err := decompose.Network(model, path)
			require.Error(t, err)
			for _, sentinel := range sentinels {
				assert.Equal(t, sentinel == tt.want, errors.Is(err, sentinel), "errors.Is(err, %v) for %v", sentinel, err)
			}
		})
	}
}
