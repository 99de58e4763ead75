#!/usr/bin/python3
"""Independent eager-mode model of AMCT's decompose_network, used to check convsplit.

It restructures an eager torch.nn.Module the way AMCT's
amct_pytorch.tensor_decompose.decompose_network does: every Conv2d named in a
decomposition-information file becomes an nn.Sequential of two default-initialized
Conv2d layers. It is written from the published behaviour, not from AMCT's code, and
`verify` shows that it reproduces every testdata/amct reference bit for bit.

Commands (run with /usr/bin/python3, which has torch 1.13.1):
  verify [NAME...]              rebuild each testdata/amct/NAME with the seed in its
                                reference.json and compare with that reference
  script OUTDIR NAME... [--seed N] [--traced]
                                write OUTDIR/NAME.pt, the scripted decomposed model, and
                                OUTDIR/NAME.changes.json; with --traced, OUTDIR/NAME_traced.pt
                                instead: the model traced with only the new layers scripted,
                                the shape convsplit gives a traced original
Exit status: 0 when everything matched, 1 when a check failed.
"""
import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
AMCT_DIR = os.path.join(SCRIPTS_DIR, os.pardir, 'testdata', 'amct')
sys.path.insert(0, os.path.normpath(AMCT_DIR))

import zoo_models  # noqa: E402  (found through the sys.path entry above)

ALL_NAMES = ('resnet18', 'mixed', 'root_conv', 'shared_weight', 'lowrank', 'resnet50', 'vgg16')
SMALL_NAMES = ('resnet18', 'mixed', 'root_conv', 'shared_weight', 'lowrank')
MODES = ('FCFK', 'FCSK', 'SCFK', 'SCSK')

# Modes whose first layer keeps the kernel height, (r, C_in, kh, 1), so the first
# layer resets its width axis and the last layer, (C_out, r, 1, kw), its height axis.
# In the other two modes the roles swap.
FIRST_KEEPS_HEIGHT = ('SCFK', 'FCSK')


class DecomposeError(ValueError):
    """An information-file entry that does not fit the model."""


def load_info(path):
    """Read a decomposition-information file as a list of entries."""
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def find_module(model, name):
    """Return the submodule at a dotted path, or None when the path does not exist."""
    return dict(model.named_modules()).get(name)


def reset_axis(value, axis, neutral):
    """Return a 2-tuple copy of value with index axis set to neutral."""
    pair = list(value)
    pair[axis] = neutral
    return tuple(pair)


def check_entry(model, entry, seen):
    """Validate one entry against the model and return the Conv2d it names.

    Raises DecomposeError naming the layer, like convsplit's validation does.
    """
    layer = entry['ori_layer_info']
    name = layer['name']
    if name in seen:
        raise DecomposeError('layer %r: duplicate entry' % name)
    seen.add(name)

    conv = find_module(model, name)
    if conv is None:
        raise DecomposeError('layer %r: not found in the model' % name)
    if not isinstance(conv, nn.Conv2d):
        raise DecomposeError('layer %r: is %s, not Conv2d' % (name, type(conv).__name__))

    expected = {
        'in_channels': conv.in_channels,
        'out_channels': conv.out_channels,
        'kernel_size': list(conv.kernel_size),
        'stride': list(conv.stride),
        'dilation': list(conv.dilation),
        'groups': conv.groups,
    }
    for key, value in expected.items():
        if layer[key] != value:
            raise DecomposeError('layer %r: %s is %r in the file but %r in the model'
                                 % (name, key, layer[key], value))
    if conv.groups != 1:
        raise DecomposeError('layer %r: groups=%d, only groups=1 can be decomposed' % (name, conv.groups))

    mode = entry['mode']
    if mode not in MODES:
        raise DecomposeError('layer %r: unknown mode %r' % (name, mode))

    first = entry['decom_nodes']['first']['weight_shape']
    last = entry['decom_nodes']['last']['weight_shape']
    kh, kw = conv.kernel_size
    if mode in FIRST_KEEPS_HEIGHT:
        first_kernel, last_kernel = [kh, 1], [1, kw]
    else:
        first_kernel, last_kernel = [1, kw], [kh, 1]
    consistent = (len(first) == 4 and len(last) == 4
                  and first[1] == conv.in_channels and last[0] == conv.out_channels
                  and first[0] == last[1] and first[0] > 0
                  and first[2:] == first_kernel and last[2:] == last_kernel)
    if not consistent:
        raise DecomposeError('layer %r: weight shapes %r and %r do not fit mode %s of a %dx%d %d->%d layer'
                             % (name, first, last, mode, kh, kw, conv.in_channels, conv.out_channels))
    return conv


