package decompose

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rankVector is one layer of testdata/rank/NAME.json, written by
// scripts/singular_values.py.
type rankVector struct {
	Name        string `json:"name"`
	Mode        string `json:"mode"`
	L           int    `json:"L"`
	M           int    `json:"M"`
	MinChannels int    `json:"min_channels"`
	AMCTRank    int    `json:"amct_rank"`
	// ScipySigma2 and ScipyEstimate are the noise variance and the raw
	// estimate computed with SciPy's fminbound, absent when the script ran
	// without SciPy.
	ScipySigma2    *float64  `json:"scipy_sigma2"`
	ScipyEstimate  *int      `json:"scipy_estimate"`
	SingularValues []float64 `json:"singular_values"`
}

// rankModels are the models whose singular values are committed.
var rankModels = []string{"lowrank", "mixed", "root_conv", "shared_weight", "resnet18"}

func loadRankVectors(t *testing.T, model string) []rankVector {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "testdata", "rank", model+".json"))
	require.NoError(t, err, "run /usr/bin/python3 scripts/singular_values.py to write the rank test vectors")
	var vectors []rankVector
	require.NoError(t, json.Unmarshal(data, &vectors))
	require.NotEmpty(t, vectors)
	return vectors
}

func TestRankMatchesAMCT(t *testing.T) {
	for _, model := range rankModels {
		for _, layer := range loadRankVectors(t, model) {
			t.Run(model+"/"+layer.Name, func(t *testing.T) {
				require.Len(t, layer.SingularValues, layer.L)

				estimate, err := EstimateRank(layer.SingularValues, layer.L, layer.M)
				require.NoError(t, err)
				assert.Equal(t, layer.AMCTRank, RoundRank(estimate, layer.L, layer.MinChannels), "rank (estimate %d)", estimate)
				if layer.ScipyEstimate != nil {
					assert.Equal(t, *layer.ScipyEstimate, estimate, "estimate against SciPy")
				}
			})
		}
	}
}

func TestRankNoiseVarianceMatchesScipy(t *testing.T) {
	compared := 0
	for _, model := range rankModels {
		for _, layer := range loadRankVectors(t, model) {
			if layer.ScipySigma2 == nil {
				continue
			}
			compared++
			sigma2, err := estimateNoiseVariance(layer.SingularValues, layer.L, layer.M)
			require.NoError(t, err, "%s/%s", model, layer.Name)
			// Summation order and libm rounding may differ from NumPy's in
			// the last bits, which moves the minimizer far less than xatol.
			assert.InEpsilon(t, *layer.ScipySigma2, sigma2, 1e-9, "%s/%s sigma2", model, layer.Name)
		}
	}
	if compared == 0 {
		t.Skip("the rank test vectors have no SciPy fields: SciPy was missing when scripts/singular_values.py ran")
	}
}

// TestRankLowrankFromEstimate checks that the planted ranks of the lowrank
// model are found by the estimate, inside the clamp range, and that for
// layers a and d the clamp alone would give another rank than AMCT's.
func TestRankLowrankFromEstimate(t *testing.T) {
	planted := map[string]int{"a": 170, "b": 60, "c": 100, "d": 94}
	clampDecides := map[string]bool{"a": false, "b": true, "c": true, "d": false}

	for _, layer := range loadRankVectors(t, "lowrank") {
		t.Run(layer.Name, func(t *testing.T) {
			estimate, err := EstimateRank(layer.SingularValues, layer.L, layer.M)
			require.NoError(t, err)
			assert.Equal(t, planted[layer.Name], estimate, "estimate")

			divisor := 6
			if layer.MinChannels >= 256 {
				divisor = 4
			}
			assert.Greater(t, estimate, layer.L/(divisor+1), "estimate above the clamp's lower end")
			assert.Less(t, estimate, layer.L/divisor, "estimate below the clamp's upper end")

			clampOnly := RoundRank(0, layer.L, layer.MinChannels)
			assert.Equal(t, clampDecides[layer.Name], clampOnly == layer.AMCTRank, "clamp alone gives %d, AMCT %d", clampOnly, layer.AMCTRank)
		})
	}
}

