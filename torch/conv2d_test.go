package torch_test

import (
	"encoding/hex"
	"encoding/json"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// conv2dCases are the Conv2d cases of scripts/torch_test_models.py that
// convsplit must read, each scripted and, where marked, traced.
var conv2dCases = []struct {
	name   string
	traced bool
}{
	{name: "zeros", traced: true},
	{name: "zeros_padded", traced: true},
	{name: "reflect", traced: true},
	{name: "replicate", traced: true},
	{name: "circular", traced: true},
	{name: "reflect_strided", traced: true},
	{name: "stride", traced: true},
	{name: "dilation", traced: true},
	{name: "groups", traced: true},
	{name: "depthwise", traced: true},
	{name: "no_bias", traced: true},
	{name: "same", traced: true},
	{name: "same_even", traced: true},
	{name: "valid", traced: true},
	{name: "same_reflect", traced: true},
	{name: "float64", traced: true},
	{name: "float16"},
	{name: "channels_last", traced: true},
	{name: "reflect_float64_channels_last", traced: true},
}

func TestConv2dGeometryMatchesPython(t *testing.T) {
	var files []string
	for _, c := range conv2dCases {
		files = append(files, "conv_"+c.name)
		if c.traced {
			files = append(files, "conv_"+c.name+"_traced")
		}
	}
	for _, file := range files {
		t.Run(file, func(t *testing.T) {
			want, ok := reference(t).Conv[file]
			require.True(t, ok, "reference.json has no case %s", file)
			require.False(t, want.Error)
			m := loadModel(t, file)
			got, err := m.Conv2d()
			require.NoError(t, err)

			assert.Equal(t, want.InChannels, got.InChannels, "in_channels")
			assert.Equal(t, want.OutChannels, got.OutChannels, "out_channels")
			assert.Equal(t, want.KernelSize, got.KernelSize, "kernel_size")
			assert.Equal(t, want.Stride, got.Stride, "stride")
			assert.Equal(t, want.Padding, got.Padding, "padding")
			assert.Equal(t, want.PaddingString, got.PaddingString, "padding string")
			assert.Equal(t, want.Dilation, got.Dilation, "dilation")
			assert.Equal(t, want.Groups, got.Groups, "groups")
			assert.Equal(t, want.PaddingMode, got.PaddingMode, "padding_mode")
			assert.Equal(t, want.Bias, got.Bias, "bias")
			assert.Equal(t, want.Scripted, got.Scripted, "scripted")
			assert.Equal(t, want.ChannelsLast, got.ChannelsLast, "channels_last")
			assert.Equal(t, want.Training, got.Training, "training")
			assert.Equal(t, want.WeightShape, got.WeightShape, "weight shape")
			dtype, err := torch.ParseDType(got.DType)
			require.NoError(t, err)
			assert.Equal(t, want.DType, dtype.String(), "dtype")

			modules, err := m.NamedModules()
			require.NoError(t, err)
			assert.True(t, modules[0].Conv2d)
		})
	}
}

func TestConv2dRejectsUnusualGraphs(t *testing.T) {
	tests := []struct {
		file string
		want string // a substring of the error
	}{
		{file: "conv_subclass", want: "not a Conv2d"},
		{file: "conv_subclass_traced", want: "not a Conv2d"},
		{file: "conv_same_reflect_even_traced", want: "symmetric"},
		{file: "conv_add_after_traced", want: "aten::add"},
		{file: "conv_scaled_weight_traced", want: "aten::mul"},
		{file: "conv_asymmetric_pad_traced", want: "symmetric"},
		{file: "conv_constant_pad_traced"},
		{file: "conv_two_convolutions_traced", want: "more than one convolution"},
		{file: "conv_pads_twice_traced", want: "twice"},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			want, ok := reference(t).Conv[tt.file]
			require.True(t, ok, "reference.json has no case %s", tt.file)
			require.True(t, want.Error)
			m := loadModel(t, tt.file)
			got, err := m.Conv2d()
			require.Error(t, err, "Conv2d() guessed %+v", got)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestConv2dOfOtherModules(t *testing.T) {
	m := loadModel(t, "mixed")
	for _, path := range []string{"", "blocks", "heads", "tail.0", "tail.0.0"} {
		t.Run(path, func(t *testing.T) {
			sub, err := m.Submodule(path)
			require.NoError(t, err)
			defer sub.Close()
			_, err = sub.Conv2d()
			require.Error(t, err)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), "not a Conv2d")
		})
	}
}

// TestConv2dTracedMatchesScripted reads every Conv2d of the zoo models from
// the traced graphs and from the scripted constants.
func TestConv2dTracedMatchesScripted(t *testing.T) {
	for _, name := range []string{"mixed", "resnet18"} {
		t.Run(name, func(t *testing.T) {
			scripted := loadModel(t, name)
			traced := loadModel(t, name+"_traced")
			modules, err := scripted.NamedModules()
			require.NoError(t, err)
			count := 0
			for _, info := range modules {
				if !info.Conv2d {
					continue
				}
				count++
				a, err := scripted.Submodule(info.Name)
				require.NoError(t, err)
				b, err := traced.Submodule(info.Name)
				require.NoError(t, err)
				want, err := a.Conv2d()
				require.NoError(t, err, info.Name)
				got, err := b.Conv2d()
				require.NoError(t, err, info.Name)
				assert.True(t, want.Scripted, info.Name)
				assert.False(t, got.Scripted, info.Name)
				got.Scripted = true
				assert.Equal(t, want, got, info.Name)
				a.Close()
				b.Close()
			}
			assert.Positive(t, count)
		})
	}
}

func TestConv2dBiasPair(t *testing.T) {
	m := loadModel(t, "bias_pair")
	for path, want := range map[string]bool{"a": true, "b": false} {
		sub, err := m.Submodule(path)
		require.NoError(t, err)
		g, err := sub.Conv2d()
		require.NoError(t, err)
		assert.Equal(t, want, g.Bias, "bias of %s", path)
		sub.Close()
	}
}

// baseSpec returns a small float32 Conv2d spec, which tests change.
func baseSpec() torch.Conv2dSpec {
	return torch.Conv2dSpec{
		InChannels: 4, OutChannels: 6, Groups: 1,
		KernelSize: [2]int{3, 3}, Stride: [2]int{1, 1}, Padding: [2]int{1, 1}, Dilation: [2]int{1, 1},
		Bias: true, DType: torch.Float32,
	}
}

// newBuilder returns a builder for the model, closed when the test ends.
func newBuilder(t testing.TB, owner *torch.Module) *torch.Builder {
	t.Helper()
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	t.Cleanup(b.Close)
	return b
}

func buildConv(t testing.TB, b *torch.Builder, spec torch.Conv2dSpec) *torch.Module {
	t.Helper()
	conv, err := b.Conv2d(spec)
	require.NoError(t, err)
	t.Cleanup(conv.Close)
	return conv
}

func parameterValues(t testing.TB, m *torch.Module, name string) []float32 {
	t.Helper()
	p, err := m.Parameter(name)
	require.NoError(t, err)
	defer p.Close()
	values, err := p.Float32s()
	require.NoError(t, err)
	return values
}

func TestBuilderConv2dDefaultInit(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	tests := []struct {
		name  string
		spec  func(s *torch.Conv2dSpec)
		fanIn int
	}{
		{name: "3x3", spec: func(s *torch.Conv2dSpec) {}, fanIn: 4 * 9},
		{name: "non-square kernel", spec: func(s *torch.Conv2dSpec) { s.KernelSize = [2]int{1, 5} }, fanIn: 4 * 5},
		{name: "groups", spec: func(s *torch.Conv2dSpec) { s.Groups = 2 }, fanIn: 2 * 9},
		{name: "wide", spec: func(s *torch.Conv2dSpec) { s.InChannels, s.OutChannels = 64, 16 }, fanIn: 64 * 9},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := baseSpec()
			tt.spec(&spec)
			conv := buildConv(t, b, spec)
			bound := float32(1 / math.Sqrt(float64(tt.fanIn)))
			for _, name := range []string{"weight", "bias"} {
				values := parameterValues(t, conv, name)
				low, high := values[0], values[0]
				for _, v := range values {
					require.Less(t, v, bound, "%s value", name)
					require.Greater(t, v, -bound, "%s value", name)
					low, high = min(low, v), max(high, v)
				}
				assert.Less(t, low, high, "%s values are not all equal", name)
				if len(values) >= 48 {
					// Uniform draws fill the range: with 48 or more of them the
					// extremes lie beyond half the bound unless the draw is broken.
					assert.Less(t, low, -bound/2, "%s minimum", name)
					assert.Greater(t, high, bound/2, "%s maximum", name)
				}
			}
		})
	}

	// Two layers of one configuration get different values.
	first := parameterValues(t, buildConv(t, b, baseSpec()), "weight")
	second := parameterValues(t, buildConv(t, b, baseSpec()), "weight")
	assert.NotEqual(t, first, second)
}

