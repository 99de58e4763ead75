package torch_test

import (
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/torch"
)

// aliasPattern matches the extra forward methods that torch.jit.trace gives
// a layer called more than once.
var aliasPattern = regexp.MustCompile(`^forward[0-9]+$`)

// forwardAliases returns the layer's forward1, forward2... methods, which a
// replacement must provide too.
func forwardAliases(t testing.TB, layer *torch.Module) []string {
	t.Helper()
	methods, err := layer.MethodNames()
	require.NoError(t, err)
	var aliases []string
	for _, name := range methods {
		if aliasPattern.MatchString(name) {
			aliases = append(aliases, name)
		}
	}
	return aliases
}

// specOf returns the spec of a new Conv2d with the layer's geometry.
func specOf(t testing.TB, g torch.Conv2d) torch.Conv2dSpec {
	t.Helper()
	dtype, err := torch.ParseDType(g.DType)
	require.NoError(t, err)
	return torch.Conv2dSpec{
		InChannels: g.InChannels, OutChannels: g.OutChannels, Groups: g.Groups,
		KernelSize: g.KernelSize, Stride: g.Stride, Padding: g.Padding, Dilation: g.Dilation,
		PaddingMode: g.PaddingMode, PaddingString: g.PaddingString, Bias: g.Bias, DType: dtype,
		ChannelsLast: g.ChannelsLast, Training: g.Training,
	}
}

// scaledCopy returns a new tensor holding the float32 tensor's values times
// scale, closed when the test ends.
func scaledCopy(t testing.TB, x *torch.Tensor, scale float32) *torch.Tensor {
	t.Helper()
	values, err := x.Float32s()
	require.NoError(t, err)
	for i := range values {
		values[i] *= scale
	}
	out, err := torch.FromFloat32(values, x.Shape()...)
	require.NoError(t, err)
	t.Cleanup(out.Close)
	return out
}

// identityConv returns a float32 1x1 Conv2d without bias whose output
// equals its input.
func identityConv(t testing.TB, b *torch.Builder, channels int, training bool) *torch.Module {
	t.Helper()
	identity, err := b.Conv2d(torch.Conv2dSpec{
		InChannels: channels, OutChannels: channels, Groups: 1,
		KernelSize: [2]int{1, 1}, Stride: [2]int{1, 1}, Dilation: [2]int{1, 1},
		DType: torch.Float32, Training: training,
	})
	require.NoError(t, err)
	eye := make([]float32, channels*channels)
	for i := 0; i < channels; i++ {
		eye[i*channels+i] = 1
	}
	eyeTensor, err := torch.FromFloat32(eye, int64(channels), int64(channels), 1, 1)
	require.NoError(t, err)
	defer eyeTensor.Close()
	require.NoError(t, identity.SetParameter("weight", eyeTensor))
	return identity
}

// equivalentSequential returns a Sequential, built for owner, that computes
// the same as the float32 Conv2d layer: a 1x1 identity Conv2d followed by a
// Conv2d of the layer's geometry that shares the layer's parameters.
func equivalentSequential(t testing.TB, owner, layer *torch.Module) *torch.Module {
	t.Helper()
	return scaledSequential(t, owner, layer, 1)
}

// scaledSequential is equivalentSequential with the second layer's weight
// and bias multiplied by scale (copies, when scale is not 1), so the
// Sequential computes scale times the layer's output.
func scaledSequential(t testing.TB, owner, layer *torch.Module, scale float32) *torch.Module {
	t.Helper()
	g, err := layer.Conv2d()
	require.NoError(t, err)
	require.Equal(t, "Float", g.DType, "equivalentSequential handles float32 layers")
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	defer b.Close()

	identity := identityConv(t, b, g.InChannels, g.Training)
	defer identity.Close()

	conv, err := b.Conv2d(specOf(t, g))
	require.NoError(t, err)
	defer conv.Close()
	names := []string{"weight"}
	if g.Bias {
		names = append(names, "bias")
	}
	for _, name := range names {
		p, err := layer.Parameter(name)
		require.NoError(t, err)
		if scale != 1 {
			p = scaledCopy(t, p, scale)
		} else {
			t.Cleanup(p.Close)
		}
		require.NoError(t, conv.SetParameter(name, p))
	}

	seq, err := b.Sequential([]*torch.Module{identity, conv}, forwardAliases(t, layer), g.Training)
	require.NoError(t, err)
	t.Cleanup(seq.Close)
	return seq
}