def new_conv(conv, in_channels, out_channels, kernel, reset, bias):
    """Build one default-initialized Conv2d copying conv's geometry, with axis reset neutralized.

    nn.Conv2d's constructor draws the weight (kaiming_uniform_, a=sqrt(5)) and then the
    bias, both in float32 on fresh contiguous tensors. The cast to the original dtype and
    memory format happens only afterwards, as in AMCT.
    """
    padding = conv.padding
    if not isinstance(padding, str):
        padding = reset_axis(padding, reset, 0)
    # NOTE: a string padding ('same', 'valid') is copied unchanged; no file in
    # testdata/amct has one, so this branch is not checked against AMCT.
    layer = nn.Conv2d(in_channels, out_channels, tuple(kernel),
                      stride=reset_axis(conv.stride, reset, 1),
                      padding=padding,
                      dilation=reset_axis(conv.dilation, reset, 1),
                      groups=conv.groups, bias=bias, padding_mode=conv.padding_mode)
    weight_format = torch.channels_last if is_channels_last(conv.weight) else torch.contiguous_format
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.to(dtype=conv.weight.dtype, device=conv.weight.device,
                                                    memory_format=weight_format),
                                    requires_grad=conv.weight.requires_grad)
        if bias:
            layer.bias = nn.Parameter(layer.bias.to(dtype=conv.bias.dtype, device=conv.bias.device),
                                      requires_grad=conv.bias.requires_grad)
    layer.train(conv.training)
    return layer


def build_pair(conv, entry):
    """Return the Sequential(first, last) that replaces conv, drawing first.weight, last.weight, last.bias."""
    first_shape = entry['decom_nodes']['first']['weight_shape']
    last_shape = entry['decom_nodes']['last']['weight_shape']
    height, width = 0, 1
    if entry['mode'] in FIRST_KEEPS_HEIGHT:
        first_reset, last_reset = width, height
    else:
        first_reset, last_reset = height, width
    first = new_conv(conv, first_shape[1], first_shape[0], first_shape[2:], first_reset, bias=False)
    last = new_conv(conv, last_shape[1], last_shape[0], last_shape[2:], last_reset, bias=conv.bias is not None)
    pair = nn.Sequential(first, last)
    pair.train(conv.training)
    return pair


def set_module(model, name, module):
    """Store module at a dotted path below model (ModuleList and ModuleDict keys included)."""
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def decompose_network(model, info):
    """Restructure model as AMCT's decompose_network does and return (model, changes).

    All entries are validated before anything changes. New layers are built in file
    order. Layers whose original weights were one tensor get new layers that share the
    weights of the first such layer in file order. The later layers still draw their
    own values first, as nn.Conv2d's constructor does in AMCT. A last layer's bias is
    shared only when the original biases were one tensor too. When the
    model itself is the Conv2d, the model is left untouched and a new Sequential is
    returned.
    """
    seen = set()
    convs = [check_entry(model, entry, seen) for entry in info]

    pairs = []
    owner_by_weight = {}
    owner_by_bias = {}
    for conv, entry in zip(convs, info):
        pair = build_pair(conv, entry)
        owner = owner_by_weight.setdefault(id(conv.weight), pair)
        if owner is not pair:
            pair[0].weight = owner[0].weight
            pair[1].weight = owner[1].weight
        if conv.bias is not None:
            bias_owner = owner_by_bias.setdefault(id(conv.bias), pair)
            if bias_owner is not pair:
                pair[1].bias = bias_owner[1].bias
        pairs.append(pair)

    changes = {}
    for pair, entry in zip(pairs, info):
        name = entry['ori_layer_info']['name']
        if name == '':
            model = pair
            changes[name] = ['0', '1']
        else:
            set_module(model, name, pair)
            changes[name] = [name + '.0', name + '.1']
    return model, changes


def is_channels_last(tensor):
    """Return True when a 4-D tensor is stored channels-last and not also plainly contiguous."""
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def tensor_sha256(tensor):
    """Return the SHA-256 of a tensor's values: contiguous, own dtype, native byte order."""
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def output_tolerance(expected, atol=1e-4, rtol=1e-6):
    """Return the allowed max abs difference from expected: atol + rtol * max|expected|.

    The relative part matters for lowrank: its planted weights give outputs near 1e7,
    and this eager model's float32 output differs from io.pt by up to 4 there.
    """
    return atol + rtol * expected.abs().max().item()


def dtype_name(dtype):
    """Return 'float32' for torch.float32 and so on."""
    return str(dtype).replace('torch.', '')


def describe(model):
    """Describe an eager model in the layout of reference.json's `structure`."""
    rows = []
    for name, module in model.named_modules():
        row = {'name': name, 'type': type(module).__name__}
        if isinstance(module, nn.Conv2d):
            padding = module.padding if isinstance(module.padding, str) else list(module.padding)
            row['conv'] = {
                'in_channels': module.in_channels,
                'out_channels': module.out_channels,
                'kernel_size': list(module.kernel_size),
                'stride': list(module.stride),
                'padding': padding,
                'dilation': list(module.dilation),
                'groups': module.groups,
                'bias': module.bias is not None,
                'padding_mode': module.padding_mode,
                'dtype': dtype_name(module.weight.dtype),
                'weight_shape': list(module.weight.shape),
                'channels_last': is_channels_last(module.weight),
            }
        rows.append(row)
    return rows


def decomposed(name, seed, info_path=None):
    """Build zoo model NAME and decompose it right after torch.manual_seed(seed)."""
    info = load_info(info_path or os.path.join(AMCT_DIR, name, 'decompose_info.json'))
    model = zoo_models.build(name)
    torch.manual_seed(seed)
    model, changes = decompose_network(model, info)
    return model, changes