func TestBuilderConv2dStorage(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	tests := []struct {
		name         string
		dtype        torch.DType
		channelsLast bool
		bias         bool
		training     bool
		paddingMode  string
	}{
		{name: "float32", dtype: torch.Float32, bias: true},
		{name: "float64", dtype: torch.Float64, bias: true, training: true},
		{name: "float16", dtype: torch.Float16},
		{name: "bfloat16", dtype: torch.BFloat16, bias: true},
		{name: "channels last", dtype: torch.Float32, channelsLast: true, bias: true, paddingMode: "reflect"},
		{name: "float64 channels last", dtype: torch.Float64, channelsLast: true, paddingMode: "circular"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := baseSpec()
			spec.DType, spec.ChannelsLast, spec.Bias, spec.Training, spec.PaddingMode = tt.dtype, tt.channelsLast, tt.bias, tt.training, tt.paddingMode
			spec.KernelSize, spec.Stride, spec.Padding, spec.Dilation = [2]int{3, 5}, [2]int{2, 1}, [2]int{1, 2}, [2]int{1, 2}
			conv := buildConv(t, b, spec)

			weight, err := conv.Parameter("weight")
			require.NoError(t, err)
			defer weight.Close()
			assert.Equal(t, tt.dtype, weight.DType())
			assert.Equal(t, tt.channelsLast, weight.ChannelsLast())
			assert.True(t, weight.RequiresGrad())
			assert.Equal(t, []int64{6, 4, 3, 5}, weight.Shape())

			bias, err := conv.Parameter("bias")
			if tt.bias {
				require.NoError(t, err)
				assert.Equal(t, tt.dtype, bias.DType())
				assert.Equal(t, []int64{6}, bias.Shape())
				bias.Close()
			} else {
				assert.Error(t, err)
			}

			training, err := conv.IsTraining()
			require.NoError(t, err)
			assert.Equal(t, tt.training, training)

			g, err := conv.Conv2d()
			require.NoError(t, err)
			wantMode := tt.paddingMode
			if wantMode == "" {
				wantMode = "zeros"
			}
			assert.Equal(t, torch.Conv2d{
				InChannels: 4, OutChannels: 6, KernelSize: [2]int{3, 5}, Stride: [2]int{2, 1}, Padding: [2]int{1, 2},
				Dilation: [2]int{1, 2}, Groups: 1, PaddingMode: wantMode, Bias: tt.bias, Scripted: true,
				ChannelsLast: tt.channelsLast, Training: tt.training, DType: g.DType, WeightShape: []int64{6, 4, 3, 5},
			}, g)
			dtype, err := torch.ParseDType(g.DType)
			require.NoError(t, err)
			assert.Equal(t, tt.dtype, dtype)

			modules, err := conv.NamedModules()
			require.NoError(t, err)
			require.Len(t, modules, 1)
			assert.Equal(t, "Conv2d", modules[0].Class)
			assert.True(t, modules[0].Conv2d)
			methods, err := conv.MethodNames()
			require.NoError(t, err)
			assert.ElementsMatch(t, []string{"forward", "_conv_forward"}, methods)

			if tt.dtype == torch.Float64 {
				x, err := torch.FromFloat64(make([]float64, 4*9*11), 1, 4, 9, 11)
				require.NoError(t, err)
				defer x.Close()
				outputs, err := conv.Forward(x)
				require.NoError(t, err)
				assert.Equal(t, torch.Float64, outputs[0].DType())
				assert.Equal(t, []int64{1, 6, 5, 7}, outputs[0].Shape())
				outputs[0].Close()
			}
		})
	}
}