// decomposedSequential returns a Sequential, built for owner, of the two
// Conv2d layers that a rank-r decomposition of the layer gives (the geometry
// table of AMCT's decompose_network), with default-initialized parameters.
func decomposedSequential(t testing.TB, owner, layer *torch.Module, rank int) *torch.Module {
	t.Helper()
	g, err := layer.Conv2d()
	require.NoError(t, err)
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	defer b.Close()

	first, last := specOf(t, g), specOf(t, g)
	first.OutChannels, first.Bias = rank, false
	last.InChannels = rank
	// SCFK and FCSK keep the kernel height in the first layer.
	keepHeightFirst := (g.OutChannels >= g.InChannels) == (g.KernelSize[0] <= g.KernelSize[1])
	height, width := 0, 1
	if !keepHeightFirst {
		height, width = 1, 0
	}
	// The first layer spans the kept axis and resets the other, and the last
	// layer does the opposite.
	first.KernelSize[width], first.Stride[width], first.Padding[width], first.Dilation[width] = 1, 1, 0, 1
	last.KernelSize[height], last.Stride[height], last.Padding[height], last.Dilation[height] = 1, 1, 0, 1

	firstConv, err := b.Conv2d(first)
	require.NoError(t, err)
	defer firstConv.Close()
	lastConv, err := b.Conv2d(last)
	require.NoError(t, err)
	defer lastConv.Close()
	seq, err := b.Sequential([]*torch.Module{firstConv, lastConv}, forwardAliases(t, layer), g.Training)
	require.NoError(t, err)
	t.Cleanup(seq.Close)
	return seq
}

// layerBuilder makes the replacement of a layer for the model owner.
type layerBuilder func(t testing.TB, owner, layer *torch.Module) *torch.Module

// replaceWith replaces each path of the model by the Sequential that build
// returns for the layer at that path.
func replaceWith(t testing.TB, m *torch.Module, paths []string, build layerBuilder) error {
	t.Helper()
	replacements := make([]*torch.Module, len(paths))
	for i, path := range paths {
		layer, err := m.Submodule(path)
		require.NoError(t, err)
		replacements[i] = build(t, m, layer)
		layer.Close()
	}
	return m.Replace(paths, replacements)
}

// savedModel is a model changed and saved by a test, with what Python must
// see when it loads the file.
type savedModel struct {
	name    string
	path    string
	classes map[string]string
	names   []string
	shape   []int64
	output  []float32
}

func TestReplaceMixedWithDecomposition(t *testing.T) {
	paths := []string{"blocks.0", "tail.0.1", "down"}
	var saved []savedModel
	dir := t.TempDir() // outlives the subtests, for the Python check at the end
	for _, name := range []string{"mixed", "mixed_traced"} {
		t.Run(name, func(t *testing.T) {
			m := loadModel(t, name)
			before, err := m.Forward(testTensor(t, testInputShapes[name]...))
			require.NoError(t, err)
			wantShape := before[0].Shape()
			before[0].Close()

			require.NoError(t, replaceWith(t, m, paths, func(t testing.TB, owner, layer *torch.Module) *torch.Module {
				return decomposedSequential(t, owner, layer, 16)
			}))

			modules, err := m.NamedModules()
			require.NoError(t, err)
			classes := map[string]string{}
			for _, info := range modules {
				classes[info.Name] = info.Class
			}
			for _, path := range paths {
				assert.Equal(t, "Sequential", classes[path], "class of %s", path)
				assert.Equal(t, "Conv2d", classes[path+".0"], "class of %s.0", path)
				assert.Equal(t, "Conv2d", classes[path+".1"], "class of %s.1", path)
			}
			for _, path := range []string{"stem", "tall", "squeeze", "blocks.1", "heads.a", "heads.b"} {
				assert.Equal(t, "Conv2d", classes[path], "class of the untouched %s", path)
			}

			state, err := m.StateDict()
			require.NoError(t, err)
			shapes := map[string][]int64{}
			for _, entry := range state {
				shapes[entry.Name] = entry.Shape
			}
			assert.Equal(t, []int64{16, 128, 5, 1}, shapes["blocks.0.0.weight"])
			assert.Equal(t, []int64{64, 16, 1, 3}, shapes["blocks.0.1.weight"])
			assert.Equal(t, []int64{64}, shapes["blocks.0.1.bias"])
			assert.NotContains(t, shapes, "blocks.0.0.bias")
			assert.NotContains(t, shapes, "blocks.0.weight")
			assert.Equal(t, []int64{16, 128, 3, 1}, shapes["down.0.weight"])
			assert.Equal(t, []int64{256, 16, 1, 3}, shapes["down.1.weight"])
			assert.NotContains(t, shapes, "down.1.bias")
			assert.Equal(t, []int64{96, 16, 1, 3}, shapes["tail.0.1.1.weight"])

			down, err := m.Submodule("down.0")
			require.NoError(t, err)
			defer down.Close()
			g, err := down.Conv2d()
			require.NoError(t, err)
			assert.Equal(t, [2]int{2, 1}, g.Stride)
			assert.Equal(t, [2]int{1, 0}, g.Padding)

			// Train and Eval reach the new modules too.
			require.NoError(t, m.Train(true))
			assertTraining(t, m, true)
			require.NoError(t, m.Eval())
			assertTraining(t, m, false)

			after, err := m.Forward(testTensor(t, testInputShapes[name]...))
			require.NoError(t, err)
			require.Len(t, after, 1)
			assert.Equal(t, wantShape, after[0].Shape())
			goValues, err := after[0].Float32s()
			require.NoError(t, err)
			after[0].Close()

			path := filepath.Join(dir, name+".pt")
			require.NoError(t, m.Save(path))
			saved = append(saved, savedModel{name: name, path: path, classes: classes, names: moduleNames(t, m),
				shape: wantShape, output: goValues})
		})
	}
	require.Len(t, saved, 2)
	assertLoadsInPython(t, saved)
}

