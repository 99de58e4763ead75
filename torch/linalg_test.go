package torch

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// convShape is a Conv2d weight shape (C_out, C_in, kh, kw).
type convShape struct{ out, in, kh, kw int }

func (s convShape) dims() []int64 {
	return []int64{int64(s.out), int64(s.in), int64(s.kh), int64(s.kw)}
}

func (s convShape) numel() int { return s.out * s.in * s.kh * s.kw }

// matrixIndex returns the row and column of weight element (o, i, h, w) in
// the unfolded matrix: rows (split channel, split kernel axis), columns
// (other channel, other kernel axis).
func (s convShape) matrixIndex(axes ConvSplitAxes, o, i, h, w int) (row, col int) {
	a, b := i, o
	if axes.Output {
		a, b = o, i
	}
	ka, kb, kbSize := h, w, s.kw
	kaSize := s.kh
	if axes.Width {
		ka, kb, kbSize, kaSize = w, h, s.kh, s.kw
	}
	return a*kaSize + ka, b*kbSize + kb
}

func (s convShape) rows(axes ConvSplitAxes) int {
	row, _ := s.matrixIndex(axes, s.out-1, s.in-1, s.kh-1, s.kw-1)
	return row + 1
}

// fold turns an L x M matrix (row-major) into a weight in (out, in, kh, kw)
// order.
func (s convShape) fold(axes ConvSplitAxes, matrix []float64, cols int) []float64 {
	weight := make([]float64, s.numel())
	for o := 0; o < s.out; o++ {
		for i := 0; i < s.in; i++ {
			for h := 0; h < s.kh; h++ {
				for w := 0; w < s.kw; w++ {
					row, col := s.matrixIndex(axes, o, i, h, w)
					weight[((o*s.in+i)*s.kh+h)*s.kw+w] = matrix[row*cols+col]
				}
			}
		}
	}
	return weight
}

// compose returns the weight of the Conv2d that applies first and then last,
// where each kernel axis has size 1 in one of the two.
func compose(t *testing.T, first, last *Tensor, s convShape) []float64 {
	t.Helper()
	fs, ls := first.Shape(), last.Shape()
	require.Len(t, fs, 4)
	require.Len(t, ls, 4)
	require.Equal(t, fs[0], ls[1], "rank of first and last")
	fv, err := first.Float64s()
	require.NoError(t, err)
	lv, err := last.Float64s()
	require.NoError(t, err)

	rank, fh, fw, lh, lw := int(fs[0]), int(fs[2]), int(fs[3]), int(ls[2]), int(ls[3])
	weight := make([]float64, s.numel())
	for o := 0; o < s.out; o++ {
		for i := 0; i < s.in; i++ {
			for h := 0; h < s.kh; h++ {
				for w := 0; w < s.kw; w++ {
					// One of the two kernels is 1 along each axis, so its index there is 0.
					hf, hl := min(h, fh-1), min(h, lh-1)
					wf, wl := min(w, fw-1), min(w, lw-1)
					var sum float64
					for j := 0; j < rank; j++ {
						sum += lv[((o*rank+j)*lh+hl)*lw+wl] * fv[((j*s.in+i)*fh+hf)*fw+wf]
					}
					weight[((o*s.in+i)*s.kh+h)*s.kw+w] = sum
				}
			}
		}
	}
	return weight
}

var splitCases = []struct {
	name  string
	axes  ConvSplitAxes
	shape convShape
	// first and last are the factor shapes for rank 3.
	first, last []int64
}{
	{"SCFK", ConvSplitAxes{}, convShape{6, 4, 3, 5}, []int64{3, 4, 3, 1}, []int64{6, 3, 1, 5}},
	{"SCSK", ConvSplitAxes{Width: true}, convShape{6, 4, 5, 3}, []int64{3, 4, 1, 3}, []int64{6, 3, 5, 1}},
	{"FCFK", ConvSplitAxes{Output: true}, convShape{4, 6, 3, 5}, []int64{3, 6, 1, 5}, []int64{4, 3, 3, 1}},
	{"FCSK", ConvSplitAxes{Output: true, Width: true}, convShape{4, 6, 5, 3}, []int64{3, 6, 5, 1}, []int64{4, 3, 1, 3}},
}