func TestBuilderConv2dPaddingString(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	tests := []struct {
		name          string
		paddingString string
		paddingMode   string
		kernel        [2]int
		stride        [2]int
		wantShape     []int64 // output shape for a 1x4x7x9 input
	}{
		{name: "same 3x3", paddingString: "same", kernel: [2]int{3, 3}, stride: [2]int{1, 1}, wantShape: []int64{1, 6, 7, 9}},
		{name: "same even kernel", paddingString: "same", kernel: [2]int{2, 4}, stride: [2]int{1, 1}, wantShape: []int64{1, 6, 7, 9}},
		{name: "same replicate", paddingString: "same", paddingMode: "replicate", kernel: [2]int{4, 1}, stride: [2]int{1, 1}, wantShape: []int64{1, 6, 7, 9}},
		{name: "valid strided", paddingString: "valid", kernel: [2]int{3, 5}, stride: [2]int{2, 1}, wantShape: []int64{1, 6, 3, 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := baseSpec()
			spec.PaddingString, spec.PaddingMode, spec.KernelSize, spec.Stride = tt.paddingString, tt.paddingMode, tt.kernel, tt.stride
			conv := buildConv(t, b, spec)
			g, err := conv.Conv2d()
			require.NoError(t, err)
			assert.Equal(t, tt.paddingString, g.PaddingString)
			assert.Equal(t, [2]int{0, 0}, g.Padding)
			outputs, err := conv.Forward(testTensor(t, 1, 4, 7, 9))
			require.NoError(t, err)
			assert.Equal(t, tt.wantShape, outputs[0].Shape())
			outputs[0].Close()
		})
	}
}