// assertLoadsInPython loads the saved models with Python's torch.jit.load
// in one process and compares module names, classes and forward outputs.
func assertLoadsInPython(t *testing.T, saved []savedModel) {
	t.Helper()
	requests := make([]pyRequest, len(saved))
	for i, s := range saved {
		requests[i] = pyRequest{Path: s.path, Shape: testInputShapes[s.name]}
	}
	results := loadInPython(t, requests...)
	for i, s := range saved {
		python := results[i]
		var pythonNames []string
		for _, module := range python.Modules {
			pythonNames = append(pythonNames, module.Name)
			assert.Equal(t, s.classes[module.Name], module.Class, "%s: Python's class of %q", s.name, module.Name)
		}
		assert.Equal(t, s.names, pythonNames, s.name)
		require.Len(t, python.Outputs, 1, s.name)
		assert.Equal(t, s.shape, python.Outputs[0].Shape, s.name)
		assertClose(t, s.output, python.Outputs[0].Values, 1e-5, s.name+": Python's output of the saved file")
	}
}

// assertTraining checks the training flag of every module of the tree.
func assertTraining(t testing.TB, m *torch.Module, want bool) {
	t.Helper()
	for _, name := range moduleNames(t, m) {
		sub, err := m.Submodule(name)
		require.NoError(t, err)
		got, err := sub.IsTraining()
		require.NoError(t, err)
		assert.Equal(t, want, got, "training flag of %q", name)
		sub.Close()
	}
}

