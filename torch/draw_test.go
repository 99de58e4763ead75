package torch_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/torch"
)

// drawSpec is a small Conv2d layer with a bias.
var drawSpec = torch.Conv2dSpec{InChannels: 4, OutChannels: 6, Groups: 2, KernelSize: [2]int{3, 1},
	Stride: [2]int{1, 1}, Padding: [2]int{1, 0}, Dilation: [2]int{1, 1}, Bias: true, DType: torch.Float32}

// parameterBytes returns the raw bytes of a module's parameter.
func parameterBytes(t *testing.T, m *torch.Module, name string) []byte {
	t.Helper()
	p, err := m.Parameter(name)
	require.NoError(t, err)
	defer p.Close()
	data, err := p.Bytes()
	require.NoError(t, err)
	return data
}

// TestDrawMatchesConv2d checks that allocating, drawing and then building
// gives the parameters Builder.Conv2d draws after the same seed, for every
// dtype and layout the drawing treats differently.
func TestDrawMatchesConv2d(t *testing.T) {
	owner := loadModel(t, "mixed")
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	defer b.Close()

	tests := []struct {
		name         string
		dtype        torch.DType
		channelsLast bool
		bias         bool
	}{
		{"float32", torch.Float32, false, true},
		{"float32 without bias", torch.Float32, false, false},
		{"float64", torch.Float64, false, true},
		{"float16", torch.Float16, false, true},
		{"float32 channels-last", torch.Float32, true, true},
		{"float64 channels-last", torch.Float64, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := drawSpec
			spec.DType, spec.ChannelsLast, spec.Bias = tt.dtype, tt.channelsLast, tt.bias

			torch.ManualSeed(31)
			want, err := b.Conv2d(spec)
			require.NoError(t, err)
			defer want.Close()

			torch.ManualSeed(31)
			weight, bias, err := torch.NewConv2dParameters(spec)
			require.NoError(t, err)
			defer weight.Close()
			defer bias.Close()
			assert.Equal(t, tt.bias, bias != nil, "a bias exactly when the spec has one")
			require.NoError(t, torch.DrawConv2dParameters(weight, bias))
			got, err := b.Conv2dWith(spec, weight, bias)
			require.NoError(t, err)
			defer got.Close()

			assert.Equal(t, parameterBytes(t, want, "weight"), parameterBytes(t, got, "weight"))
			if tt.bias {
				assert.Equal(t, parameterBytes(t, want, "bias"), parameterBytes(t, got, "bias"))
			}
			assert.Equal(t, tt.dtype, weight.DType())
			assert.Equal(t, tt.channelsLast, weight.ChannelsLast())
			assert.True(t, weight.RequiresGrad(), "the weight is a parameter")

			inModule, err := got.Parameter("weight")
			require.NoError(t, err)
			defer inModule.Close()
			assert.True(t, inModule.Same(weight), "the module holds the given tensor, not a copy")
		})
	}
}

func TestConv2dWithRejects(t *testing.T) {
	owner := loadModel(t, "mixed")
	b, err := torch.NewBuilder(owner)
	require.NoError(t, err)
	defer b.Close()
	weight, bias, err := torch.NewConv2dParameters(drawSpec)
	require.NoError(t, err)
	defer weight.Close()
	defer bias.Close()

	wider := drawSpec
	wider.OutChannels = 8
	float64Spec := drawSpec
	float64Spec.DType = torch.Float64
	noBias := drawSpec
	noBias.Bias = false

	tests := []struct {
		name         string
		spec         torch.Conv2dSpec
		weight, bias *torch.Tensor
		want         string
	}{
		{"weight of another shape", wider, weight, bias, "shape"},
		{"weight of another dtype", float64Spec, weight, bias, "Float"},
		{"missing bias", drawSpec, weight, nil, "needs a bias"},
		{"unexpected bias", noBias, weight, bias, "has no bias"},
		{"bias as weight", drawSpec, bias, bias, "shape"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := b.Conv2dWith(tt.spec, tt.weight, tt.bias)
			require.Error(t, err)
			assert.Nil(t, m)
			assert.ErrorIs(t, err, torch.ErrTorch)
			assert.Contains(t, err.Error(), tt.want)
		})
	}

	closed, _, err := torch.NewConv2dParameters(noBias)
	require.NoError(t, err)
	closed.Close()
	_, err = b.Conv2dWith(noBias, closed, nil)
	assert.ErrorIs(t, err, torch.ErrClosed)
	assert.ErrorIs(t, torch.DrawConv2dParameters(closed, nil), torch.ErrClosed)
}

// TestReplaceAfterReady checks when ReplaceAfter calls ready, and that an
// error from ready leaves the model as it was.
func TestReplaceAfterReady(t *testing.T) {
	readyErr := errors.New("draws failed")
	tests := []struct {
		name      string
		paths     []string
		readyErr  error
		wantCalls int
		wantErr   error
	}{
		{"ready succeeds", []string{"down"}, nil, 1, nil},
		{"ready fails", []string{"down"}, readyErr, 1, readyErr},
		{"checks fail first", []string{"nope"}, nil, 0, torch.ErrTorch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadModel(t, "mixed")
			before := takeSnapshot(t, m, "mixed")
			replacement := sequentialOf(t, m, "down")

			calls := 0
			err := m.ReplaceAfter(tt.paths, []*torch.Module{replacement}, func() error {
				calls++
				assertSnapshot(t, before, m, "mixed")
				return tt.readyErr
			})
			assert.Equal(t, tt.wantCalls, calls, "calls of ready")
			if tt.wantErr != nil {
				require.Error(t, err)
				assert.ErrorIs(t, err, tt.wantErr)
				assertSnapshot(t, before, m, "mixed")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "Sequential", moduleClass(t, m, "down"))
		})
	}
}

// TestReplaceAfterFailureLeavesNoTypes checks that a replacement whose ready
// fails leaves no new class types behind: committing the same replacement
// afterwards saves the same file as committing it at once. resnet18's
// BasicBlocks share a type, so the replacement copies one.
func TestReplaceAfterFailureLeavesNoTypes(t *testing.T) {
	save := func(failFirst bool) []byte {
		m := loadModel(t, "resnet18")
		torch.ManualSeed(3)
		replacement := sequentialOf(t, m, "layer1.0.conv1")
		paths := []string{"layer1.0.conv1"}
		if failFirst {
			err := m.ReplaceAfter(paths, []*torch.Module{replacement}, func() error { return errors.New("not ready") })
			require.Error(t, err)
		}
		require.NoError(t, m.Replace(paths, []*torch.Module{replacement}))
		path := filepath.Join(t.TempDir(), "model.pt")
		require.NoError(t, m.Save(path))
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		return data
	}
	assert.Equal(t, save(false), save(true), "the saved files differ")
}