func TestRankNoiseVarianceBounds(t *testing.T) {
	// L = M = 32: alpha = 1, h = min(ceil(32/2) - 1, 32) - 1 = 14.
	_, _, xBar := vbmfConstants(32, 32)

	t.Run("value at h+1 decides lower bound", func(t *testing.T) {
		// squares[14] = 1.21 and squares[15] = 1 differ, so the lower bound
		// shows which index it reads. The tail mean (2.21/18)/32 is smaller.
		squares := make([]float64, 32)
		for i := range 14 {
			squares[i] = 4
		}
		squares[14], squares[15] = 1.21, 1

		lo, hi, err := noiseVarianceBounds(squares, 32, 32)
		require.NoError(t, err)
		assert.InEpsilon(t, 1/(32*xBar), lo, 1e-15)
		assert.InEpsilon(t, (14*4+2.21)/(32*32), hi, 1e-15)
	})

	t.Run("tail mean from h decides lower bound", func(t *testing.T) {
		// squares[14] = 9 and squares[15:] = 1: the mean from index 14 is
		// 26/18, from index 15 it would be 1.
		squares := make([]float64, 32)
		for i := range squares {
			squares[i] = 1
		}
		for i := range 15 {
			squares[i] = 9
		}

		lo, hi, err := noiseVarianceBounds(squares, 32, 32)
		require.NoError(t, err)
		assert.InEpsilon(t, 26.0/18/32, lo, 1e-15)
		assert.InEpsilon(t, (15*9+17)/(32.0*32), hi, 1e-15)
	})

	t.Run("equal values give equal bounds", func(t *testing.T) {
		squares := make([]float64, 32)
		for i := range squares {
			squares[i] = 1
		}

		lo, hi, err := noiseVarianceBounds(squares, 32, 32)
		require.NoError(t, err)
		assert.InEpsilon(t, 1.0/32, lo, 1e-15)
		assert.InEpsilon(t, 1.0/32, hi, 1e-15)
	})
}

func TestRankEstimateSyntheticSpectrum(t *testing.T) {
	// Ten strong components over a flat noise floor: every strong value is
	// far above the threshold and no noise value is.
	const L, M = 64, 128
	s := make([]float64, L)
	for i := range s {
		switch {
		case i < 10:
			s[i] = 100 - float64(i)
		default:
			s[i] = 1 - float64(i)*1e-3
		}
	}
	estimate, err := EstimateRank(s, L, M)
	require.NoError(t, err)
	assert.Equal(t, 10, estimate)
}

func TestRankEstimateZeroMatrix(t *testing.T) {
	estimate, err := EstimateRank(make([]float64, 32), 32, 64)
	require.NoError(t, err)
	assert.Equal(t, 0, estimate)
}

func TestRankEstimateInvalidInput(t *testing.T) {
	tests := []struct {
		name string
		s    []float64
		L, M int
		want error
	}{
		{"empty", nil, 0, 4, ErrInvalidMatrixSize},
		{"no values", nil, 4, 4, ErrInvalidSingularValues},
		{"L above M", []float64{3, 2, 1}, 3, 2, ErrInvalidMatrixSize},
		{"negative M", []float64{3, 2, 1}, 3, -1, ErrInvalidMatrixSize},
		{"too few values", []float64{3, 2}, 3, 4, ErrInvalidSingularValues},
		{"too many values", []float64{4, 3, 2, 1}, 3, 4, ErrInvalidSingularValues},
		{"NaN", []float64{3, math.NaN(), 1}, 3, 4, ErrInvalidSingularValues},
		{"positive Inf", []float64{math.Inf(1), 2, 1}, 3, 4, ErrInvalidSingularValues},
		{"negative Inf", []float64{3, 2, math.Inf(-1)}, 3, 4, ErrInvalidSingularValues},
		{"negative value", []float64{3, 2, -1}, 3, 4, ErrInvalidSingularValues},
		{"ascending", []float64{1, 2, 3}, 3, 4, ErrInvalidSingularValues},
		{"squares overflow", []float64{1e200, 1e200, 1e200}, 3, 4, ErrInvalidSingularValues},
		{"too small for bounds", []float64{2, 1}, 2, 2, ErrInvalidMatrixSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := EstimateRank(tt.s, tt.L, tt.M)
			assert.ErrorIs(t, err, tt.want)
		})
	}
}

func TestRankRoundRank(t *testing.T) {
	// Each comment gives the clamp range [floor(L/(d+1)), floor(L/d)] and
	// the steps from the clamped value to the rank.
	tests := []struct {
		name                     string
		estimate, L, minChannels int
		want                     int
	}{
		{"zero estimate clamps up", 0, 192, 64, 32},               // [27, 32]: 27 -> 32
		{"negative estimate clamps up", -5, 192, 64, 32},          // [27, 32]: 27 -> 32
		{"estimate above range clamps down", 1000, 768, 256, 192}, // [153, 192]: 192
		{"estimate inside range", 170, 768, 256, 176},             // [153, 192]: 170 -> 176
		{"divisor 4 at 256 channels", 0, 768, 256, 160},           // [153, 192]: 153 -> 160
		{"divisor 6 at 255 channels", 0, 765, 255, 112},           // [109, 127]: 109 -> 112
		{"divisor 4 large layer", 0, 1536, 512, 304},              // [307, 384]: 307 -> 304
		{"rounds half up", 88, 576, 192, 96},                      // [82, 96]: 88 -> 96
		{"rounds below half down", 87, 576, 192, 80},              // [82, 96]: 87 -> 80
		{"multiple of 16 unchanged", 160, 768, 256, 160},          // [153, 192]: 160
		{"rounded down stays above 0.9", 167, 768, 256, 160},      // 167 -> 160 >= 150.3
		{"adds 16 below 0.9 of clamped", 39, 252, 64, 48},         // [36, 42]: 39 -> 32 < 35.1 -> 48
		{"adds 16 after clamp", 0, 384, 128, 64},                  // [54, 64]: 54 -> 48 < 48.6 -> 64
		{"adds 16 to the minimum of 16", 20, 144, 48, 32},         // [20, 24]: 20 -> 16 < 18 -> 32
		{"minimum of 16", 0, 21, 3, 16},                           // [3, 3]: 3 -> 0 -> 16
		{"minimum of 16 at upper end", 100, 48, 16, 16},           // [6, 8]: 8 -> 16
		{"zero L gives the minimum", 0, 0, 1, 16},                 // [0, 0]: 0 -> 16
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, RoundRank(tt.estimate, tt.L, tt.minChannels))
		})
	}
}