func TestConvLowRankShapes(t *testing.T) {
	for _, tc := range splitCases {
		t.Run(tc.name, func(t *testing.T) {
			weight, err := FromFloat32(make([]float32, tc.shape.numel()), tc.shape.dims()...)
			require.NoError(t, err)
			f, err := NewConvLowRank(weight, tc.axes)
			require.NoError(t, err)
			defer f.Close()

			rows, cols := f.Size()
			assert.Equal(t, 12, rows, "L")
			assert.Equal(t, 30, cols, "M")
			first, last, err := f.Factors(3)
			require.NoError(t, err)
			assert.Equal(t, tc.first, first.Shape(), "first")
			assert.Equal(t, tc.last, last.Shape(), "last")
			assert.Equal(t, Float32, first.DType(), "first dtype")
			assert.Equal(t, Float32, last.DType(), "last dtype")
		})
	}
}

// A dense random weight of full rank L is reproduced exactly by the factors
// of rank L, whatever the axes, because U U^T is then the identity.
func TestConvLowRankFullRankReconstructs(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range splitCases {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]float64, tc.shape.numel())
			for i := range data {
				data[i] = rng.NormFloat64()
			}
			weight, err := FromFloat64(data, tc.shape.dims()...)
			require.NoError(t, err)
			f, err := NewConvLowRank(weight, tc.axes)
			require.NoError(t, err)
			defer f.Close()

			rows, _ := f.Size()
			first, last, err := f.Factors(rows)
			require.NoError(t, err)
			got := compose(t, first, last, tc.shape)
			assert.InDeltaSlice(t, data, got, 1e-10)

			after, err := weight.Float64s()
			require.NoError(t, err)
			assert.Equal(t, data, after, "the original weight is unchanged")
		})
	}
}

// Debian's libtorch loads OpenBLAS, which has the LAPACK routines of the
// faster path.
func TestConvLowRankFindsLAPACK(t *testing.T) {
	assert.True(t, lapackAvailable(), "dsyrk_, dsytrd_, dsterf_, dstemr_ or dormtr_ not found")
}

// The LAPACK path and the torch.linalg.eigh path give the same singular
// values and the same rank-r approximation of a dense random weight.
func TestConvLowRankMethodsAgree(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, tc := range splitCases {
		t.Run(tc.name, func(t *testing.T) {
			shape := convShape{tc.shape.out * 8, tc.shape.in * 8, tc.shape.kh, tc.shape.kw}
			data := make([]float64, shape.numel())
			for i := range data {
				data[i] = rng.NormFloat64()
			}
			weight, err := FromFloat64(data, shape.dims()...)
			require.NoError(t, err)

			type result struct {
				values    []float64
				composite []float64
			}
			run := func(method lowRankMethod) result {
				f, err := newConvLowRank(weight, tc.axes, method)
				require.NoError(t, err)
				defer f.Close()
				values, err := f.SingularValues()
				require.NoError(t, err)
				first, last, err := f.Factors(20)
				require.NoError(t, err)
				return result{values, compose(t, first, last, shape)}
			}
			fast, eigh := run(lowRankAuto), run(lowRankEigh)
			assert.InDeltaSlice(t, eigh.values, fast.values, 1e-12)
			assert.InDeltaSlice(t, eigh.composite, fast.composite, 1e-10)
		})
	}
}