// TestReplaceKeepsOutput replaces layers by equivalent Sequentials, so the
// output must stay the same. Marked models are saved and run in Python too.
func TestReplaceKeepsOutput(t *testing.T) {
	tests := []struct {
		model  string
		paths  []string
		python bool
	}{
		{model: "mixed", paths: []string{"stem", "blocks.0", "heads.b", "tail.0.1"}},
		{model: "mixed_traced", paths: []string{"squeeze", "blocks.1", "heads.a"}},
		{model: "resnet18", paths: []string{"conv1", "layer1.0.conv1", "layer3.0.downsample.0"}},
		{model: "resnet18", paths: []string{"layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv2"}, python: true},
		{model: "resnet18_traced", paths: []string{"layer2.1.conv2", "layer4.0.conv1"}, python: true},
		{model: "twice_traced", paths: []string{"conv"}, python: true},
		{model: "interface", paths: []string{"layer", "block.conv"}, python: true},
		{model: "shared_weight", paths: []string{"c1", "c2"}, python: true},
		{model: "branches", paths: []string{"a", "b", "seq.0"}, python: true},
		{model: "two_outputs", paths: []string{"conv"}},
	}
	var saved []savedModel
	dir := t.TempDir() // outlives the subtests, for the Python check at the end
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			m := loadModel(t, tt.model)
			before := forwardValues(t, m, tt.model)
			require.NoError(t, replaceWith(t, m, tt.paths, equivalentSequential))
			for _, path := range tt.paths {
				assert.Equal(t, "Sequential", moduleClass(t, m, path), "class of %s", path)
			}
			after := forwardValues(t, m, tt.model)
			require.Len(t, after, len(before))
			for i := range before {
				assertClose(t, before[i], after[i], 1e-4, "output "+strconv.Itoa(i))
			}

			if !tt.python {
				return
			}
			modules, err := m.NamedModules()
			require.NoError(t, err)
			classes := map[string]string{}
			for _, info := range modules {
				classes[info.Name] = info.Class
			}
			outputs, err := m.Forward(testTensor(t, testInputShapes[tt.model]...))
			require.NoError(t, err)
			require.Len(t, outputs, 1)
			defer outputs[0].Close()
			path := filepath.Join(dir, strconv.Itoa(len(saved))+".pt")
			require.NoError(t, m.Save(path))
			saved = append(saved, savedModel{name: tt.model, path: path, classes: classes, names: moduleNames(t, m),
				shape: outputs[0].Shape(), output: after[0]})
		})
	}
	require.Len(t, saved, 6)
	assertLoadsInPython(t, saved)
}

// TestReplaceNonConvModules replaces modules other than Conv2d layers in
// two ways that compute the same function: the ReLU tail.0.0 by an identity
// Conv2d, and the whole container tail by a Conv2d with tail.0.1's
// parameters. Both drop the ReLU before the last layer.
func TestReplaceNonConvModules(t *testing.T) {
	original := forwardValues(t, loadModel(t, "mixed"), "mixed")

	withoutReLU := loadModel(t, "mixed")
	b := newBuilder(t, withoutReLU)
	identity := identityConv(t, b, 64, false)
	defer identity.Close()
	seq, err := b.Sequential([]*torch.Module{identity}, nil, false)
	require.NoError(t, err)
	defer seq.Close()
	require.NoError(t, withoutReLU.Replace([]string{"tail.0.0"}, []*torch.Module{seq}))
	assert.Equal(t, "Sequential", moduleClass(t, withoutReLU, "tail.0.0"))

	withoutTail := loadModel(t, "mixed")
	last, err := withoutTail.Submodule("tail.0.1")
	require.NoError(t, err)
	defer last.Close()
	g, err := last.Conv2d()
	require.NoError(t, err)
	b = newBuilder(t, withoutTail)
	conv := buildConv(t, b, specOf(t, g))
	for _, name := range []string{"weight", "bias"} {
		p, err := last.Parameter(name)
		require.NoError(t, err)
		require.NoError(t, conv.SetParameter(name, p))
		p.Close()
	}
	tail, err := b.Sequential([]*torch.Module{conv}, nil, false)
	require.NoError(t, err)
	defer tail.Close()
	require.NoError(t, withoutTail.Replace([]string{"tail"}, []*torch.Module{tail}))
	assert.Equal(t, []string{"tail", "tail.0"}, moduleNames(t, withoutTail)[11:])

	first := forwardValues(t, withoutReLU, "mixed")
	second := forwardValues(t, withoutTail, "mixed")
	assertClose(t, first[0], second[0], 1e-5, "outputs of the two changed models")
	assert.NotEqual(t, original[0], first[0], "dropping the ReLU changes the output")
}

// TestReplaceTracedLayerCalledTwice replaces a traced layer whose parent
// calls it as forward and forward1.
func TestReplaceTracedLayerCalledTwice(t *testing.T) {
	m := loadModel(t, "twice_traced")
	before := forwardValues(t, m, "twice_traced")
	require.NoError(t, replaceWith(t, m, []string{"conv"}, equivalentSequential))

	conv, err := m.Submodule("conv")
	require.NoError(t, err)
	defer conv.Close()
	methods, err := conv.MethodNames()
	require.NoError(t, err)
	assert.Contains(t, methods, "forward1")
	assertClose(t, before[0], forwardValues(t, m, "twice_traced")[0], 1e-4, "output")
}