// seededCase builds Conv2d layers in order after one seed.
type seededCase struct {
	Name  string             `json:"name"`
	Seed  uint64             `json:"seed"`
	Specs []torch.Conv2dSpec `json:"specs"`
}

// seededPython draws the same layers with torch.nn.Conv2d after
// torch.manual_seed, casts the parameters as convsplit does, and returns
// their bytes in hex and, for float32 layers, the output on
// test_input((1, in_channels, 7, 9)).
const seededPython = `
import json, sys, torch
dtypes = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16}
def raw(t):
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes().hex()
results = []
for case in json.loads(sys.argv[1]):
    torch.manual_seed(case['seed'])
    layers = []
    for s in case['specs']:
        conv = torch.nn.Conv2d(s['InChannels'], s['OutChannels'], tuple(s['KernelSize']), stride=tuple(s['Stride']),
                               padding=s['PaddingString'] or tuple(s['Padding']), dilation=tuple(s['Dilation']),
                               groups=s['Groups'],
                               bias=s['Bias'], padding_mode=s['PaddingMode'] or 'zeros')
        dtype = dtypes[s['DType']]
        layer = {'weight': raw(conv.weight.to(dtype)), 'bias': raw(conv.bias.to(dtype)) if s['Bias'] else '', 'output': []}
        if dtype == torch.float32:
            shape = (1, s['InChannels'], 7, 9)
            count = shape[1] * 7 * 9
            x = (((torch.arange(count) * 7) % 19 - 9).to(torch.float32) / 9).reshape(shape)
            with torch.no_grad():
                layer['output'] = conv(x).flatten().tolist()
        layers.append(layer)
    results.append(layers)
print(json.dumps(results))
`

