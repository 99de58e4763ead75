#!/usr/bin/python3
"""Check a TorchScript file restructured by convsplit against an AMCT reference.json.

Usage (with /usr/bin/python3, which has torch 1.13.1):
  check_reference.py --reference testdata/amct/NAME/reference.json --model OUT.pt
      [--changes CHANGES.json] [--traced ORIGINAL.pt | --original ORIGINAL.pt]
      [--io testdata/amct/NAME/io.pt --state testdata/amct/NAME/decomposed_state.pt]

Checks, each reported on its own line when it fails:
  - every module name in named_modules() order, its class name, and for each Conv2d the
    channels, kernel, stride, padding, dilation, groups, bias, padding mode, dtype,
    memory format and weight shape;
  - the state_dict keys in order and their shapes;
  - the changes file (a JSON object, in order) against the reference's `changes`;
  - the SHA-256 of every parameter listed in the reference's `seeded` entry, which only
    match when convsplit ran with the same seed (`-seed`, 1234 in testdata/amct);
  - with --io and --state: after load_state_dict(strict=True), the eval-mode output for
    io['input'] equals io['output'];
  - every module has a `training` attribute, eval() works and the model runs forward on
    an input of the zoo_models.INPUTS shape.
With --traced (the original was made by torch.jit.trace), untouched layers have no
constants, so only their weight shape, dtype, memory format and bias are compared. With
--traced or --original, every state_dict entry the original also has must keep its
values bit for bit, and new parameters must share storage exactly where the replaced
layers' parameters did.
Exit status: 0 when all checks pass, 1 when any fails, 2 on bad arguments.
"""
import argparse
import hashlib
import json
import os
import sys

import torch

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(SCRIPTS_DIR, os.pardir, 'testdata', 'amct')))

import zoo_models  # noqa: E402  (found through the sys.path entry above)

CONV_CONSTANTS = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                  'groups', 'padding_mode')
# Conv2d fields a traced layer still shows: it keeps its parameters but no constants.
TRACED_FIELDS = ('bias', 'dtype', 'weight_shape', 'channels_last')


def dtype_name(dtype):
    """Return 'float32' for torch.float32 and so on."""
    return str(dtype).replace('torch.', '')


def is_channels_last(tensor):
    """Return True when a 4-D tensor is stored channels-last and not also plainly contiguous."""
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def tensor_sha256(tensor):
    """Return the SHA-256 of a tensor's values: contiguous, own dtype, native byte order."""
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def as_json_value(value):
    """Turn tuples into lists so values compare equal to what json.load gives."""
    if isinstance(value, tuple):
        return [as_json_value(v) for v in value]
    return value


def describe_conv(module):
    """Return (fields, has_constants) for a scripted or traced Conv2d module.

    Scripted modules expose their TorchScript constants as attributes; traced ones do
    not, and then only the parameter-derived fields are filled in.
    """
    params = dict(module.named_parameters(recurse=False))
    weight = params.get('weight')
    fields = {}
    has_constants = all(hasattr(module, name) for name in CONV_CONSTANTS)
    if has_constants:
        for name in CONV_CONSTANTS:
            fields[name] = as_json_value(getattr(module, name))
    fields['bias'] = params.get('bias') is not None
    if weight is not None:
        fields['dtype'] = dtype_name(weight.dtype)
        fields['weight_shape'] = list(weight.shape)
        fields['channels_last'] = is_channels_last(weight)
    return fields, has_constants


class Checker:
    """Collects failed checks and counts passed ones."""

    def __init__(self):
        self.failures = []
        self.passed = 0

    def fail(self, check, detail):
        """Record a failed check, joining multi-line details so that each failure prints on one line."""
        self.failures.append('FAIL %s: %s' % (check, ' '.join(str(detail).split())))

    def expect(self, check, got, want):
        """Record a failure unless got == want."""
        if got == want:
            self.passed += 1
        else:
            self.fail(check, 'got %s, want %s' % (short(got), short(want)))