// TestReplaceThroughInterface replaces modules held by attributes of an
// interface type: one such attribute itself, and a layer inside another.
func TestReplaceThroughInterface(t *testing.T) {
	m := loadModel(t, "interface")
	before := forwardValues(t, m, "interface")
	require.NoError(t, replaceWith(t, m, []string{"layer", "block.conv"}, equivalentSequential))
	assertClose(t, before[0], forwardValues(t, m, "interface")[0], 1e-4, "output")
	assert.Equal(t, []string{"", "layer", "layer.0", "layer.1", "block", "block.conv", "block.conv.0", "block.conv.1"},
		moduleNames(t, m))
	assert.Equal(t, "Block", moduleClass(t, m, "block"))
}

// TestReplaceResnet18SharedTypes replaces one conv of a BasicBlock whose
// class type the other BasicBlocks of the stage share.
func TestReplaceResnet18SharedTypes(t *testing.T) {
	m := loadModel(t, "resnet18")
	before, err := m.NamedModules()
	require.NoError(t, err)
	types := map[string]string{}
	for _, info := range before {
		types[info.Name] = info.Type
	}
	require.Equal(t, types["layer1.0"], types["layer1.1"], "the fixture's BasicBlocks share a type")
	block, err := m.Submodule("layer1.1")
	require.NoError(t, err)
	defer block.Close()
	root, err := m.Submodule("")
	require.NoError(t, err)
	defer root.Close()
	want := forwardValues(t, m, "resnet18")

	require.NoError(t, replaceWith(t, m, []string{"layer1.0.conv1"}, equivalentSequential))

	after, err := m.NamedModules()
	require.NoError(t, err)
	classes := map[string]string{}
	newTypes := map[string]string{}
	for _, info := range after {
		classes[info.Name] = info.Class
		newTypes[info.Name] = info.Type
	}
	assert.Equal(t, "Sequential", classes["layer1.0.conv1"])
	assert.Equal(t, "Conv2d", classes["layer1.0.conv1.1"])
	assert.Equal(t, "Conv2d", classes["layer1.1.conv1"], "the sibling block keeps its Conv2d")
	assert.Equal(t, "BasicBlock", classes["layer1.0"])
	assert.NotEqual(t, newTypes["layer1.0"], newTypes["layer1.1"], "the changed block has a type of its own")
	assert.Equal(t, types["layer1.1"], newTypes["layer1.1"], "the sibling block keeps its type")
	assert.Equal(t, types["layer2.1"], newTypes["layer2.1"], "blocks of other stages keep their type")
	assert.Len(t, after, len(before)+2)

	sibling, err := m.Submodule("layer1.1")
	require.NoError(t, err)
	defer sibling.Close()
	assert.True(t, sibling.SameObject(block), "the sibling block is the same object")
	assert.True(t, m.SameObject(root), "the root object stays the same")

	got := forwardValues(t, m, "resnet18")
	assertClose(t, want[0], got[0], 1e-4, "output")

	path := filepath.Join(t.TempDir(), "resnet18.pt")
	require.NoError(t, m.Save(path))
	python := loadInPython(t, pyRequest{Path: path, Shape: testInputShapes["resnet18"]})[0]
	require.Len(t, python.Modules, len(after))
	for i, module := range python.Modules {
		assert.Equal(t, after[i].Name, module.Name)
		assert.Equal(t, after[i].Class, module.Class, "Python's class of %q", module.Name)
	}
	var keys []string
	for _, entry := range python.StateDict {
		keys = append(keys, entry.Name)
	}
	assert.Contains(t, keys, "layer1.0.conv1.0.weight")
	assert.Contains(t, keys, "layer1.0.conv1.1.weight")
	assert.NotContains(t, keys, "layer1.0.conv1.weight")
	assert.Contains(t, keys, "layer1.1.conv1.weight")
	require.Len(t, python.Outputs, 1)
	assertClose(t, got[0], python.Outputs[0].Values, 1e-4, "Python's output of the saved file")

	// The saved model loads in Go and accepts a second replacement.
	reloaded, err := torch.Load(path)
	require.NoError(t, err)
	defer reloaded.Close()
	require.NoError(t, replaceWith(t, reloaded, []string{"layer1.1.conv1"}, equivalentSequential))
	assert.Equal(t, "Sequential", moduleClass(t, reloaded, "layer1.0.conv1"))
	assert.Equal(t, "Sequential", moduleClass(t, reloaded, "layer1.1.conv1"))
	assertClose(t, want[0], forwardValues(t, reloaded, "resnet18")[0], 1e-4, "output of the reloaded model")
}

