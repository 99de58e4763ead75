#!/usr/bin/python3
"""Write the rank test vectors in testdata/rank/ from the models in testdata/amct/.

For every Conv2d listed in testdata/amct/NAME/decompose_info.json, the script
builds zoo_models.build(NAME) (seed 0) and unfolds the layer's weight into the
L x M matrix that the decomposition splits. It stores the matrix's singular
values (float64, full precision) with L, M, the smaller channel count and the
rank AMCT chose (decom_nodes.first.weight_shape[0]).

The matrix rows index (split channel, split kernel axis) and the columns index
(other channel, other kernel axis). The split channel is C_out in the FC modes
and C_in in the SC modes; the split kernel axis is kw in the SK modes and kh in
the FK modes. That makes L = (smaller kernel side) x min(C_in, C_out).

When SciPy imports, each layer also gets the noise variance and the raw VBMF
rank estimate computed with scipy.optimize.fminbound, and fminbound.json gets
SciPy's minimizers of a few test functions. The Go tests compare against
these fields only when they are present.

Run with Debian's interpreter, which has torch:
    /usr/bin/python3 scripts/singular_values.py [NAME ...]
"""
import argparse
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMCT_DIR = os.path.join(ROOT, 'testdata', 'amct')
OUT_DIR = os.path.join(ROOT, 'testdata', 'rank')
DEFAULT_MODELS = ['lowrank', 'mixed', 'root_conv', 'shared_weight', 'resnet18']

sys.path.insert(0, AMCT_DIR)
import zoo_models  # noqa: E402

try:
    from scipy import optimize
except ImportError:
    optimize = None


def unfold(weight, mode):
    """Return the (L, M) float64 matrix of a Conv2d weight (out, in, kh, kw) for the given mode."""
    w = weight.detach().to(torch.float64)
    if mode.endswith('SK'):
        w = w.permute(0, 1, 3, 2)          # (out, in, split kernel axis, other kernel axis)
    if mode.startswith('FC'):
        w = w.permute(0, 2, 1, 3)          # (out, split axis, in, other axis)
    else:
        w = w.permute(1, 2, 0, 3)          # (in, split axis, out, other axis)
    a, ka, b, kb = w.shape
    return w.reshape(a * ka, b * kb)


def vbmf_objective(sigma2, s, L, M, x_bar):
    """Empirical VBMF free energy as a function of the noise variance (residual 0, full rank)."""
    alpha = L / M
    total = 0.0
    for value in s:
        x = value * value / (M * sigma2)
        if x <= x_bar:
            total += x - math.log(x)
        else:
            shifted = x - (1 + alpha)
            tau = (shifted + math.sqrt(shifted * shifted - 4 * alpha)) / 2
            total += x - tau + math.log((tau + 1) / x) + alpha * math.log(tau / alpha + 1)
    return total


def vbmf_estimate(s, L, M):
    """Return (sigma2, rank) of the empirical VBMF threshold, searched with SciPy's fminbound."""
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h = min(math.ceil(L / (1 + alpha)) - 1, L) - 1
    squares = [v * v for v in s]
    upper = sum(squares) / (L * M)
    tail = squares[h:]
    lower = max(squares[h + 1] / (M * x_bar), sum(tail) / len(tail) / M)
    sigma2 = optimize.fminbound(vbmf_objective, lower, upper, args=(s, L, M, x_bar), xtol=1e-5, maxfun=500)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return float(sigma2), sum(1 for v in s if v > threshold)


def layer_vectors(name):
    """Return one test vector per layer of decompose_info.json for model name."""
    with open(os.path.join(AMCT_DIR, name, 'decompose_info.json')) as f:
        entries = json.load(f)
    model = zoo_models.build(name)
    modules = dict(model.named_modules())
    vectors = []
    for entry in entries:
        info = entry['ori_layer_info']
        conv = modules[info['name']]
        c_in, c_out = info['in_channels'], info['out_channels']
        kh, kw = info['kernel_size']
        matrix = unfold(conv.weight, entry['mode'])
        L, M = matrix.shape
        if L != min(kh, kw) * min(c_in, c_out) or M != max(kh, kw) * max(c_in, c_out):
            raise ValueError(f'{name}/{info["name"]}: unfolded matrix is {L}x{M}, not the expected shape')
        s = torch.linalg.svdvals(matrix).tolist()
        vector = {
            'name': info['name'],
            'mode': entry['mode'],
            'L': L,
            'M': M,
            'min_channels': min(c_in, c_out),
            'amct_rank': entry['decom_nodes']['first']['weight_shape'][0],
        }
        if optimize is not None:
            vector['scipy_sigma2'], vector['scipy_estimate'] = vbmf_estimate(s, L, M)
        vector['singular_values'] = s
        vectors.append(vector)
    return vectors


def dump_layers(vectors):
    """Format the vectors as JSON with each layer's singular values on one line."""
    parts = []
    for vector in vectors:
        fields = [f'    {json.dumps(key)}: {json.dumps(value)}' for key, value in vector.items()]
        parts.append('  {\n' + ',\n'.join(fields) + '\n  }')
    return '[\n' + ',\n'.join(parts) + '\n]\n'


# Test functions for fminbound: name -> (Python function, lower bound, upper bound).
# The Go test defines the same functions under the same names.
FMINBOUND_CASES = {
    'parabola': (lambda x: (x - 2.0) * (x - 2.0) + 1.0, 0.0, 5.0),
    'quartic': (lambda x: x * x * x * x - 3.0 * x * x * x + 2.0, 0.0, 4.0),
    'abs_kink': (lambda x: abs(x - 0.3), -1.0, 1.0),
    'increasing_cubic': (lambda x: x * x * x + x, 1.0, 2.0),
    'decreasing_line': (lambda x: -x, -3.0, 7.0),
    'cosine': (lambda x: math.cos(x), 2.0, 5.0),
    'degenerate': (lambda x: (x - 1.0) * (x - 1.0), 0.5, 0.5),
}


def fminbound_vectors():
    """Return SciPy's minimizer and function-call count for each test function."""
    vectors = []
    for name, (func, lower, upper) in FMINBOUND_CASES.items():
        xopt, fval, ierr, numfunc = optimize.fminbound(func, lower, upper, xtol=1e-5, maxfun=500, full_output=True)
        vectors.append({'name': name, 'lower': lower, 'upper': upper, 'xatol': 1e-5, 'maxfun': 500,
                        'xopt': float(xopt), 'fval': float(fval), 'calls': int(numfunc)})
    return vectors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=DEFAULT_MODELS, help='model names from zoo_models.build')
    parser.add_argument('--out', default=OUT_DIR, help='output folder (default: testdata/rank)')
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        path = os.path.join(args.out, name + '.json')
        with open(path, 'w') as f:
            f.write(dump_layers(layer_vectors(name)))
        print(f'wrote {path}')
    if optimize is None:
        print('SciPy is missing: wrote no SciPy fields and no fminbound.json', file=sys.stderr)
        return
    path = os.path.join(args.out, 'fminbound.json')
    with open(path, 'w') as f:
        json.dump(fminbound_vectors(), f, indent=2)
        f.write('\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
