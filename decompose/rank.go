package decompose

import (
	"errors"
	"fmt"
	"math"
)

// Errors returned by EstimateRank. Test for them with errors.Is.
var (
	// ErrInvalidMatrixSize reports an L x M matrix that the rank estimate
	// cannot handle: L or M not positive, L > M, or L too small for the
	// noise-variance bounds.
	ErrInvalidMatrixSize = errors.New("invalid matrix size for rank estimate")
	// ErrInvalidSingularValues reports singular values that are missing,
	// not L in number, not finite, negative or not in descending order.
	ErrInvalidSingularValues = errors.New("invalid singular values")
)

const (
	// vbmfTauScale is the constant of the empirical VBMF threshold
	// tau_bar = 2.5129 sqrt(alpha) (Nakajima et al., JMLR, 2013).
	vbmfTauScale = 2.5129
	// noiseVarianceXatol and noiseVarianceMaxCalls are the absolute
	// tolerance and the call limit of the noise-variance search, SciPy's
	// fminbound defaults, which AMCT's search uses.
	noiseVarianceXatol    = 1e-5
	noiseVarianceMaxCalls = 500
)

// EstimateRank estimates the rank of an L x M matrix (L <= M) from its L
// singular values s, in descending order, with the empirical variational
// Bayesian matrix factorization (EVBMF) threshold. It searches the noise
// variance sigma2 that minimizes the EVBMF free energy and counts the singular
// values strictly above sqrt(M sigma2 (1 + tau_bar)(1 + alpha/tau_bar)), where
// alpha = L/M and tau_bar = 2.5129 sqrt(alpha).
//
// The estimate is 0 when no singular value clears the threshold, which is
// common for randomly initialized weights. RoundRank turns the estimate into
// the rank of a decomposition.
func EstimateRank(s []float64, L, M int) (estimate int, err error) {
	sigma2, err := estimateNoiseVariance(s, L, M)
	if err != nil {
		return 0, err
	}

	// Evaluated in the order the formula is written, so the product rounds
	// as in a Python evaluation of it.
	alpha, tauBar, _ := vbmfConstants(L, M)
	threshold := math.Sqrt(float64(M) * sigma2 * (1 + tauBar) * (1 + alpha/tauBar))
	for _, value := range s {
		if value > threshold {
			estimate++
		}
	}
	return estimate, nil
}

// estimateNoiseVariance returns the noise variance sigma2 that minimizes the
// EVBMF free energy of singular values s, searched with fminbound between
// the bounds of noiseVarianceBounds.
func estimateNoiseVariance(s []float64, L, M int) (float64, error) {
	if err := checkSingularValues(s, L, M); err != nil {
		return 0, err
	}

	alpha, _, xBar := vbmfConstants(L, M)
	m := float64(M)

	squares := make([]float64, L)
	for i, value := range s {
		squares[i] = value * value
	}
	lo, hi, err := noiseVarianceBounds(squares, L, M)
	if err != nil {
		return 0, err
	}
	if hi == 0 {
		// Every singular value is 0, so the matrix and its rank are zero.
		return 0, nil
	}

	// NOTE: a singular value of exactly 0 makes the free energy +Inf for
	// every sigma2 (log(0) is -Inf in Go and NumPy alike), so the search then
	// returns a point that depends only on the bounds.
	freeEnergy := func(sigma2 float64) float64 {
		var energy float64
		for _, square := range squares {
			x := square / (m * sigma2)
			if x <= xBar {
				energy += x - math.Log(x)
				continue
			}
			tau := vbmfTau(x, alpha)
			energy += x - tau + math.Log((tau+1)/x) + alpha*math.Log(tau/alpha+1)
		}
		return energy
	}

	sigma2 := fminbound(freeEnergy, lo, hi, noiseVarianceXatol, noiseVarianceMaxCalls)
	if math.IsNaN(sigma2) || math.IsInf(sigma2, 0) {
		return 0, fmt.Errorf("%w: noise-variance search between %g and %g returned %g", ErrInvalidSingularValues, lo, hi, sigma2)
	}
	return sigma2, nil
}