func TestBuilderConv2dSeededMatchesPython(t *testing.T) {
	spec := func(change func(s *torch.Conv2dSpec)) torch.Conv2dSpec {
		s := baseSpec()
		change(&s)
		return s
	}
	cases := []seededCase{
		{Name: "default", Seed: 0, Specs: []torch.Conv2dSpec{baseSpec()}},
		{Name: "no bias", Seed: 7, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) { s.Bias = false })}},
		{Name: "two layers in order", Seed: 42, Specs: []torch.Conv2dSpec{
			spec(func(s *torch.Conv2dSpec) { s.OutChannels, s.KernelSize, s.Padding = 3, [2]int{3, 1}, [2]int{1, 0} }),
			spec(func(s *torch.Conv2dSpec) { s.InChannels, s.KernelSize, s.Padding = 3, [2]int{1, 3}, [2]int{0, 1} }),
		}},
		{Name: "reflect", Seed: 1, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) { s.PaddingMode = "reflect" })}},
		{Name: "replicate", Seed: 2, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.PaddingMode, s.KernelSize, s.Padding = "replicate", [2]int{3, 5}, [2]int{1, 2}
		})}},
		{Name: "circular", Seed: 3, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.PaddingMode, s.KernelSize, s.Padding = "circular", [2]int{5, 3}, [2]int{2, 1}
		})}},
		{Name: "stride dilation groups", Seed: 4, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.Stride, s.Dilation, s.Groups, s.Padding = [2]int{2, 1}, [2]int{1, 2}, 2, [2]int{0, 2}
		})}},
		{Name: "same even kernel", Seed: 9, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.PaddingString, s.KernelSize, s.Dilation = "same", [2]int{2, 4}, [2]int{1, 2}
		})}},
		{Name: "same reflect", Seed: 10, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.PaddingString, s.PaddingMode, s.KernelSize = "same", "reflect", [2]int{4, 3}
		})}},
		{Name: "valid strided", Seed: 11, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.PaddingString, s.Stride, s.PaddingMode = "valid", [2]int{2, 2}, "circular"
		})}},
		{Name: "float64", Seed: 5, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) { s.DType = torch.Float64 })}},
		{Name: "float16", Seed: 6, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) { s.DType = torch.Float16 })}},
		{Name: "bfloat16 channels last", Seed: 8, Specs: []torch.Conv2dSpec{spec(func(s *torch.Conv2dSpec) {
			s.DType, s.ChannelsLast = torch.BFloat16, true
		})}},
	}
	arg, err := json.Marshal(cases)
	require.NoError(t, err)
	var python [][]struct {
		Weight string    `json:"weight"`
		Bias   string    `json:"bias"`
		Output []float32 `json:"output"`
	}
	require.NoError(t, json.Unmarshal([]byte(testutil.PythonCode(t, seededPython, string(arg))), &python))
	require.Len(t, python, len(cases))

	b := newBuilder(t, loadModel(t, "mixed"))
	for i, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			torch.ManualSeed(c.Seed)
			convs := make([]*torch.Module, len(c.Specs))
			for j, s := range c.Specs {
				convs[j] = buildConv(t, b, s)
			}
			for j, conv := range convs {
				want := python[i][j]
				weight, err := conv.Parameter("weight")
				require.NoError(t, err)
				raw, err := weight.Bytes()
				require.NoError(t, err)
				weight.Close()
				assert.Equal(t, want.Weight, hex.EncodeToString(raw), "layer %d weight bytes", j)
				if c.Specs[j].Bias {
					bias, err := conv.Parameter("bias")
					require.NoError(t, err)
					raw, err := bias.Bytes()
					require.NoError(t, err)
					bias.Close()
					assert.Equal(t, want.Bias, hex.EncodeToString(raw), "layer %d bias bytes", j)
				}
				if c.Specs[j].DType == torch.Float32 {
					outputs, err := conv.Forward(testTensor(t, 1, int64(c.Specs[j].InChannels), 7, 9))
					require.NoError(t, err)
					got, err := outputs[0].Float32s()
					require.NoError(t, err)
					outputs[0].Close()
					assertClose(t, want.Output, got, 1e-5, "forward output of layer")
				}
			}
		})
	}
}