// fminboundCases are the test functions of scripts/singular_values.py, with
// the same names, and their exact minimizers on the given interval.
var fminboundCases = map[string]struct {
	f         func(float64) float64
	lo, hi    float64
	minimizer float64
}{
	"parabola":         {func(x float64) float64 { return (x-2)*(x-2) + 1 }, 0, 5, 2},
	"quartic":          {func(x float64) float64 { return x*x*x*x - 3*x*x*x + 2 }, 0, 4, 2.25},
	"abs_kink":         {func(x float64) float64 { return math.Abs(x - 0.3) }, -1, 1, 0.3},
	"increasing_cubic": {func(x float64) float64 { return x*x*x + x }, 1, 2, 1},
	"decreasing_line":  {func(x float64) float64 { return -x }, -3, 7, 7},
	"cosine":           {math.Cos, 2, 5, math.Pi},
	"degenerate":       {func(x float64) float64 { return (x - 1) * (x - 1) }, 0.5, 0.5, 0.5},
}

func TestFminboundKnownMinima(t *testing.T) {
	for name, tc := range fminboundCases {
		t.Run(name, func(t *testing.T) {
			got := fminbound(tc.f, tc.lo, tc.hi, 1e-5, 500)
			assert.InDelta(t, tc.minimizer, got, 1e-5)
			assert.GreaterOrEqual(t, got, tc.lo)
			assert.LessOrEqual(t, got, tc.hi)
		})
	}
}

// fminboundVector is one case of testdata/rank/fminbound.json: SciPy's
// optimize.fminbound result on a test function.
type fminboundVector struct {
	Name   string  `json:"name"`
	Lower  float64 `json:"lower"`
	Upper  float64 `json:"upper"`
	Xatol  float64 `json:"xatol"`
	Maxfun int     `json:"maxfun"`
	Xopt   float64 `json:"xopt"`
	Calls  int     `json:"calls"`
}

func TestFminboundMatchesScipy(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "testdata", "rank", "fminbound.json"))
	if os.IsNotExist(err) {
		t.Skip("no fminbound.json: SciPy was missing when scripts/singular_values.py ran")
	}
	require.NoError(t, err)
	var vectors []fminboundVector
	require.NoError(t, json.Unmarshal(data, &vectors))
	require.Len(t, vectors, len(fminboundCases))

	for _, want := range vectors {
		t.Run(want.Name, func(t *testing.T) {
			tc, ok := fminboundCases[want.Name]
			require.True(t, ok, "no Go function for case %q", want.Name)
			calls := 0
			counted := func(x float64) float64 {
				calls++
				return tc.f(x)
			}
			got := fminbound(counted, want.Lower, want.Upper, want.Xatol, want.Maxfun)
			assert.Equal(t, want.Xopt, got, "minimizer")
			assert.Equal(t, want.Calls, calls, "calls of f")
		})
	}
}

func TestFminboundMaxfun(t *testing.T) {
	calls := 0
	line := func(x float64) float64 {
		calls++
		return -x
	}
	got := fminbound(line, 0, 1000, 1e-5, 5)
	assert.Equal(t, 5, calls)
	assert.Greater(t, got, 0.0)
}

func TestFminboundInvalidBounds(t *testing.T) {
	tests := []struct {
		name   string
		lo, hi float64
	}{
		{"lower above upper", 2, 1},
		{"NaN lower", math.NaN(), 1},
		{"NaN upper", 0, math.NaN()},
		{"infinite lower", math.Inf(-1), 1},
		{"infinite upper", 0, math.Inf(1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			called := false
			got := fminbound(func(x float64) float64 { called = true; return x * x }, tt.lo, tt.hi, 1e-5, 500)
			assert.True(t, math.IsNaN(got))
			assert.False(t, called)
		})
	}
}