// noiseVarianceBounds returns the interval [lo, hi] that the noise-variance
// search covers, from the squared singular values of an L x M matrix:
// hi = sum(squares)/(L M) and
// lo = max(squares[h+1]/(M x_bar), mean(squares[h:])/M), where
// h = min(ceil(L/(1+alpha)) - 1, L) - 1 bounds the number of signal
// components (Nakajima et al.). AMCT averages the tail from index h. The
// widely used Python port of EVBMF starts that mean at h+1 instead.
func noiseVarianceBounds(squares []float64, L, M int) (lo, hi float64, err error) {
	alpha, _, xBar := vbmfConstants(L, M)
	m := float64(M)

	h := min(int(math.Ceil(float64(L)/(1+alpha)))-1, L) - 1
	if h < 0 || h+1 >= len(squares) {
		return 0, 0, fmt.Errorf("%w: L = %d, M = %d leaves no singular value for the noise-variance bounds", ErrInvalidMatrixSize, L, M)
	}

	var total, tail float64
	for i, square := range squares {
		total += square
		if i >= h {
			tail += square
		}
	}
	if math.IsInf(total, 0) {
		return 0, 0, fmt.Errorf("%w: the sum of squared singular values overflows float64", ErrInvalidSingularValues)
	}

	hi = total / (float64(L) * m)
	lo = max(squares[h+1]/(m*xBar), tail/float64(L-h)/m)
	if lo > hi {
		return 0, 0, fmt.Errorf("%w: noise-variance bounds are empty (lower %g > upper %g)", ErrInvalidSingularValues, lo, hi)
	}
	return lo, hi, nil
}

// vbmfConstants returns alpha = L/M, tau_bar = 2.5129 sqrt(alpha) and
// x_bar = (1 + tau_bar)(1 + alpha/tau_bar), the threshold on scaled squared
// singular values.
func vbmfConstants(L, M int) (alpha, tauBar, xBar float64) {
	alpha = float64(L) / float64(M)
	tauBar = vbmfTauScale * math.Sqrt(alpha)
	xBar = (1 + tauBar) * (1 + alpha/tauBar)
	return alpha, tauBar, xBar
}

// vbmfTau returns the EVBMF signal-to-noise estimate tau(x) for a scaled
// squared singular value x above the threshold x_bar.
func vbmfTau(x, alpha float64) float64 {
	shifted := x - (1 + alpha)
	return (shifted + math.Sqrt(shifted*shifted-4*alpha)) / 2
}

// checkSingularValues checks the matrix size and that s holds L finite,
// non-negative singular values in descending order.
func checkSingularValues(s []float64, L, M int) error {
	if L <= 0 || M <= 0 || L > M {
		return fmt.Errorf("%w: L = %d, M = %d (need 0 < L <= M)", ErrInvalidMatrixSize, L, M)
	}
	if len(s) == 0 {
		return fmt.Errorf("%w: no singular values", ErrInvalidSingularValues)
	}
	if len(s) != L {
		return fmt.Errorf("%w: got %d values for L = %d", ErrInvalidSingularValues, len(s), L)
	}
	for i, value := range s {
		if math.IsNaN(value) || math.IsInf(value, 0) {
			return fmt.Errorf("%w: value %d is %g, want a finite number", ErrInvalidSingularValues, i, value)
		}
		if value < 0 {
			return fmt.Errorf("%w: value %d is negative (%g)", ErrInvalidSingularValues, i, value)
		}
		if i > 0 && value > s[i-1] {
			return fmt.Errorf("%w: value %d (%g) is larger than value %d (%g), want descending order", ErrInvalidSingularValues, i, value, i-1, s[i-1])
		}
	}
	return nil
}

// RoundRank turns a rank estimate into the rank AMCT gives the decomposition
// of a layer whose matrix has L rows and whose smaller channel count is
// minChannels. It clamps the estimate to [floor(L/(d+1)), floor(L/d)], with
// d = 4 when minChannels >= 256 and 6 otherwise, rounds the result to the
// nearest multiple of 16 (at least 16), and adds 16 when the rounded rank is
// below 0.9 of the clamped one.
func RoundRank(estimate, L, minChannels int) int {
	divisor := 6
	if minChannels >= 256 {
		divisor = 4
	}
	clamped := min(max(estimate, L/(divisor+1)), L/divisor)

	rank := max(16, (clamped+8)/16*16)
	if float64(rank) < 0.9*float64(clamped) {
		rank += 16
	}
	return rank
}