func TestBuilderConv2dErrors(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	tests := []struct {
		name   string
		change func(s *torch.Conv2dSpec)
		want   string
	}{
		{name: "zero in channels", change: func(s *torch.Conv2dSpec) { s.InChannels = 0 }, want: "positive"},
		{name: "negative out channels", change: func(s *torch.Conv2dSpec) { s.OutChannels = -6 }, want: "positive"},
		{name: "zero groups", change: func(s *torch.Conv2dSpec) { s.Groups = 0 }, want: "positive"},
		{name: "groups do not divide", change: func(s *torch.Conv2dSpec) { s.Groups = 3 }, want: "divisible"},
		{name: "zero kernel", change: func(s *torch.Conv2dSpec) { s.KernelSize = [2]int{3, 0} }, want: "kernel"},
		{name: "zero stride", change: func(s *torch.Conv2dSpec) { s.Stride = [2]int{0, 1} }, want: "stride"},
		{name: "zero dilation", change: func(s *torch.Conv2dSpec) { s.Dilation = [2]int{1, 0} }, want: "dilation"},
		{name: "negative padding", change: func(s *torch.Conv2dSpec) { s.Padding = [2]int{-1, 1} }, want: "padding"},
		{name: "unknown padding mode", change: func(s *torch.Conv2dSpec) { s.PaddingMode = "constant" }, want: "constant"},
		{name: "unknown padding string", change: func(s *torch.Conv2dSpec) { s.PaddingString = "full" }, want: "full"},
		{name: "same with stride", change: func(s *torch.Conv2dSpec) { s.PaddingString, s.Stride = "same", [2]int{1, 2} }, want: "stride"},
		{name: "integer dtype", change: func(s *torch.Conv2dSpec) { s.DType = torch.Int64 }, want: "dtype"},
		{name: "invalid dtype", change: func(s *torch.Conv2dSpec) { s.DType = torch.DType(99) }, want: "dtype"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := baseSpec()
			tt.change(&spec)
			conv, err := b.Conv2d(spec)
			require.Error(t, err)
			assert.Nil(t, conv)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), tt.want)
		})
	}

	closed, err := torch.NewBuilder(loadModel(t, "mixed"))
	require.NoError(t, err)
	closed.Close()
	closed.Close()
	_, err = closed.Conv2d(baseSpec())
	assert.ErrorIs(t, err, torch.ErrClosed)
	_, err = closed.Sequential(nil, nil, false)
	assert.ErrorIs(t, err, torch.ErrClosed)
}

func TestBuilderSequential(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	first := baseSpec()
	second := baseSpec()
	second.InChannels, second.OutChannels, second.PaddingMode, second.Stride = 6, 5, "reflect", [2]int{2, 1}
	c1 := buildConv(t, b, first)
	c2 := buildConv(t, b, second)

	seq, err := b.Sequential([]*torch.Module{c1, c2}, []string{"forward1", "forward2"}, true)
	require.NoError(t, err)
	defer seq.Close()

	modules, err := seq.NamedModules()
	require.NoError(t, err)
	require.Len(t, modules, 3)
	assert.Equal(t, []string{"", "0", "1"}, []string{modules[0].Name, modules[1].Name, modules[2].Name})
	assert.Equal(t, []string{"Sequential", "Conv2d", "Conv2d"}, []string{modules[0].Class, modules[1].Class, modules[2].Class})
	methods, err := seq.MethodNames()
	require.NoError(t, err)
	assert.Subset(t, methods, []string{"forward", "forward1", "forward2"})
	training, err := seq.IsTraining()
	require.NoError(t, err)
	assert.True(t, training)

	child, err := seq.Submodule("1")
	require.NoError(t, err)
	defer child.Close()
	assert.True(t, child.SameObject(c2), "the Sequential holds the child objects")

	x := testTensor(t, 1, 4, 9, 11)
	composed, err := c1.Forward(x)
	require.NoError(t, err)
	defer composed[0].Close()
	want, err := c2.Forward(composed[0])
	require.NoError(t, err)
	defer want[0].Close()
	got, err := seq.Forward(x)
	require.NoError(t, err)
	defer got[0].Close()
	assert.Equal(t, []int64{1, 5, 5, 11}, got[0].Shape())
	wantValues, err := want[0].Float32s()
	require.NoError(t, err)
	gotValues, err := got[0].Float32s()
	require.NoError(t, err)
	assert.Equal(t, wantValues, gotValues)

	// A second Sequential of the same configuration reuses the type.
	again, err := b.Sequential([]*torch.Module{c1, c2}, []string{"forward1", "forward2"}, false)
	require.NoError(t, err)
	defer again.Close()
	againModules, err := again.NamedModules()
	require.NoError(t, err)
	assert.Equal(t, modules[0].Type, againModules[0].Type)
	training, err = again.IsTraining()
	require.NoError(t, err)
	assert.False(t, training)
}