// A matrix whose rows are multiples of distinct unit vectors has the row
// norms as singular values, and its best rank-r approximation keeps the r
// longest rows.
func TestConvLowRankTruncates(t *testing.T) {
	for _, tc := range splitCases {
		t.Run(tc.name, func(t *testing.T) {
			rows := tc.shape.rows(tc.axes)
			cols := tc.shape.numel() / rows
			norms := make([]float64, rows)
			for r := range norms {
				// Distinct values in no particular order: 1, 8, 3, 10, 5, ...
				norms[r] = float64(1 + (r*7)%rows)
			}
			matrix := make([]float64, rows*cols)
			for r := 0; r < rows; r++ {
				sign := 1.0
				if r%2 == 1 {
					sign = -1
				}
				matrix[r*cols+(r*7)%cols] = sign * norms[r] // 7 and M = 30 are coprime, so the columns differ
			}
			weight, err := FromFloat64(tc.shape.fold(tc.axes, matrix, cols), tc.shape.dims()...)
			require.NoError(t, err)
			f, err := NewConvLowRank(weight, tc.axes)
			require.NoError(t, err)
			defer f.Close()

			values, err := f.SingularValues()
			require.NoError(t, err)
			want := slices.Clone(norms)
			slices.Sort(want)
			slices.Reverse(want)
			assert.InDeltaSlice(t, want, values, 1e-12)

			const rank = 3
			first, last, err := f.Factors(rank)
			require.NoError(t, err)
			truncated := make([]float64, len(matrix))
			for r := 0; r < rows; r++ {
				if norms[r] >= want[rank-1] {
					copy(truncated[r*cols:(r+1)*cols], matrix[r*cols:(r+1)*cols])
				}
			}
			assert.InDeltaSlice(t, tc.shape.fold(tc.axes, truncated, cols), compose(t, first, last, tc.shape), 1e-12)
		})
	}
}

// A weight of rank 1 has eigenvalues at the rounding level, so the singular
// values come from the SVD: non-negative, descending and L in number.
func TestConvLowRankRankDeficient(t *testing.T) {
	shape := convShape{8, 8, 3, 3}
	data := make([]float64, shape.numel())
	for i := range data {
		data[i] = 0.5
	}
	weight, err := FromFloat64(data, shape.dims()...)
	require.NoError(t, err)
	f, err := NewConvLowRank(weight, ConvSplitAxes{})
	require.NoError(t, err)
	defer f.Close()

	values, err := f.SingularValues()
	require.NoError(t, err)
	require.Len(t, values, 24)
	assert.InDelta(t, 0.5*math.Sqrt(float64(shape.numel())), values[0], 1e-12, "largest singular value")
	for i := 1; i < len(values); i++ {
		assert.GreaterOrEqual(t, values[i], 0.0, "value %d", i)
		assert.Less(t, values[i], 1e-12, "value %d", i)
		assert.LessOrEqual(t, values[i], values[i-1], "value %d", i)
	}

	first, last, err := f.Factors(1)
	require.NoError(t, err)
	assert.InDeltaSlice(t, data, compose(t, first, last, shape), 1e-12)
}

func TestConvLowRankZeroWeight(t *testing.T) {
	shape := convShape{4, 4, 3, 3}
	weight, err := FromFloat32(make([]float32, shape.numel()), shape.dims()...)
	require.NoError(t, err)
	f, err := NewConvLowRank(weight, ConvSplitAxes{})
	require.NoError(t, err)
	defer f.Close()

	values, err := f.SingularValues()
	require.NoError(t, err)
	assert.Equal(t, make([]float64, 12), values)
	_, last, err := f.Factors(2)
	require.NoError(t, err)
	lastValues, err := last.Float32s()
	require.NoError(t, err)
	assert.Equal(t, make([]float32, 4*2*3), lastValues, "projection of a zero matrix")
}

// float16 bits of 60000, near the largest finite float16 (65504).
const half60000 = 0x7b53