def short(value, limit=200):
    """Return value as JSON text cut to limit characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + '...'


def new_layer_names(changes):
    """Return the set of module names convsplit creates: each replacement and its two layers."""
    names = set()
    for old, new in changes.items():
        names.add(old)
        names.update(new)
    return names


def check_names(checker, label, got, want):
    """Compare two name lists, reporting missing, unexpected and reordered names."""
    if got == want:
        checker.passed += 1
        return
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing:
        checker.fail(label, 'missing: %s' % short(missing))
    if extra:
        checker.fail(label, 'unexpected: %s' % short(extra))
    if not missing and not extra:
        first = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        checker.fail(label, 'order differs at position %d: got %r, want %r' % (first, got[first], want[first]))


def check_structure(checker, model, reference, traced):
    """Compare every module's name, class and Conv2d fields with reference['structure']."""
    modules = list(model.named_modules())
    want_rows = reference['structure']
    check_names(checker, 'named_modules', [n for n, _ in modules], [r['name'] for r in want_rows])

    want_by_name = {r['name']: r for r in want_rows}
    created = new_layer_names(reference['changes'])
    constant_free = 0
    for name, module in modules:
        want = want_by_name.get(name)
        if want is None:
            continue
        label = 'module %r' % name
        checker.expect(label + ' class', module.original_name, want['type'])
        if 'conv' not in want or module.original_name != want['type']:
            continue

        fields, has_constants = describe_conv(module)
        compared = want['conv'].keys()
        if not has_constants:
            if not traced:
                checker.fail(label, 'Conv2d has no TorchScript constants (in_channels, ...). '
                                    'Pass --traced ORIGINAL.pt if the original was traced')
                continue
            if name in created:
                checker.fail(label, 'new Conv2d has no TorchScript constants, but new layers must be scripted')
                continue
            constant_free += 1
            compared = TRACED_FIELDS
        for key in compared:
            checker.expect('%s %s' % (label, key), fields.get(key), want['conv'][key])
    return constant_free


def check_training(checker, model):
    """Check every module reads a `training` flag equal to the root's, and that eval() works."""
    try:
        root_mode = model.training
    except (AttributeError, RuntimeError) as err:
        checker.fail('training', 'root module has no training attribute: %s' % err)
        return
    for name, module in model.named_modules():
        try:
            mode = module.training
        except (AttributeError, RuntimeError) as err:
            checker.fail('training', 'module %r has no training attribute: %s' % (name, err))
            continue
        # The fixtures are saved in eval mode throughout, so every module must agree.
        checker.expect('module %r training' % name, mode, root_mode)
    try:
        model.eval()
        checker.passed += 1
    except (AttributeError, RuntimeError) as err:
        checker.fail('eval', 'model.eval() failed: %s' % err)


def check_state_dict(checker, state, reference):
    """Compare state_dict keys (in order) and shapes with reference['state_dict']."""
    want = reference['state_dict']
    check_names(checker, 'state_dict keys', list(state), list(want))
    for key, shape in want.items():
        if key in state:
            checker.expect('state_dict %s shape' % key, list(state[key].shape), shape)


def check_seeded(checker, state, reference):
    """Compare the SHA-256 of every seeded parameter."""
    seeded = reference['seeded']
    for key, digest in seeded['sha256'].items():
        if key not in state:
            checker.fail('seeded %s' % key, 'missing from the state_dict')
        elif tensor_sha256(state[key]) != digest:
            checker.fail('seeded %s' % key, 'SHA-256 differs from the reference '
                                            '(was the model made with -seed %d?)' % seeded['seed'])
        else:
            checker.passed += 1


def load_changes(path):
    """Read a changes file keeping its key order, rejecting duplicate keys."""
    def pairs_to_dict(pairs):
        keys = [k for k, _ in pairs]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError('duplicate keys %s' % duplicates)
        return dict(pairs)

    with open(path, encoding='utf-8') as f:
        return json.load(f, object_pairs_hook=pairs_to_dict)


