package torch_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/torch"
)

func TestTensorFloat32RoundTrip(t *testing.T) {
	tests := []struct {
		name  string
		shape []int64
	}{
		{name: "scalar", shape: nil},
		{name: "vector", shape: []int64{5}},
		{name: "matrix", shape: []int64{2, 3}},
		{name: "image batch", shape: []int64{2, 3, 4, 5}},
		{name: "empty", shape: []int64{0}},
		{name: "empty rows", shape: []int64{0, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			values := testValues(tt.shape...)
			values = append(values[:0:0], values...)
			if len(values) > 1 {
				values[1] = float32(math.Inf(-1))
				values[len(values)-1] = math.SmallestNonzeroFloat32
			}
			x, err := torch.FromFloat32(values, tt.shape...)
			require.NoError(t, err)
			defer x.Close()

			wantShape := tt.shape
			if wantShape == nil {
				wantShape = []int64{}
			}
			assert.Equal(t, wantShape, x.Shape())
			assert.Equal(t, int64(len(values)), x.Numel())
			assert.Equal(t, torch.Float32, x.DType())
			assert.False(t, x.RequiresGrad())
			assert.False(t, x.ChannelsLast())

			got, err := x.Float32s()
			require.NoError(t, err)
			assert.Equal(t, len(values), len(got))
			for i := range values {
				assert.Equal(t, math.Float32bits(values[i]), math.Float32bits(got[i]), "element %d", i)
			}

			raw, err := x.Bytes()
			require.NoError(t, err)
			want := make([]byte, 4*len(values))
			for i, v := range values {
				binary.LittleEndian.PutUint32(want[4*i:], math.Float32bits(v))
			}
			assert.Equal(t, want, raw)

			_, err = x.Float64s()
			assert.Error(t, err, "Float64s of a float32 tensor")
		})
	}
}

func TestTensorCopiesInput(t *testing.T) {
	values := []float32{1, 2, 3, 4}
	x, err := torch.FromFloat32(values, 2, 2)
	require.NoError(t, err)
	defer x.Close()
	values[0] = 100
	got, err := x.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4}, got, "the tensor owns a copy of the data")
	got[1] = 200
	again, err := x.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4}, again, "Float32s returns a copy")
}

func TestTensorFloat64RoundTrip(t *testing.T) {
	values := []float64{0, -1.5, math.Pi, math.MaxFloat64, math.SmallestNonzeroFloat64, math.Inf(1)}
	x, err := torch.FromFloat64(values, 3, 2)
	require.NoError(t, err)
	defer x.Close()
	assert.Equal(t, torch.Float64, x.DType())
	assert.Equal(t, []int64{3, 2}, x.Shape())
	got, err := x.Float64s()
	require.NoError(t, err)
	assert.Equal(t, values, got)
	raw, err := x.Bytes()
	require.NoError(t, err)
	require.Len(t, raw, 8*len(values))
	for i, v := range values {
		assert.Equal(t, math.Float64bits(v), binary.LittleEndian.Uint64(raw[8*i:]), "element %d", i)
	}
	_, err = x.Float32s()
	assert.Error(t, err, "Float32s of a float64 tensor")
}

func TestTensorShapeErrors(t *testing.T) {
	tests := []struct {
		name   string
		values int
		shape  []int64
		want   string
	}{
		{name: "too few values", values: 5, shape: []int64{2, 3}, want: "needs 6 values, got 5"},
		{name: "too many values", values: 7, shape: []int64{2, 3}, want: "needs 6 values, got 7"},
		{name: "scalar with two values", values: 2, shape: nil, want: "needs 1 values, got 2"},
		{name: "negative size", values: 6, shape: []int64{-2, -3}, want: "negative"},
		{name: "values for an empty shape", values: 1, shape: []int64{0, 4}, want: "needs 0 values, got 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			x, err := torch.FromFloat32(make([]float32, tt.values), tt.shape...)
			require.Error(t, err)
			assert.Nil(t, x)
			assert.Contains(t, err.Error(), tt.want)

			y, err := torch.FromFloat64(make([]float64, tt.values), tt.shape...)
			require.Error(t, err)
			assert.Nil(t, y)
		})
	}
}

