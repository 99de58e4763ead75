package decompose

import "math"

// goldenFraction is (3 - sqrt(5))/2, the fraction of an interval that a
// golden-section step moves into its larger part.
var goldenFraction = (3 - math.Sqrt(5)) / 2

// fminboundRelTol is the relative part of the step tolerance. SciPy's
// fminbound (1.10) uses sqrt(2.2e-16), a rounded machine epsilon, so this
// value keeps results equal to SciPy's to the last bit on the same function.
var fminboundRelTol = math.Sqrt(2.2e-16)

// fminbound minimizes f on [lo, hi] with Brent's bounded method (Brent, 1973),
// taking the same steps as SciPy's optimize.fminbound. The first point is the
// golden-section point lo + 0.382 (hi - lo). Parabolic steps are tried when the
// step before last was larger than the tolerance tol = sqrt(2.2e-16) |x| + xatol/3.
// The search stops when the bracket around the best point x is within 2 tol of
// it, or once f has been called maxfun times.
//
// It returns the best point found, the minimizer within the tolerance when f
// is unimodal on [lo, hi]. It returns NaN when a bound is not finite or lo > hi.
func fminbound(f func(float64) float64, lo, hi, xatol float64, maxfun int) float64 {
	if math.IsNaN(lo) || math.IsNaN(hi) || math.IsInf(lo, 0) || math.IsInf(hi, 0) || lo > hi {
		return math.NaN()
	}

	// a and b bracket the minimum. x has the lowest f so far, w the second
	// lowest, v the previous w. step is the last step and prevStep the one
	// before it.
	a, b := lo, hi
	x := a + goldenFraction*(b-a)
	w, v := x, x
	fx := f(x)
	fw, fv := fx, fx
	calls := 1
	var step, prevStep float64

	for {
		mid := (a + b) / 2
		tol := fminboundRelTol*math.Abs(x) + xatol/3
		if math.Abs(x-mid) <= 2*tol-(b-a)/2 {
			return x
		}

		useGolden := true
		if math.Abs(prevStep) > tol {
			// Fit a parabola through (v, fv), (w, fw), (x, fx). Its vertex is
			// x + p/q.
			r := (x - w) * (fx - fv)
			q := (x - v) * (fx - fw)
			p := (x-v)*q - (x-w)*r
			q = 2 * (q - r)
			if q > 0 {
				p = -p
			}
			q = math.Abs(q)
			older := prevStep
			prevStep = step

			// Accept the vertex only if it lies inside (a, b) and the step is
			// less than half the step before last, so the steps shrink.
			if math.Abs(p) < math.Abs(q*older/2) && p > q*(a-x) && p < q*(b-x) {
				useGolden = false
				step = p / q
				u := x + step
				if u-a < 2*tol || b-u < 2*tol {
					step = tol * signOrOne(mid-x)
				}
			}
		}
		if useGolden {
			if x >= mid {
				prevStep = a - x
			} else {
				prevStep = b - x
			}
			step = goldenFraction * prevStep
		}

		// Never evaluate closer than tol to x.
		u := x + signOrOne(step)*math.Max(math.Abs(step), tol)
		fu := f(u)
		calls++

		if fu <= fx {
			if u >= x {
				a = x
			} else {
				b = x
			}
			v, fv = w, fw
			w, fw = x, fx
			x, fx = u, fu
		} else {
			if u < x {
				a = u
			} else {
				b = u
			}
			if fu <= fw || w == x {
				v, fv = w, fw
				w, fw = u, fu
			} else if fu <= fv || v == x || v == w {
				v, fv = u, fu
			}
		}
		if calls >= maxfun {
			return x
		}
	}
}

// signOrOne returns -1 for negative t and 1 otherwise, zero included.
func signOrOne(t float64) float64 {
	if t < 0 {
		return -1
	}
	return 1
}