def check_changes(checker, path, reference):
    """Compare a changes file with reference['changes'], order included."""
    try:
        changes = load_changes(path)
    except (OSError, ValueError) as err:
        checker.fail('changes', 'cannot read %s: %s' % (path, err))
        return
    if not isinstance(changes, dict):
        checker.fail('changes', '%s is not a JSON object' % path)
        return
    checker.expect('changes', [[k, v] for k, v in changes.items()],
                   [[k, v] for k, v in reference['changes'].items()])


def check_original(checker, state, original_path, changes):
    """Compare with the original file: untouched values and weight sharing."""
    original = torch.jit.load(original_path).state_dict()
    check_untouched_values(checker, state, original, original_path)
    check_sharing(checker, state, original, changes)


def check_sharing(checker, state, original, changes):
    """Check that new parameters are shared exactly where the replaced ones were.

    Replaced layers whose weights were one tensor must get new layers whose weights are
    one tensor too, and the same holds for the last layers' biases. New parameters of
    layers that shared nothing must not share storage.
    """
    for suffix, layer_index in (('weight', 0), ('weight', 1), ('bias', 1)):
        new_key_by_old_storage = {}
        for old, new in changes.items():
            old_key = old + '.' + suffix if old else suffix
            new_key = new[layer_index] + '.' + suffix
            if old_key not in original or new_key not in state:
                continue
            group = new_key_by_old_storage.setdefault(original[old_key].data_ptr(), [])
            group.append(new_key)
        storage_owner = {}
        for group in new_key_by_old_storage.values():
            first = state[group[0]].data_ptr()
            for key in group[1:]:
                if state[key].data_ptr() == first:
                    checker.passed += 1
                else:
                    checker.fail('sharing %s' % key, 'not shared with %s, although the original layers shared %s'
                                 % (group[0], suffix))
            owner = storage_owner.setdefault(first, group[0])
            if owner != group[0]:
                checker.fail('sharing %s' % group[0], 'shares storage with %s, although the original layers '
                                                     'did not share %s' % (owner, suffix))


def check_untouched_values(checker, state, original, original_path):
    """Check that every state_dict entry the original also has keeps its values bit for bit."""
    # Keys of replaced layers are gone from state. When every layer was replaced
    # (root_conv, shared_weight, lowrank), nothing is left to compare.
    common = [k for k in state if k in original]
    for key in common:
        same = (state[key].dtype == original[key].dtype and state[key].shape == original[key].shape
                and tensor_sha256(state[key]) == tensor_sha256(original[key]))
        if same:
            checker.passed += 1
        else:
            checker.fail('original %s' % key, 'values differ from %s' % original_path)


def last_line(err):
    """Return the last non-empty line of an exception message.

    TorchScript interpreter errors print both tracebacks first and the actual error last.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def output_tolerance(expected, atol, rtol):
    """Return the allowed max abs difference: atol + rtol * max|expected|."""
    return atol + rtol * expected.abs().max().item()


def check_io(checker, model, io_path, state_path, atol, rtol):
    """Load AMCT's decomposed weights and compare the eval-mode output with io.pt."""
    io = torch.load(io_path)
    try:
        model.load_state_dict(torch.load(state_path), strict=True)
    except RuntimeError as err:
        checker.fail('io', 'load_state_dict(strict=True) from %s failed: %s' % (state_path, err))
        return
    model.eval()
    try:
        with torch.no_grad():
            output = model(io['input'])
    except RuntimeError as err:
        checker.fail('io', 'forward on io.pt input of shape %s failed: %s'
                     % (list(io['input'].shape), last_line(err)))
        return
    if not isinstance(output, torch.Tensor) or output.shape != io['output'].shape:
        checker.fail('io', 'output shape %s, want %s' % (getattr(output, 'shape', type(output)),
                                                         tuple(io['output'].shape)))
        return
    diff = (output - io['output']).abs().max().item()
    bound = output_tolerance(io['output'], atol, rtol)
    if diff <= bound:
        checker.passed += 1
    else:
        checker.fail('io', 'max abs difference %.3g from io.pt output exceeds %.3g' % (diff, bound))