func TestDTypeNames(t *testing.T) {
	tests := []struct {
		dtype    torch.DType
		name     string
		libtorch string // c10::toString's name, as StateDict and Conv2d report it
	}{
		{dtype: torch.Float32, name: "float32", libtorch: "Float"},
		{dtype: torch.Float64, name: "float64", libtorch: "Double"},
		{dtype: torch.Float16, name: "float16", libtorch: "Half"},
		{dtype: torch.BFloat16, name: "bfloat16", libtorch: "BFloat16"},
		{dtype: torch.Int64, name: "int64", libtorch: "Long"},
		{dtype: torch.Int32, name: "int32", libtorch: "Int"},
		{dtype: torch.Uint8, name: "uint8", libtorch: "Byte"},
		{dtype: torch.Bool, name: "bool", libtorch: "Bool"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.name, tt.dtype.String())
			fromName, err := torch.ParseDType(tt.name)
			require.NoError(t, err)
			assert.Equal(t, tt.dtype, fromName)
			fromLibtorch, err := torch.ParseDType(tt.libtorch)
			require.NoError(t, err)
			assert.Equal(t, tt.dtype, fromLibtorch)
		})
	}
	_, err := torch.ParseDType("float128")
	assert.ErrorContains(t, err, "float128")
	assert.Equal(t, "dtype(99)", torch.DType(99).String())
}

func TestForwardMatchesPython(t *testing.T) {
	for _, name := range []string{"mixed", "mixed_traced", "two_outputs", "returns_list"} {
		t.Run(name, func(t *testing.T) {
			want := reference(t).Forward[name]
			require.NotEmpty(t, want.Outputs)
			require.Equal(t, testInputShapes[name], want.InputShape)

			m := loadModel(t, name)
			outputs, err := m.Forward(testTensor(t, want.InputShape...))
			require.NoError(t, err)
			require.Len(t, outputs, len(want.Outputs))
			for i, out := range outputs {
				assert.Equal(t, want.Outputs[i].Shape, out.Shape(), "shape of output %d", i)
				got, err := out.Float32s()
				require.NoError(t, err)
				assertClose(t, want.Outputs[i].Values, got, 1e-5, "output")
				out.Close()
			}
		})
	}
}

func TestForwardTupleOutputs(t *testing.T) {
	m := loadModel(t, "two_outputs")
	outputs, err := m.Forward(testTensor(t, 1, 3, 8, 8))
	require.NoError(t, err)
	require.Len(t, outputs, 2)
	defer outputs[0].Close()
	defer outputs[1].Close()
	y, err := outputs[0].Float32s()
	require.NoError(t, err)
	relu, err := outputs[1].Float32s()
	require.NoError(t, err)
	require.Len(t, relu, len(y))
	negative := 0
	for i := range y {
		assert.Equal(t, max(y[i], 0), relu[i], "element %d", i)
		if y[i] < 0 {
			negative++
		}
	}
	assert.Positive(t, negative, "the test input gives some negative outputs")
}

func TestForwardErrors(t *testing.T) {
	for _, name := range []string{"mixed", "mixed_traced"} {
		t.Run(name, func(t *testing.T) {
			testForwardErrors(t, loadModel(t, name))
		})
	}

	outputs, err := loadModel(t, "returns_dict").Forward(testTensor(t, 1, 3, 8, 8))
	require.Error(t, err)
	assert.Nil(t, outputs)
	assert.Contains(t, err.Error(), "Dict")
}

func testForwardErrors(t *testing.T, m *torch.Module) {
	tests := []struct {
		name   string
		inputs func(t *testing.T) []*torch.Tensor
		want   string
	}{
		{name: "wrong channels", inputs: func(t *testing.T) []*torch.Tensor {
			return []*torch.Tensor{testTensor(t, 1, 4, 32, 32)}
		}, want: "channels"},
		{name: "input too small for padding", inputs: func(t *testing.T) []*torch.Tensor {
			return []*torch.Tensor{testTensor(t, 1, 3, 2, 2)}
		}},
		{name: "wrong rank", inputs: func(t *testing.T) []*torch.Tensor {
			return []*torch.Tensor{testTensor(t, 3)}
		}},
		{name: "float64 input", inputs: func(t *testing.T) []*torch.Tensor {
			x, err := torch.FromFloat64(make([]float64, 3*32*32), 1, 3, 32, 32)
			require.NoError(t, err)
			t.Cleanup(x.Close)
			return []*torch.Tensor{x}
		}, want: "type"},
		{name: "no input", inputs: func(t *testing.T) []*torch.Tensor { return nil }, want: "forward"},
		{name: "two inputs", inputs: func(t *testing.T) []*torch.Tensor {
			return []*torch.Tensor{testTensor(t, 1, 3, 32, 32), testTensor(t, 1, 3, 32, 32)}
		}, want: "forward"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			outputs, err := m.Forward(tt.inputs(t)...)
			require.Error(t, err)
			assert.Nil(t, outputs)
			assert.ErrorIs(t, err, torch.ErrTorch)
			message := err.Error()
			assert.Contains(t, message, tt.want)
			assert.NotContains(t, message, "\n", "the message is one line")
			assert.NotContains(t, message, "Exception raised from")
			assert.NotContains(t, message, "Traceback")
			assert.NotContains(t, message, "interpreter")
			assert.NotContains(t, message, ".cpp")
			assert.Greater(t, len(strings.TrimPrefix(message, "forward: ")), 10, "the message says what failed: %q", message)
		})
	}

	closed := testTensor(t, 1, 3, 32, 32)
	closed.Close()
	_, err := m.Forward(closed)
	assert.ErrorIs(t, err, torch.ErrClosed)

	// The model still runs after the errors.
	outputs, err := m.Forward(testTensor(t, 1, 3, 32, 32))
	require.NoError(t, err)
	outputs[0].Close()
}