// TestReplaceAfterForward checks that a model whose methods already ran runs
// the new structure: tail.0.1 is the last layer, so doubling its weight and
// bias doubles the output.
func TestReplaceAfterForward(t *testing.T) {
	for _, name := range []string{"mixed", "mixed_traced"} {
		t.Run(name, func(t *testing.T) {
			m := loadModel(t, name)
			before := forwardValues(t, m, name)
			forwardValues(t, m, name) // run twice, so the execution plan is cached

			require.NoError(t, replaceWith(t, m, []string{"tail.0.1"}, func(t testing.TB, owner, layer *torch.Module) *torch.Module {
				return scaledSequential(t, owner, layer, 2)
			}))
			doubled := make([]float32, len(before[0]))
			for i, v := range before[0] {
				doubled[i] = 2 * v
			}
			assertClose(t, doubled, forwardValues(t, m, name)[0], 1e-4, "output after the first replacement")

			// Replace a layer inside the new Sequential, and another one.
			require.NoError(t, replaceWith(t, m, []string{"tail.0.1.1", "heads.a"}, equivalentSequential))
			assert.Equal(t, "Sequential", moduleClass(t, m, "tail.0.1.1"))
			assertClose(t, doubled, forwardValues(t, m, name)[0], 1e-4, "output after the second replacement")
		})
	}
}

func TestReplaceRejected(t *testing.T) {
	otherModel := loadModel(t, "mixed")

	tests := []struct {
		name  string
		model string
		paths []string
		// build makes the replacement of each path; nil uses sequentialOf.
		build func(t *testing.T, owner *torch.Module, path string) *torch.Module
		want  []string // substrings of the error
	}{
		{name: "parent reads the weight", model: "reads_weight", paths: []string{"conv"},
			want: []string{"'conv'", "'forward'", "weight"}},
		{name: "parent reads the weight with another layer", model: "reads_weight", paths: []string{"other", "conv"},
			want: []string{"'conv'"}},
		{name: "exported method reads the weight", model: "export_reads_weight", paths: []string{"conv"},
			want: []string{"'conv'", "'weight_mean'", "weight"}},
		{name: "duplicate path", model: "mixed", paths: []string{"down", "down"}, want: []string{"'down'", "twice"}},
		{name: "path inside a replaced path", model: "mixed", paths: []string{"tail.0", "tail.0.1"},
			build: func(t *testing.T, owner *torch.Module, path string) *torch.Module {
				return sequentialOf(t, owner, "tail.0.1")
			},
			want: []string{"'tail.0.1'", "'tail.0'"}},
		{name: "module list read by its parent", model: "mixed", paths: []string{"blocks"},
			want: []string{"'blocks'", "'forward'", "reads its attribute '0'"}},
		{name: "module dict read by its parent", model: "mixed", paths: []string{"heads"},
			want: []string{"'heads'", "'forward'"}},
		{name: "unknown path", model: "mixed", paths: []string{"nope"}, want: []string{"nope"}},
		{name: "unknown index", model: "mixed", paths: []string{"blocks.7"}, want: []string{"blocks.7"}},
		{name: "unknown path after a valid one", model: "mixed", paths: []string{"down", "heads.z"}, want: []string{"heads.z"}},
		{name: "parameter path", model: "mixed", paths: []string{"down.weight"}, want: []string{"down.weight"}},
		{name: "empty path", model: "mixed", paths: []string{""}, want: []string{"root"}},
		{name: "builder of another model", model: "mixed", paths: []string{"down"},
			build: func(t *testing.T, _ *torch.Module, path string) *torch.Module {
				return sequentialOf(t, otherModel, path)
			},
			want: []string{"'down'", "another model"}},
		{name: "replacement from the model", model: "mixed", paths: []string{"down"},
			build: func(t *testing.T, owner *torch.Module, _ string) *torch.Module {
				tail, err := owner.Submodule("tail")
				require.NoError(t, err)
				t.Cleanup(tail.Close)
				return tail
			},
			want: []string{"'down'", "a module of the model"}},
		{name: "replacement holding a module of the model", model: "mixed", paths: []string{"stem"},
			build: func(t *testing.T, owner *torch.Module, _ string) *torch.Module {
				down, err := owner.Submodule("down")
				require.NoError(t, err)
				defer down.Close()
				b, err := torch.NewBuilder(owner)
				require.NoError(t, err)
				defer b.Close()
				seq, err := b.Sequential([]*torch.Module{down}, nil, false)
				require.NoError(t, err)
				t.Cleanup(seq.Close)
				return seq
			},
			want: []string{"'stem'", "as '0'", "a module of the model"}},
		{name: "layer reachable by two paths", model: "aliased", paths: []string{"a"},
			want: []string{"'b'", "'a'", "same object"}},
		{name: "second path of a shared layer", model: "aliased", paths: []string{"b"},
			want: []string{"'b'", "'a'", "same object"}},
		{name: "missing forward1 alias", model: "twice_traced", paths: []string{"conv"},
			build: func(t *testing.T, owner *torch.Module, path string) *torch.Module {
				return sequentialOf(t, owner, path)
			},
			want: []string{"'conv'", "forward1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadModel(t, tt.model)
			before := takeSnapshot(t, m, tt.model)

			replacements := make([]*torch.Module, len(tt.paths))
			for i, path := range tt.paths {
				if tt.build != nil {
					replacements[i] = tt.build(t, m, path)
				} else {
					replacements[i] = sequentialOf(t, m, path)
				}
			}
			err := m.Replace(tt.paths, replacements)
			require.Error(t, err)
			assert.ErrorIs(t, err, torch.ErrTorch)
			for _, want := range tt.want {
				assert.Contains(t, err.Error(), want)
			}
			assert.NotContains(t, err.Error(), "\n")
			assertSnapshot(t, before, m, tt.model)

			// The model still accepts a valid replacement afterwards.
			if tt.model == "mixed" {
				require.NoError(t, replaceWith(t, m, []string{"down"}, equivalentSequential))
				assertClose(t, before.output[0], forwardValues(t, m, tt.model)[0], 1e-4, "output after a valid replacement")
			}
		})
	}

	t.Run("count mismatch", func(t *testing.T) {
		m := loadModel(t, "mixed")
		err := m.Replace([]string{"down", "tall"}, []*torch.Module{sequentialOf(t, m, "down")})
		require.Error(t, err)
		assert.Equal(t, "Conv2d", moduleClass(t, m, "down"))
	})

	t.Run("closed replacement", func(t *testing.T) {
		m := loadModel(t, "mixed")
		replacement := sequentialOf(t, m, "down")
		replacement.Close()
		err := m.Replace([]string{"down"}, []*torch.Module{replacement})
		require.ErrorIs(t, err, torch.ErrClosed)
		assert.Equal(t, "Conv2d", moduleClass(t, m, "down"))
	})
}

