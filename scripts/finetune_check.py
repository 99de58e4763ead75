#!/usr/bin/python3
"""Check from Python the state dicts and models that convsplit's Go code saved.

Usage: /usr/bin/python3 scripts/finetune_check.py NAME --state STATE.pt
           [--same-as REF.pt] [--io IO.pt] [--script MODEL.pt]

NAME is a model of testdata/amct (mixed, lowrank, shared_weight, ...). The checks:
  --state     torch.load reads STATE.pt as an OrderedDict of tensors that do not require
              gradients, with the keys of AMCT's decomposed eager model in its state_dict()
              order, and that model's load_state_dict(strict=True) accepts it
  --same-as   every tensor of STATE.pt equals the one of REF.pt (values, dtype, shape)
  --io        IO.pt contains {'input': x, 'output': y} written by Go; the eager model with
              STATE.pt loaded gives y for x in eval mode
  --script    the TorchScript file MODEL.pt gives y for x too (needs --io)
Outputs agree when max|got - y| <= 1e-4 + 1e-6 * max|y|; the relative part matters for
lowrank, whose outputs are near 1e7.
Exit status: 0 when every check passed, 1 otherwise.
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import amct_eager  # noqa: E402  (found through the sys.path entry above)


def check_state(name, path, failures):
    """Load path into AMCT's decomposed eager model of NAME and return the model."""
    state = torch.load(path)
    if type(state) is not collections.OrderedDict:
        failures.append('%s: torch.load returned a %s, not an OrderedDict' % (path, type(state).__name__))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            failures.append('%s: %s is a %s, not a tensor' % (path, key, type(value).__name__))
        elif value.requires_grad:
            failures.append('%s: %s requires gradients' % (path, key))
    model, _ = amct_eager.decomposed(name, 0)
    want = list(model.state_dict().keys())
    if list(state.keys()) != want:
        failures.append('%s: keys %s, want %s' % (path, list(state.keys())[:5], want[:5]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        failures.append('%s: load_state_dict(strict=True) failed: %s' % (path, err))
    return model.eval(), state


def compare_states(state, ref_path, failures):
    """Require every tensor of state to equal the one of the file at ref_path."""
    reference = torch.load(ref_path)
    for key, want in reference.items():
        got = state.get(key)
        if got is None:
            failures.append('%s is missing' % key)
        elif got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            failures.append('%s differs from %s' % (key, ref_path))


def compare_output(label, model, io, failures):
    """Require model(io['input']) to equal io['output'] within the tolerance."""
    with torch.no_grad():
        got = model(io['input'])
    want = io['output']
    diff = (got - want).abs().max().item()
    bound = amct_eager.output_tolerance(want)
    print('%s: max abs difference %.3g (allowed %.3g)' % (label, diff, bound))
    if not diff <= bound:
        failures.append('%s: max abs difference %.3g > %.3g' % (label, diff, bound))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help='model of testdata/amct')
    parser.add_argument('--state', required=True, help='state dict file written by Go')
    parser.add_argument('--same-as', help='state dict file whose tensors STATE.pt must equal')
    parser.add_argument('--io', help="file with {'input': x, 'output': y} written by Go")
    parser.add_argument('--script', help='TorchScript file written by Go')
    args = parser.parse_args(argv)
    if args.script and not args.io:
        parser.error('--script needs --io')

    failures = []
    model, state = check_state(args.name, args.state, failures)
    if args.same_as:
        compare_states(state, args.same_as, failures)
    if args.io:
        io = torch.load(args.io)
        compare_output('eager model with %s' % os.path.basename(args.state), model, io, failures)
        if args.script:
            compare_output(os.path.basename(args.script), torch.jit.load(args.script).eval(), io, failures)
    for line in failures:
        print('FAIL %s' % line)
    if not failures:
        print('ok   %s: %d tensors' % (args.name, len(state)))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