func TestTensorParameterFlags(t *testing.T) {
	tests := []struct {
		model        string
		dtype        torch.DType
		channelsLast bool
	}{
		{model: "conv_channels_last", dtype: torch.Float32, channelsLast: true},
		{model: "conv_zeros", dtype: torch.Float32},
		{model: "conv_float16", dtype: torch.Float16},
		{model: "conv_reflect_float64_channels_last_traced", dtype: torch.Float64, channelsLast: true},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			weight, err := loadModel(t, tt.model).Parameter("weight")
			require.NoError(t, err)
			defer weight.Close()
			assert.Equal(t, tt.dtype, weight.DType())
			assert.Equal(t, tt.channelsLast, weight.ChannelsLast())
			assert.True(t, weight.RequiresGrad())
			raw, err := weight.Bytes()
			require.NoError(t, err)
			assert.Len(t, raw, int(weight.Numel())*map[torch.DType]int{torch.Float16: 2, torch.Float32: 4, torch.Float64: 8}[tt.dtype])
		})
	}
}

// closedTensorEnv names the call that TestClosedTensor's child process makes
// on a closed tensor.
const closedTensorEnv = "CONVSPLIT_TEST_CLOSED_TENSOR_CALL"

// closedTensorCalls are Tensor methods, and a Module method taking a tensor,
// that a closed tensor must not crash. Each returns an error for the child
// process to report. Bytes is left out because it checks for a closed tensor
// itself.
var closedTensorCalls = map[string]func(x *torch.Tensor, m *torch.Module) error{
	"Shape":        func(x *torch.Tensor, _ *torch.Module) error { x.Shape(); return nil },
	"DType":        func(x *torch.Tensor, _ *torch.Module) error { x.DType(); return nil },
	"ChannelsLast": func(x *torch.Tensor, _ *torch.Module) error { x.ChannelsLast(); return nil },
	"Same":         func(x *torch.Tensor, _ *torch.Module) error { x.Same(x); return nil },
	"Float32s":     func(x *torch.Tensor, _ *torch.Module) error { _, err := x.Float32s(); return expectClosed(err) },
	"SetParameter": func(x *torch.Tensor, m *torch.Module) error { return expectClosed(m.SetParameter("weight", x)) },
}

func expectClosed(err error) error {
	if !errors.Is(err, torch.ErrClosed) {
		return fmt.Errorf("error %v does not wrap torch.ErrClosed", err)
	}
	return nil
}

// TestClosedTensor calls each method on a closed tensor in a child process,
// because a nil handle reaching the shim ends the process with SIGSEGV.
func TestClosedTensor(t *testing.T) {
	if call := os.Getenv(closedTensorEnv); call != "" {
		x := testTensor(t, 2, 2)
		x.Close()
		m := loadModel(t, "conv_zeros")
		require.NoError(t, closedTensorCalls[call](x, m))
		return
	}

	modelPath(t, "conv_zeros") // make the model before the child processes need it
	for call := range closedTensorCalls {
		t.Run(call, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestClosedTensor$", "-test.count=1")
			cmd.Env = append(os.Environ(), closedTensorEnv+"="+call)
			out, err := cmd.CombinedOutput()
			assert.NoError(t, err, "%s on a closed tensor failed or ended the process:\n%s", call, firstLines(string(out), 8))
		})
	}
}

// firstLines returns at most n lines of text.
func firstLines(text string, n int) string {
	lines := strings.SplitN(text, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}