// sequentialOf returns a Sequential, built for owner, of two Conv2d layers
// with the geometry of owner's layer at path, or a 4-to-4 3x3 geometry when
// path is not a Conv2d of owner.
func sequentialOf(t testing.TB, owner *torch.Module, path string) *torch.Module {
	t.Helper()
	spec := torch.Conv2dSpec{InChannels: 4, OutChannels: 4, Groups: 1, KernelSize: [2]int{3, 3},
		Stride: [2]int{1, 1}, Padding: [2]int{1, 1}, Dilation: [2]int{1, 1}, DType: torch.Float32}
	if layer, err := owner.Submodule(path); err == nil {
		if g, err := layer.Conv2d(); err == nil {
			spec = specOf(t, g)
		}
		layer.Close()
	}
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	defer b.Close()
	first, err := b.Conv2d(spec)
	require.NoError(t, err)
	defer first.Close()
	spec.InChannels = spec.OutChannels
	spec.Stride = [2]int{1, 1}
	second, err := b.Conv2d(spec)
	require.NoError(t, err)
	defer second.Close()
	seq, err := b.Sequential([]*torch.Module{first, second}, nil, false)
	require.NoError(t, err)
	t.Cleanup(seq.Close)
	return seq
}

// residentMemory returns the process's resident set size (VmRSS) in bytes.
func residentMemory(t testing.TB) int64 {
	t.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	status, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kilobytes, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			require.NoError(t, err)
			return kilobytes * 1024
		}
	}
	t.Fatal("VmRSS not found in /proc/self/status")
	return 0
}