func TestBuilderSequentialErrors(t *testing.T) {
	b := newBuilder(t, loadModel(t, "mixed"))
	conv := buildConv(t, b, baseSpec())
	tests := []struct {
		name     string
		children []*torch.Module
		aliases  []string
		want     string
	}{
		{name: "no children", want: "child"},
		{name: "alias forward", children: []*torch.Module{conv}, aliases: []string{"forward"}, want: "'forward'"},
		{name: "alias __len__", children: []*torch.Module{conv}, aliases: []string{"__len__"}, want: "'__len__'"},
		{name: "empty alias", children: []*torch.Module{conv}, aliases: []string{""}, want: "''"},
		{name: "alias starts with a digit", children: []*torch.Module{conv}, aliases: []string{"1forward"}, want: "'1forward'"},
		{name: "alias with a dash", children: []*torch.Module{conv}, aliases: []string{"forward-1"}, want: "'forward-1'"},
		{name: "alias with source code", children: []*torch.Module{conv}, aliases: []string{"f(self):\n    pass\ndef g"}, want: "alias"},
		{name: "duplicate alias", children: []*torch.Module{conv}, aliases: []string{"forward1", "forward1"}, want: "forward1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seq, err := b.Sequential(tt.children, tt.aliases, false)
			require.Error(t, err)
			assert.Nil(t, seq)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), tt.want)
		})
	}

	closedChild := buildConv(t, b, baseSpec())
	closedChild.Close()
	_, err := b.Sequential([]*torch.Module{conv, closedChild}, nil, false)
	assert.ErrorIs(t, err, torch.ErrClosed)
}

func TestDescribeLayer(t *testing.T) {
	tests := []struct {
		name, model, path string
		found, conv2d     bool
		class             string
		// geometryError is a part of the expected reason, "" for none.
		geometryError string
		method        string
	}{
		{"scripted Conv2d", "mixed", "down", true, true, "Conv2d", "", "_conv_forward"},
		{"container", "mixed", "blocks", true, false, "ModuleList", "", ""},
		{"missing", "mixed", "nope", false, false, "", "", ""},
		{"traced layer called twice", "twice_traced", "conv", true, true, "Conv2d", "", "forward1"},
		{"traced graph not recognized", "conv_add_after_traced", "", true, true, "Conv2d", "aten::add", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadModel(t, tt.model)
			layer, err := m.DescribeLayer(tt.path)
			require.NoError(t, err)
			defer layer.Weight.Close()
			defer layer.Bias.Close()
			assert.Equal(t, tt.found, layer.Found)
			assert.Equal(t, tt.conv2d, layer.Conv2d)
			assert.Equal(t, tt.class, layer.Class)
			if !tt.conv2d {
				assert.Nil(t, layer.Weight)
				return
			}
			require.NotNil(t, layer.Weight)
			if tt.method != "" {
				assert.Contains(t, layer.Methods, tt.method)
			}
			if tt.geometryError != "" {
				assert.Contains(t, layer.GeometryError, tt.geometryError)
				return
			}
			assert.Empty(t, layer.GeometryError)
			sub, err := m.Submodule(tt.path)
			require.NoError(t, err)
			defer sub.Close()
			want, err := sub.Conv2d()
			require.NoError(t, err)
			assert.Equal(t, want, layer.Geometry, "the geometry Conv2d reads")
			assert.Equal(t, layer.Weight.Shape(), layer.Geometry.WeightShape)
			assert.NotEmpty(t, layer.Type)
		})
	}
}
