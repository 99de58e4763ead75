#!/usr/bin/python3
"""Write the TorchScript fixtures for convsplit's tests.

Usage: /usr/bin/python3 scripts/fixtures.py OUTDIR [NAME...]

For each NAME, writes OUTDIR/NAME.pt, torch.jit.script of zoo_models.build(NAME) in
eval mode, and for the names in TRACED also OUTDIR/NAME_traced.pt, torch.jit.trace of
the same model on a zero input of the zoo_models.INPUTS shape. Without names it writes
the small models (SMALL). A file that exists and is newer than both zoo_models.py and
this script is kept.
"""
import argparse
import os
import sys
import time

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
AMCT_DIR = os.path.normpath(os.path.join(SCRIPTS_DIR, os.pardir, 'testdata', 'amct'))
sys.path.insert(0, AMCT_DIR)

import torch  # noqa: E402

import zoo_models  # noqa: E402  (found through the sys.path entry above)

SMALL = ('resnet18', 'mixed', 'root_conv', 'shared_weight', 'lowrank')
LARGE = ('resnet50', 'vgg16')
TRACED = ('resnet18', 'mixed')


def is_fresh(path, sources):
    """Return True when path exists and is newer than every source file."""
    if not os.path.exists(path):
        return False
    made = os.path.getmtime(path)
    return all(made > os.path.getmtime(source) for source in sources)


def save_atomically(module, path):
    """Save a TorchScript module through a temporary file, so a killed run leaves no half-written fixture."""
    partial = path + '.partial'
    module.save(partial)
    os.replace(partial, path)


def write_fixture(out_dir, name, traced, sources):
    """Write one fixture unless a fresh one exists, and return its path and 'wrote' or 'kept'."""
    path = os.path.join(out_dir, name + ('_traced.pt' if traced else '.pt'))
    if is_fresh(path, sources):
        return path, 'kept'
    model = zoo_models.build(name).eval()
    if traced:
        example = torch.zeros(zoo_models.INPUTS[name])
        with torch.no_grad():
            module = torch.jit.trace(model, example)
    else:
        module = zoo_models.script(model)
    save_atomically(module, path)
    return path, 'wrote'


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='folder for the .pt files (created when missing)')
    parser.add_argument('names', nargs='*', metavar='NAME',
                        help='models to write, from %s (default: %s)' % (' '.join(SMALL + LARGE), ' '.join(SMALL)))
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in SMALL + LARGE]
    if unknown:
        parser.error('unknown model %s: choose from %s' % (', '.join(unknown), ' '.join(SMALL + LARGE)))

    os.makedirs(args.out_dir, exist_ok=True)
    sources = (os.path.join(AMCT_DIR, 'zoo_models.py'), os.path.abspath(__file__))
    for name in args.names or SMALL:
        for traced in (False, True) if name in TRACED else (False,):
            start = time.monotonic()
            path, action = write_fixture(args.out_dir, name, traced, sources)
            print('%s %s (%.1f s)' % (action, path, time.monotonic() - start))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