// assertMemoryBounded runs cycle n times after a warm-up and checks that the
// resident set grows by less than maxGrowth bytes. It checks every 50
// cycles and stops at the first excess, so a leak cannot exhaust memory.
func assertMemoryBounded(t *testing.T, n int, maxGrowth int64, what string, cycle func()) {
	t.Helper()
	for i := 0; i < 20; i++ {
		cycle()
	}
	start := residentMemory(t)
	for i := 1; i <= n; i++ {
		cycle()
		if i%50 != 0 && i != n {
			continue
		}
		growth := residentMemory(t) - start
		if growth >= maxGrowth {
			t.Fatalf("resident set grew by %.1f MB after %d %s, more than the %.0f MB allowed",
				float64(growth)/(1<<20), i, what, float64(maxGrowth)/(1<<20))
		}
		if i == n {
			t.Logf("resident set grew by %.1f MB over %d %s", float64(growth)/(1<<20), n, what)
		}
	}
}

// TestMemoryBounded checks that handles are released: 300 cycles of Clone,
// Replace and Close, and 2000 Forward calls, must not grow the resident set
// by more than a generous bound. It measures memory, not time.
func TestMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short mode")
	}
	const maxGrowth = 200 << 20

	t.Run("clone replace close", func(t *testing.T) {
		m := loadModel(t, "mixed")
		assertMemoryBounded(t, 300, maxGrowth, "cycles of Clone, Replace and Close", func() {
			clone, err := m.Clone()
			require.NoError(t, err)
			require.NoError(t, splitLayer(clone, "tail.0.1"))
			clone.Close()
		})
	})

	t.Run("load replace close", func(t *testing.T) {
		path := modelPath(t, "mixed")
		assertMemoryBounded(t, 100, maxGrowth, "cycles of Load, Replace and Close", func() {
			m, err := torch.Load(path)
			require.NoError(t, err)
			require.NoError(t, splitLayer(m, "tail.0.1"))
			m.Close()
		})
	})

	t.Run("forward", func(t *testing.T) {
		m := loadModel(t, "two_outputs")
		x := testTensor(t, testInputShapes["two_outputs"]...)
		assertMemoryBounded(t, 2000, maxGrowth, "forward calls", func() {
			outputs, err := m.Forward(x)
			require.NoError(t, err)
			for _, out := range outputs {
				out.Close()
			}
		})
	})
}

// decomposedLayer is decomposedSequential of rank 8, as a layerBuilder.
func decomposedLayer(t testing.TB, owner, layer *torch.Module) *torch.Module {
	t.Helper()
	return decomposedSequential(t, owner, layer, 8)
}

// TestReplaceThroughSubmoduleHandle calls Replace on a handle from
// Submodule. The change must reach the whole model and nothing else: when
// the handle's class type is shared with a sibling (the BasicBlocks of a
// scripted resnet18 stage), the sibling must keep its Conv2d and the model
// must still run, unless Replace rejects the call and changes nothing.
func TestReplaceThroughSubmoduleHandle(t *testing.T) {
	tests := []struct {
		model  string
		handle string
		path   string
		other  string // a layer that must stay a Conv2d
	}{
		{model: "mixed", handle: "tail", path: "0.1", other: "heads.a"},
		{model: "resnet18", handle: "layer1.0", path: "conv1", other: "layer1.1.conv1"},
	}
	for _, tt := range tests {
		t.Run(tt.model+"/"+tt.handle, func(t *testing.T) {
			m := loadModel(t, tt.model)
			before := takeSnapshot(t, m, tt.model)
			sub, err := m.Submodule(tt.handle)
			require.NoError(t, err)
			defer sub.Close()

			err = replaceWith(t, sub, []string{tt.path}, equivalentSequential)
			if err != nil {
				t.Logf("Replace rejected the call: %v", err)
				assertSnapshot(t, before, m, tt.model)
				return
			}
			assert.Equal(t, "Sequential", moduleClass(t, m, tt.handle+"."+tt.path))
			assert.Equal(t, "Conv2d", moduleClass(t, m, tt.other))
			outputs, err := m.Forward(testTensor(t, testInputShapes[tt.model]...))
			require.NoError(t, err, "forward of the whole model after Replace through a submodule handle")
			got, err := outputs[0].Float32s()
			require.NoError(t, err)
			outputs[0].Close()
			assertClose(t, before.output[0], got, 1e-4, "output")
		})
	}
}