def compare(label, got, want, failures):
    """Append a failure line to failures when got != want."""
    if got != want:
        failures.append('%s: got %s, want %s' % (label, json.dumps(got)[:300], json.dumps(want)[:300]))


def compare_structure(label, got, want, failures):
    """Compare two structure lists row by row, reporting each differing row."""
    compare(label + ' module names', [r['name'] for r in got], [r['name'] for r in want], failures)
    want_by_name = {r['name']: r for r in want}
    for row in got:
        if row['name'] in want_by_name:
            compare('%s %r' % (label, row['name']), row, want_by_name[row['name']], failures)


def verify(name):
    """Return the list of differences between this reimplementation and NAME/reference.json."""
    folder = os.path.join(AMCT_DIR, name)
    with open(os.path.join(folder, 'reference.json'), encoding='utf-8') as f:
        reference = json.load(f)
    failures = []

    original = zoo_models.build(name)
    compare_structure('original_structure', describe(original), reference['original_structure'], failures)

    seed = reference['seeded']['seed']
    model, changes = decomposed(name, seed)
    compare('changes', list(changes.items()), list(reference['changes'].items()), failures)
    compare_structure('structure', describe(model), reference['structure'], failures)

    state = model.state_dict()
    compare('state_dict', [[k, list(v.shape)] for k, v in state.items()],
            [[k, v] for k, v in reference['state_dict'].items()], failures)
    for key, digest in reference['seeded']['sha256'].items():
        if key not in state:
            failures.append('sha256 %s: missing from the state_dict' % key)
        elif tensor_sha256(state[key]) != digest:
            failures.append('sha256 %s: differs after torch.manual_seed(%d)' % (key, seed))

    io_path = os.path.join(folder, 'io.pt')
    if os.path.exists(io_path):
        io = torch.load(io_path)
        model.load_state_dict(torch.load(os.path.join(folder, 'decomposed_state.pt')), strict=True)
        with torch.no_grad():
            diff = (model.eval()(io['input']) - io['output']).abs().max().item()
        bound = output_tolerance(io['output'])
        if not diff <= bound:
            failures.append('io.pt: max abs difference %.3g > %.3g with decomposed_state.pt loaded' % (diff, bound))
    return failures


def write_decomposed(out_dir, name, seed, info_path, traced):
    """Write the decomposed model of NAME as TorchScript, and its changes as JSON."""
    model, changes = decomposed(name, seed, info_path)
    model.eval()
    if traced:
        # Trace with the new layers already scripted: tracing keeps script modules as they
        # are, so the untouched layers end up traced (no constants) and the new ones scripted.
        for old in changes:
            if old:
                set_module(model, old, torch.jit.script(model.get_submodule(old)))
        with torch.no_grad():
            module = torch.jit.trace(model, torch.zeros(zoo_models.INPUTS[name]))
        path = os.path.join(out_dir, name + '_traced.pt')
    else:
        module = zoo_models.script(model)
        path = os.path.join(out_dir, name + '.pt')
    module.save(path)
    with open(os.path.join(out_dir, name + '.changes.json'), 'w', encoding='utf-8') as f:
        json.dump(changes, f, indent=1)
    print('wrote %s' % path)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    verify_cmd = commands.add_parser('verify', help='compare with testdata/amct/NAME/reference.json')
    verify_cmd.add_argument('names', nargs='*', help='folders to check (default: all)')
    script_cmd = commands.add_parser('script', help='save decomposed models as TorchScript')
    script_cmd.add_argument('out_dir', help='folder for the files (created when missing)')
    script_cmd.add_argument('names', nargs='+', metavar='NAME', help='models from %s' % ' '.join(ALL_NAMES))
    script_cmd.add_argument('--seed', type=int, default=1234, help='seed set right before decomposing (default 1234)')
    script_cmd.add_argument('--info', help='information file (default: testdata/amct/NAME/decompose_info.json)')
    script_cmd.add_argument('--traced', action='store_true',
                            help='trace the model, keeping only the new Sequentials scripted')
    args = parser.parse_args(argv)

    if args.command == 'script':
        unknown = [name for name in args.names if name not in ALL_NAMES]
        if unknown:
            parser.error('unknown model %s: choose from %s' % (', '.join(unknown), ' '.join(ALL_NAMES)))
        os.makedirs(args.out_dir, exist_ok=True)
        for name in args.names:
            try:
                write_decomposed(args.out_dir, name, args.seed, args.info, args.traced)
            except DecomposeError as err:
                print('error: %s: %s' % (name, err), file=sys.stderr)
                return 1
        return 0

    failed = 0
    for name in args.names or ALL_NAMES:
        failures = verify(name)
        for line in failures:
            print('FAIL %s: %s' % (name, line))
        if failures:
            failed += 1
        else:
            print('ok   %s: structure, changes, state_dict, seeded sha256%s match reference.json'
                  % (name, ' and io.pt' if os.path.exists(os.path.join(AMCT_DIR, name, 'io.pt')) else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