func TestConvLowRankFloat16Clamps(t *testing.T) {
	shape := convShape{4, 4, 3, 3}
	bits := make([]uint16, shape.numel())
	for i := range bits {
		bits[i] = half60000
	}
	weight, err := fromData(unsafe.Pointer(&bits[0]), len(bits), Float16, shape.dims())
	require.NoError(t, err)
	f, err := NewConvLowRank(weight, ConvSplitAxes{})
	require.NoError(t, err)
	defer f.Close()

	first, last, err := f.Factors(1)
	require.NoError(t, err)
	assert.Equal(t, Float16, first.DType())
	assert.Equal(t, Float16, last.DType())
	// The projection is 60000 x sqrt(12) per element before the cast, above
	// the float16 range, so it is clamped to 65504 instead of becoming Inf.
	finite, err := last.AllFinite()
	require.NoError(t, err)
	assert.True(t, finite, "clamped projection is finite")
	raw, err := last.Bytes()
	require.NoError(t, err)
	halves := unsafe.Slice((*uint16)(unsafe.Pointer(&raw[0])), len(raw)/2)
	for i, h := range halves {
		assert.Equal(t, uint16(0x7bff), h&0x7fff, "element %d is ±65504", i)
	}
}

func TestConvLowRankErrors(t *testing.T) {
	finiteWeight, err := FromFloat32(make([]float32, 4*4*3*3), 4, 4, 3, 3)
	require.NoError(t, err)
	nanData := make([]float32, 4*4*3*3)
	nanData[7] = float32(math.NaN())
	nanWeight, err := FromFloat32(nanData, 4, 4, 3, 3)
	require.NoError(t, err)
	flat, err := FromFloat32(make([]float32, 12), 4, 3)
	require.NoError(t, err)
	ints := []int64{1, 2, 3, 4}
	intWeight, err := fromData(unsafe.Pointer(&ints[0]), 4, Int64, []int64{1, 1, 2, 2})
	require.NoError(t, err)

	cases := []struct {
		name    string
		weight  *Tensor
		message string
	}{
		{"NaN", nanWeight, "NaN or infinite"},
		{"two dimensions", flat, "4 dimensions"},
		{"int64", intWeight, "not supported"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewConvLowRank(tc.weight, ConvSplitAxes{})
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrTorch)
			assert.Contains(t, err.Error(), tc.message)
		})
	}

	f, err := NewConvLowRank(finiteWeight, ConvSplitAxes{})
	require.NoError(t, err)
	for _, rank := range []int{0, 13} {
		_, _, err := f.Factors(rank)
		assert.ErrorContains(t, err, "outside 1..12", "rank %d", rank)
	}
	f.Close()
	_, _, err = f.Factors(1)
	assert.ErrorIs(t, err, ErrClosed)
	_, err = f.SingularValues()
	assert.ErrorIs(t, err, ErrClosed)
}

func TestTensorAllFinite(t *testing.T) {
	cases := []struct {
		name  string
		value float32
		want  bool
	}{
		{"finite", 1.5, true},
		{"NaN", float32(math.NaN()), false},
		{"+Inf", float32(math.Inf(1)), false},
		{"-Inf", float32(math.Inf(-1)), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			x, err := FromFloat32([]float32{0, tc.value, 2}, 3)
			require.NoError(t, err)
			got, err := x.AllFinite()
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestTensorClone(t *testing.T) {
	x, err := FromFloat32([]float32{1, 2, 3, 4, 5, 6}, 2, 3)
	require.NoError(t, err)
	y, err := x.Clone()
	require.NoError(t, err)
	assert.False(t, x.Same(y), "the copy is another tensor")
	assert.Equal(t, x.Shape(), y.Shape())
	assert.Equal(t, x.DType(), y.DType())
	assert.Equal(t, x.RequiresGrad(), y.RequiresGrad())
	values, err := y.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4, 5, 6}, values)

	x.Close()
	_, err = x.Clone()
	assert.ErrorIs(t, err, ErrClosed)
}