def check_forward(checker, model, shape):
    """Run the model on a seeded random input of the given shape."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            output = model(x)
    except RuntimeError as err:
        checker.fail('forward', 'input of shape %s: %s' % (list(shape), last_line(err)))
        return
    if not isinstance(output, torch.Tensor):
        checker.fail('forward', 'returned %s, not a Tensor' % type(output).__name__)
    elif not torch.isfinite(output).all():
        checker.fail('forward', 'output has NaN or infinite values')
    else:
        checker.passed += 1


def parse_shape(text):
    """Parse '1,3,32,32' into a tuple of ints."""
    try:
        shape = tuple(int(part) for part in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError('invalid shape %r: expected comma-separated integers such as 1,3,32,32' % text)
    return shape


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--reference', required=True, help='testdata/amct/NAME/reference.json')
    parser.add_argument('--model', required=True, help='TorchScript file written by convsplit')
    parser.add_argument('--changes', help='changes JSON written by convsplit apply -changes')
    origin = parser.add_mutually_exclusive_group()
    origin.add_argument('--traced', metavar='ORIGINAL.pt',
                        help='the traced file convsplit started from: allows untouched layers without constants')
    origin.add_argument('--original', metavar='ORIGINAL.pt',
                        help='the scripted file convsplit started from: untouched values must be kept')
    parser.add_argument('--io', help="io.pt with {'input', 'output'} (requires --state)")
    parser.add_argument('--state', help='decomposed_state.pt loaded before the --io comparison')
    parser.add_argument('--atol', type=float, default=1e-4, help='absolute tolerance for --io (default 1e-4)')
    parser.add_argument('--rtol', type=float, default=1e-6,
                        help='tolerance for --io relative to max|expected output| (default 1e-6)')
    parser.add_argument('--input-shape', type=parse_shape,
                        help='forward input shape, e.g. 1,3,32,32 (default: zoo_models.INPUTS of the reference folder)')
    args = parser.parse_args(argv)
    if (args.io is None) != (args.state is None):
        parser.error('--io and --state go together')
    if args.input_shape is None:
        name = os.path.basename(os.path.dirname(os.path.abspath(args.reference)))
        if name not in zoo_models.INPUTS:
            parser.error('no input shape known for %r: pass --input-shape' % name)
        args.input_shape = zoo_models.INPUTS[name]
    return args


def main(argv):
    args = parse_args(argv)
    with open(args.reference, encoding='utf-8') as f:
        reference = json.load(f)

    checker = Checker()
    try:
        model = torch.jit.load(args.model)
    except (OSError, RuntimeError, ValueError) as err:
        print('FAIL load: torch.jit.load(%r) failed: %s' % (args.model, last_line(err)))
        return 1

    constant_free = check_structure(checker, model, reference, traced=args.traced is not None)
    state = model.state_dict()
    check_state_dict(checker, state, reference)
    check_seeded(checker, state, reference)
    if args.changes:
        check_changes(checker, args.changes, reference)
    if args.traced or args.original:
        check_original(checker, state, args.traced or args.original, reference['changes'])
    check_training(checker, model)
    check_forward(checker, model, args.input_shape)
    if args.io:
        check_io(checker, model, args.io, args.state, args.atol, args.rtol)

    for line in checker.failures:
        print(line)
    if checker.failures:
        print('%s: %d checks failed, %d passed' % (args.model, len(checker.failures), checker.passed))
        return 1
    notes = []
    if not args.changes:
        notes.append('changes not checked')
    if constant_free:
        notes.append('%d traced Conv2d compared by weight only' % constant_free)
    print('%s: all %d checks passed against %s%s' % (args.model, checker.passed, args.reference,
                                                       ' (%s)' % ', '.join(notes) if notes else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
