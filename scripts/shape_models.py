#!/usr/bin/python3
"""Write the models of decompose/shapes_test.go and check what convsplit made of them.

Usage (with /usr/bin/python3, which has torch 1.13.1):
  shape_models.py build OUTDIR   write every case of CASES into OUTDIR (created when missing)
  shape_models.py check OUTDIR   serve checks of files convsplit wrote: read one JSON request a line
                                 from standard input, {"case": NAME, "model": PATH}, and print one
                                 JSON line {"case": NAME, "checks": N, "failures": [TEXT, ...]}
                                 for each, until the input ends

build writes, for each case NAME:
  NAME.pt          the original model: torch.jit.script, torch.jit.trace or torch.jit.freeze of an
                   eager model built right after torch.manual_seed(0), in eval mode
  NAME.json        the decomposition-information file, in AMCT's layout
  NAME.input.bin   a random forward input: raw little-endian values of the manifest's shape and dtype
  NAME.output.bin  for cases that decompose: the expected model's output for that input
and manifest.json last, so that its presence means the set is complete. manifest.json also holds
the SHA-256 of every file the set depends on, under "sources", so a caller can tell a stale set.

For a case that decomposes, the expected model is what scripts/amct_eager.py's
decompose_network, an eager re-implementation of AMCT's, makes of the eager model after
torch.manual_seed(seed). The manifest holds its structure, state_dict, changes and the SHA-256
of every new parameter.

check compares, for each request:
  - module names in order, their class names, and every Conv2d's geometry, padding mode, bias,
    dtype, memory format and weight shape (untouched layers of traced models have no constants,
    so only their parameters are compared);
  - the state_dict keys in order, their shapes and dtypes;
  - the SHA-256 of every new parameter;
  - that every other state_dict entry of the original file kept its values bit for bit;
  - the eval-mode output for NAME.input.bin, within 1e-5 of the largest expected value;
  - for padding='same' cases, that both new layers report padding 'same' and compute what
    nn.Sequential(nn.Conv2d(..., padding='same'), nn.Conv2d(..., padding='same')) computes with
    the same weights, keeping the input's height and width.
Exit status: 0, or 2 on bad arguments. Failed checks are reported in the JSON lines.
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.normpath(os.path.join(SCRIPTS_DIR, os.pardir))
AMCT_DIR = os.path.join(ROOT_DIR, 'testdata', 'amct')
sys.path.insert(0, SCRIPTS_DIR)
sys.path.insert(0, AMCT_DIR)

import amct_eager  # noqa: E402  (found through the sys.path entries above)
import zoo_models  # noqa: E402

MANIFEST = 'manifest.json'

# Files, relative to the repository, whose content decides what build writes.
SOURCES = (
    'scripts/shape_models.py',
    'scripts/amct_eager.py',
    'testdata/amct/zoo_models.py',
    'testdata/amct/mixed/decompose_info.json',
    'testdata/amct/resnet18/decompose_info.json',
)

# The default generator is seeded with BASE_SEED plus the case's index right before decomposing.
BASE_SEED = 1234

# Allowed output difference, relative to the largest absolute value of the expected output.
OUTPUT_RTOL = 1e-5

CONV_CONSTANTS = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                  'groups', 'padding_mode')
# Conv2d fields that a traced layer, which has no constants, still shows through its parameters.
PARAMETER_FIELDS = ('bias', 'dtype', 'weight_shape', 'channels_last')


# ---------------------------------------------------------------------------
# Models that decompose.

class NestedContainers(nn.Module):
    """ModuleList, ModuleDict and Sequential children with numeric names, four levels deep.

    forward calls the Sequential body.0.0 through its own method, and reaches the Conv2d
    body.0.1.0.0 through a chain of attribute reads in its own graph.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList([nn.ModuleDict({
            '0': nn.Sequential(
                nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                nn.Conv2d(16, 16, (1, 3), padding=(0, 1))),
            '1': nn.ModuleList([nn.Sequential(nn.Conv2d(16, 12, (3, 1), padding=(1, 0)))]),
        })])

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.body[0]['0'](x)
        return self.body[0]['1'][0][0](x)


class SequentialOfContainers(nn.Module):
    """Sequential(ModuleList([Sequential(ModuleDict({'0': Conv2d, '1': Conv2d}))])).

    TorchScript cannot compile the forward of a Sequential that contains a ModuleList, so this
    model is traced only. forward reaches both layers through attribute reads in its own graph.
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.ModuleList([nn.Sequential(nn.ModuleDict({
            '0': nn.Conv2d(3, 8, 3, padding=1),
            '1': nn.Conv2d(8, 16, (3, 5), padding=(1, 2)),
        }))]))

    def forward(self, x):
        layers = self.net[0][0][0]
        return layers['1'](torch.relu(layers['0'](x)))


class CalledTwice(nn.Module):
    """A Conv2d that runs three times and a Sequential that runs twice.

    Traced, conv gets the methods forward, forward1 and forward2, and block and block.0 get
    forward and forward1, which the parents call.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, (3, 5), padding=(1, 2)), nn.ReLU())

    def forward(self, x):
        x = self.conv(torch.relu(self.conv(self.conv(x))))
        return self.block(self.block(x))


@torch.jit.interface
class TensorMap(nn.Module):
    """The interface of modules that map one tensor to one tensor."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (Conv2d.forward names it input)
        pass


class InterfaceBlock(nn.Module):
    """An implementation of TensorMap that contains a Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (TensorMap names it input)
        return torch.relu(self.conv(input))


class ThroughInterface(nn.Module):
    """Children held in attributes annotated with the interface type TensorMap."""

    layer: TensorMap
    block: TensorMap

    def __init__(self):
        super().__init__()
        self.layer = nn.Conv2d(4, 8, (3, 5), padding=(1, 2))
        self.block = InterfaceBlock()

    def forward(self, x):
        return self.block.forward(self.layer.forward(x))


class PaddingModes(nn.Module):
    """One Conv2d per padding mode, covering the four decomposition modes between them."""

    def __init__(self):
        super().__init__()
        self.zeros = nn.Conv2d(8, 16, 3, padding=1)                                            # SCFK
        self.reflect = nn.Conv2d(16, 16, (5, 3), padding=(2, 1), padding_mode='reflect')       # SCSK
        self.replicate = nn.Conv2d(16, 8, (5, 3), stride=(2, 1), padding=(2, 1),
                                   padding_mode='replicate')                                   # FCSK
        self.circular = nn.Conv2d(8, 4, (3, 5), stride=(1, 2), padding=(1, 2),
                                  padding_mode='circular')                                     # FCFK

    def forward(self, x):
        x = torch.relu(self.zeros(x))
        x = torch.relu(self.reflect(x))
        x = torch.relu(self.replicate(x))
        return self.circular(x)


class SamePadding(nn.Module):
    """Layers with padding='same': odd 3x3 and 5x3 kernels and an even 4x4 kernel."""

    def __init__(self, padding_mode):
        super().__init__()
        self.odd = nn.Conv2d(8, 16, 3, padding='same', padding_mode=padding_mode)            # SCFK
        self.tall = nn.Conv2d(16, 16, (5, 3), padding='same', padding_mode=padding_mode)     # SCSK
        self.even = nn.Conv2d(16, 8, 4, padding='same', padding_mode=padding_mode)           # FCFK

    def forward(self, x):
        return self.even(torch.relu(self.tall(torch.relu(self.odd(x)))))


class ResidualBlock(nn.Module):
    """Two Conv2d layers and a skip connection. Scripted, all instances share one class type."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))) + x


class SharedTypes(nn.Module):
    """Five ResidualBlocks: first, blocks.0 to blocks.2 and second."""

    def __init__(self):
        super().__init__()
        self.first = ResidualBlock()
        self.blocks = nn.Sequential(ResidualBlock(), ResidualBlock(), ResidualBlock())
        self.second = ResidualBlock()

    def forward(self, x):
        return self.second(self.blocks(self.first(x)))


def mixed(dtype=None, channels_last=False):
    """Return zoo_models' Mixed, converted to dtype and to channels-last weights when asked."""
    model = zoo_models.build('mixed')
    if dtype is not None:
        model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------
# Models that convsplit must reject.

class ReadsWeight(nn.Module):
    """A parent whose forward reads self.conv.weight besides calling conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * self.conv.weight.mean()


class ReadsWeightElsewhere(nn.Module):
    """A parent whose forward only calls conv, but whose exported method weight_norm reads conv.weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

    @torch.jit.export
    def weight_norm(self) -> Tensor:
        return self.conv.weight.norm()


class PassesToMethod(nn.Module):
    """A parent that passes self.conv to another of its methods."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def apply_layer(self, layer: TensorMap, x: Tensor) -> Tensor:
        return layer.forward(x)

    def forward(self, x):
        return self.apply_layer(self.conv, x)


def apply_layer(layer: TensorMap, x: Tensor) -> Tensor:
    """Run layer on x. The parent PassesToFunction passes its Conv2d to this function."""
    return layer.forward(x)


class PassesToFunction(nn.Module):
    """A parent that passes self.conv to a scripted free function."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return apply_layer(self.conv, x)


class ConvThenHead(nn.Module):
    """conv, a Conv2d(4, 8, 3), then head, a Conv2d(8, 8, 3). torch.jit.freeze removes both modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class MyConv(nn.Conv2d):
    """A subclass of Conv2d, which is not a torch.nn.Conv2d for TorchScript."""


class WithSubclass(nn.Module):
    """head, a plain Conv2d, then conv, an instance of the Conv2d subclass MyConv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(4, 8, 3, padding=1)
        self.conv = MyConv(8, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(self.head(x))


def forward_plus_one(self, x):
    """Run the Conv2d and add 1, an extra operation that torch.jit.trace records in the layer's graph."""
    return self._conv_forward(x, self.weight, self.bias) + 1


def with_extra_op():
    """Return ConvThenHead whose conv runs forward_plus_one."""
    model = ConvThenHead()
    model.conv.forward = types.MethodType(forward_plus_one, model.conv)
    return model


# ---------------------------------------------------------------------------
# Cases.

class Case:
    """One model, how it is made into TorchScript, and the layers its information file lists.

    form is 'script', 'trace' or 'freeze' (torch.jit.freeze of the scripted model). layers
    names the listed Conv2d layers in file order, repeats included; their entries are
    built from the eager layers. amct names a testdata/amct folder whose information file
    gives the entries instead, keeping only the layers named in layers when it is not None.
    decompose is False for models that convsplit must reject. With same_padding, check
    compares each new pair with a same-padded Sequential.
    """

    def __init__(self, name, make, form, input_shape, layers=None, amct=None, decompose=True,
                 same_padding=False):
        self.name = name
        self.make = make
        self.form = form
        self.input_shape = input_shape
        self.layers = layers
        self.amct = amct
        self.decompose = decompose
        self.same_padding = same_padding


NESTED_LAYERS = ['body.0.0.0.0', 'body.0.0.1', 'body.0.1.0.0']
PADDING_LAYERS = ['zeros', 'reflect', 'replicate', 'circular']
SAME_LAYERS = ['odd', 'tall', 'even']
SHARED_LAYERS = ['blocks.1.conv1', 'second.conv2']

CASES = [
    Case('nested', NestedContainers, 'script', (1, 3, 12, 12), NESTED_LAYERS),
    Case('nested_traced', NestedContainers, 'trace', (1, 3, 12, 12), NESTED_LAYERS),
    Case('sequential_of_containers_traced', SequentialOfContainers, 'trace', (1, 3, 12, 12),
         ['net.0.0.0.0', 'net.0.0.0.1']),
    Case('called_twice_traced', CalledTwice, 'trace', (1, 8, 10, 10), ['conv', 'block.0']),
    Case('interface_implementation', ThroughInterface, 'script', (1, 4, 10, 10), ['block.conv']),
    Case('interface_attribute', ThroughInterface, 'script', (1, 4, 10, 10), ['layer', 'block.conv']),
    Case('mixed_float64', lambda: mixed(torch.float64), 'script', zoo_models.INPUTS['mixed'], amct='mixed'),
    Case('mixed_float64_traced', lambda: mixed(torch.float64), 'trace', zoo_models.INPUTS['mixed'], amct='mixed'),
    Case('mixed_float16', lambda: mixed(torch.float16), 'script', zoo_models.INPUTS['mixed'], amct='mixed'),
    Case('mixed_channels_last', lambda: mixed(channels_last=True), 'script', zoo_models.INPUTS['mixed'],
         amct='mixed'),
    Case('mixed_channels_last_traced', lambda: mixed(channels_last=True), 'trace', zoo_models.INPUTS['mixed'],
         amct='mixed'),
    Case('mixed_float64_channels_last', lambda: mixed(torch.float64, channels_last=True), 'script',
         zoo_models.INPUTS['mixed'], amct='mixed'),
    Case('padding_modes', PaddingModes, 'script', (1, 8, 12, 12), PADDING_LAYERS),
    Case('padding_modes_traced', PaddingModes, 'trace', (1, 8, 12, 12), PADDING_LAYERS),
    Case('same_zeros', lambda: SamePadding('zeros'), 'script', (1, 8, 11, 13), SAME_LAYERS, same_padding=True),
    Case('same_reflect', lambda: SamePadding('reflect'), 'script', (1, 8, 11, 13), SAME_LAYERS,
         same_padding=True),
    Case('same_zeros_traced', lambda: SamePadding('zeros'), 'trace', (1, 8, 11, 13), SAME_LAYERS,
         same_padding=True),
    Case('shared_types', SharedTypes, 'script', (1, 8, 10, 10), SHARED_LAYERS),
    Case('shared_types_traced', SharedTypes, 'trace', (1, 8, 10, 10), SHARED_LAYERS),
    Case('resnet18', lambda: zoo_models.build('resnet18'), 'script', zoo_models.INPUTS['resnet18'],
         ['layer1.0.conv1', 'layer3.1.conv2'], amct='resnet18'),
    # Models convsplit must reject.
    Case('reads_weight', ReadsWeight, 'script', (1, 4, 8, 8), ['conv'], decompose=False),
    Case('reads_weight_elsewhere', ReadsWeightElsewhere, 'script', (1, 4, 8, 8), ['conv'], decompose=False),
    Case('passes_to_method', PassesToMethod, 'script', (1, 4, 8, 8), ['conv'], decompose=False),
    Case('passes_to_function', PassesToFunction, 'script', (1, 4, 8, 8), ['conv'], decompose=False),
    Case('frozen', ConvThenHead, 'freeze', (1, 4, 8, 8), ['conv', 'head'], decompose=False),
    Case('subclass', WithSubclass, 'script', (1, 4, 8, 8), ['head', 'conv'], decompose=False),
    Case('duplicate', ConvThenHead, 'script', (1, 4, 8, 8), ['conv', 'head', 'conv'], decompose=False),
    Case('extra_op_traced', with_extra_op, 'trace', (1, 4, 8, 8), ['head', 'conv'], decompose=False),
    Case('same_reflect_even_traced', lambda: SamePadding('reflect'), 'trace', (1, 8, 11, 13), SAME_LAYERS,
         decompose=False),
]


# ---------------------------------------------------------------------------
# Information files.

def split_mode(conv):
    """Return the mode AMCT picks for conv: S or F by the channels, then F or S by the kernel."""
    kh, kw = conv.kernel_size
    channel = 'SC' if conv.out_channels >= conv.in_channels else 'FC'
    kernel = 'FK' if kh <= kw else 'SK'
    return channel + kernel


def entry_for(name, conv):
    """Return an AMCT information-file entry for the eager Conv2d conv, with keys in AMCT's order."""
    kh, kw = conv.kernel_size
    rank = max(1, min(conv.in_channels, conv.out_channels) // 4)
    mode = split_mode(conv)
    if mode in amct_eager.FIRST_KEEPS_HEIGHT:
        first, last = [rank, conv.in_channels, kh, 1], [conv.out_channels, rank, 1, kw]
    else:
        first, last = [rank, conv.in_channels, 1, kw], [conv.out_channels, rank, kh, 1]
    return {
        'ori_layer_info': {
            'name': name,
            'in_channels': conv.in_channels,
            'out_channels': conv.out_channels,
            'kernel_size': list(conv.kernel_size),
            'stride': list(conv.stride),
            'dilation': list(conv.dilation),
            'groups': conv.groups,
        },
        'mode': mode,
        'decom_nodes': {'first': {'weight_shape': first}, 'last': {'weight_shape': last}},
    }


def case_entries(case, model):
    """Return the information-file entries of a case, in file order."""
    if case.amct is not None:
        entries = amct_eager.load_info(os.path.join(AMCT_DIR, case.amct, 'decompose_info.json'))
        if case.layers is None:
            return entries
        by_name = {e['ori_layer_info']['name']: e for e in entries}
        return [by_name[name] for name in case.layers]
    modules = dict(model.named_modules())
    return [entry_for(name, modules[name]) for name in case.layers]


def write_atomically(path, write):
    """Call write with a temporary path, then rename the file to path.

    A test run that reads the set while another run rebuilds it then reads whole files only.
    """
    partial = path + '.partial'
    write(partial)
    os.replace(partial, path)


def write_info(path, entries):
    """Write entries as AMCT does: json.dump with tab indentation and no trailing newline."""
    def write(partial):
        with open(partial, 'w', encoding='utf-8') as f:
            json.dump(entries, f, indent='\t')
    write_atomically(path, write)


# ---------------------------------------------------------------------------
# build

def dtype_name(dtype):
    """Return 'float32' for torch.float32 and so on."""
    return str(dtype).replace('torch.', '')


RAW_DTYPES = {'float32': '<f4', 'float64': '<f8'}


def write_raw(path, tensor):
    """Write a float32 or float64 tensor's values in row-major order, little-endian, and describe the file."""
    name = dtype_name(tensor.dtype)
    values = tensor.detach().contiguous().numpy().astype(RAW_DTYPES[name])
    write_atomically(path, values.tofile)
    return {'file': os.path.basename(path), 'shape': list(tensor.shape), 'dtype': name}


def read_raw(out_dir, spec):
    """Read a tensor that write_raw wrote, as the manifest describes it."""
    values = np.fromfile(os.path.join(out_dir, spec['file']), dtype=RAW_DTYPES[spec['dtype']])
    return torch.from_numpy(values.astype(values.dtype.newbyteorder('='))).reshape(spec['shape'])


def parameter_dtype(model):
    """Return the dtype of the model's first parameter."""
    return next(model.parameters()).dtype


def forward_dtype(model):
    """Return the dtype in which the checks run the model.

    torch 1.13 has no float16 convolution on the CPU, so float16 models run cast to float32.
    """
    dtype = parameter_dtype(model)
    return torch.float32 if dtype == torch.float16 else dtype


def random_input(shape, dtype, seed):
    """Return a tensor of values uniform in [-1, 1) from a generator seeded with seed."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def to_torchscript(model, form, example):
    """Return model scripted, traced on example, or scripted and frozen."""
    if form == 'trace':
        with torch.no_grad():
            return torch.jit.trace(model, example)
    scripted = torch.jit.script(model)
    if form == 'freeze':
        return torch.jit.freeze(scripted)
    return scripted


def run_eval(model, x):
    """Return model's eval-mode output for x, cast to x's dtype first when the dtypes differ."""
    if parameter_dtype(model) != x.dtype:
        model = copy.deepcopy(model).to(x.dtype)
    with torch.no_grad():
        return model.eval()(x)


def new_parameter_hashes(model, changes):
    """Return the SHA-256 of every state_dict entry of the layers the changes created."""
    prefixes = tuple(name + '.' for new in changes.values() for name in new)
    return {key: amct_eager.tensor_sha256(value) for key, value in model.state_dict().items()
            if key.startswith(prefixes)}


def same_stacks(model, entries):
    """Return, for each listed layer, the geometry of the same-padded pair that must replace it."""
    modules = dict(model.named_modules())
    stacks = {}
    for entry in entries:
        name = entry['ori_layer_info']['name']
        conv = modules[name]
        stacks[name] = {
            'first_shape': entry['decom_nodes']['first']['weight_shape'],
            'last_shape': entry['decom_nodes']['last']['weight_shape'],
            'padding_mode': conv.padding_mode,
            'bias': conv.bias is not None,
        }
    return stacks


def build_case(out_dir, index, case):
    """Write one case's files and return its manifest entry."""
    torch.manual_seed(0)
    model = case.make().eval()
    seed = BASE_SEED + index
    x = random_input(case.input_shape, forward_dtype(model), seed)

    module = to_torchscript(model, case.form, x)
    write_atomically(os.path.join(out_dir, case.name + '.pt'), module.save)
    entries = case_entries(case, model)
    write_info(os.path.join(out_dir, case.name + '.json'), entries)

    item = {
        'model': case.name + '.pt',
        'info': case.name + '.json',
        'form': case.form,
        'layers': [e['ori_layer_info']['name'] for e in entries],
        'decompose': case.decompose,
        'input': write_raw(os.path.join(out_dir, case.name + '.input.bin'), x),
        'parameter_dtype': dtype_name(parameter_dtype(model)),
    }
    if not case.decompose:
        return item

    torch.manual_seed(seed)
    expected, changes = amct_eager.decompose_network(copy.deepcopy(model), entries)
    expected.eval()
    item.update({
        'seed': seed,
        'changes': [{'layer': old, 'new_layers': new} for old, new in changes.items()],
        'structure': amct_eager.describe(expected),
        'state_dict': [[key, list(value.shape), dtype_name(value.dtype)]
                       for key, value in expected.state_dict().items()],
        'sha256': new_parameter_hashes(expected, changes),
        'output': write_raw(os.path.join(out_dir, case.name + '.output.bin'), run_eval(expected, x)),
    })
    if case.same_padding:
        item['same_padding'] = same_stacks(model, entries)
    return item


def source_hashes():
    """Return the SHA-256 of each file of SOURCES, by its path relative to the repository."""
    hashes = {}
    for path in SOURCES:
        with open(os.path.join(ROOT_DIR, path), 'rb') as f:
            hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def build_all(out_dir):
    """Write every case and then manifest.json."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {'sources': source_hashes(), 'cases': {}}
    for index, case in enumerate(CASES):
        manifest['cases'][case.name] = build_case(out_dir, index, case)

    def write(partial):
        with open(partial, 'w', encoding='utf-8') as f:
            json.dump(manifest, f, indent=1)
    write_atomically(os.path.join(out_dir, MANIFEST), write)
    print('wrote %d cases to %s' % (len(CASES), out_dir))


# ---------------------------------------------------------------------------
# check

class Checker:
    """Collects failed checks and counts the checks made."""

    def __init__(self):
        self.failures = []
        self.checks = 0

    def expect(self, label, got, want):
        """Record a failure unless got == want."""
        self.checks += 1
        if got != want:
            self.failures.append('%s: got %s, want %s' % (label, short(got), short(want)))

    def require(self, label, ok, detail):
        """Record a failure with detail unless ok."""
        self.checks += 1
        if not ok:
            self.failures.append('%s: %s' % (label, detail))


def short(value, limit=300):
    """Return value as JSON text cut to limit characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + '...'


def as_json_value(value):
    """Turn tuples into lists, so that values compare equal to what json.load gives."""
    if isinstance(value, (tuple, list)):
        return [as_json_value(v) for v in value]
    return value


def describe_conv(module):
    """Return the Conv2d fields of a scripted or traced Conv2d, and whether it has constants.

    The fields are those of amct_eager.describe. A traced layer has no constants, so only
    PARAMETER_FIELDS are filled in for it.
    """
    params = dict(module.named_parameters(recurse=False))
    has_constants = all(hasattr(module, name) for name in CONV_CONSTANTS)
    fields = {}
    if has_constants:
        for name in CONV_CONSTANTS:
            fields[name] = as_json_value(getattr(module, name))
    weight = params['weight']
    fields['bias'] = params.get('bias') is not None
    fields['dtype'] = dtype_name(weight.dtype)
    fields['weight_shape'] = list(weight.shape)
    fields['channels_last'] = amct_eager.is_channels_last(weight)
    return fields, has_constants


def check_structure(checker, item, modules):
    """Compare module names, classes and Conv2d fields with the expected structure."""
    rows = item['structure']
    checker.expect('named_modules', [name for name, _ in modules], [row['name'] for row in rows])
    new_layers = {name for change in item['changes'] for name in change['new_layers']}
    traced = item['form'] == 'trace'
    by_name = dict(modules)
    for row in rows:
        module = by_name.get(row['name'])
        if module is None:
            continue
        checker.expect('class of %r' % row['name'], module.original_name, row['type'])
        if 'conv' not in row or module.original_name != 'Conv2d':
            continue
        fields, has_constants = describe_conv(module)
        want = row['conv']
        if not has_constants:
            checker.require('constants of %r' % row['name'], traced and row['name'] not in new_layers,
                            'the Conv2d has no constants, so it is not a scripted Conv2d')
            want = {key: want[key] for key in PARAMETER_FIELDS}
        checker.expect('Conv2d %r' % row['name'], fields, want)


def check_state(checker, item, saved, original):
    """Compare the state_dict with the expected one, the new parameters' hashes and the kept values."""
    state = saved.state_dict()
    checker.expect('state_dict', [[key, list(value.shape), dtype_name(value.dtype)] for key, value in state.items()],
                   item['state_dict'])
    for key, digest in sorted(item['sha256'].items()):
        got = amct_eager.tensor_sha256(state[key]) if key in state else None
        checker.expect('SHA-256 of %s after torch.manual_seed(%d)' % (key, item['seed']), got, digest)

    replaced = tuple(change['layer'] + '.' for change in item['changes'])
    for key, value in original.state_dict().items():
        if key.startswith(replaced):
            continue
        if key not in state:
            checker.require('untouched %s' % key, False, 'missing from the saved state_dict')
            continue
        checker.expect('values of untouched %s' % key, amct_eager.tensor_sha256(state[key]),
                       amct_eager.tensor_sha256(value))


def max_difference(got, want):
    """Return max |got - want| in float64."""
    return (got.to(torch.float64) - want.to(torch.float64)).abs().max().item()


def check_output(checker, out_dir, item, saved):
    """Compare the saved model's eval-mode output with the expected model's."""
    x = read_raw(out_dir, item['input'])
    want = read_raw(out_dir, item['output'])
    if item['parameter_dtype'] != item['input']['dtype']:
        saved = saved.to(x.dtype)
    with torch.no_grad():
        got = saved(x)
    checker.expect('output shape', list(got.shape), list(want.shape))
    checker.expect('output dtype', dtype_name(got.dtype), dtype_name(want.dtype))
    if list(got.shape) != list(want.shape):
        return
    bound = OUTPUT_RTOL * want.abs().max().item()
    diff = max_difference(got, want)
    checker.require('output', diff <= bound, 'max abs difference %.3g > %.3g' % (diff, bound))


def same_padded_stack(spec, dtype):
    """Return nn.Sequential of two Conv2d layers with padding='same' and the pair's weight shapes."""
    first, last = spec['first_shape'], spec['last_shape']
    return nn.Sequential(
        nn.Conv2d(first[1], first[0], tuple(first[2:]), padding='same', padding_mode=spec['padding_mode'],
                  bias=False),
        nn.Conv2d(last[1], last[0], tuple(last[2:]), padding='same', padding_mode=spec['padding_mode'],
                  bias=spec['bias']),
    ).to(dtype).eval()


def check_same_padding(checker, item, modules):
    """Check that each new pair reports padding 'same' and computes what a same-padded stack computes."""
    by_name = dict(modules)
    for layer, spec in item['same_padding'].items():
        pair = by_name.get(layer)
        new = [by_name.get(layer + '.0'), by_name.get(layer + '.1')]
        if pair is None or None in new:
            checker.require('same-padded pair %r' % layer, False, 'missing from the saved model')
            continue
        for name, conv in zip((layer + '.0', layer + '.1'), new):
            checker.expect('padding of %r' % name, getattr(conv, 'padding', None), 'same')

        dtype = new[0].weight.dtype
        stack = same_padded_stack(spec, dtype)
        with torch.no_grad():
            stack[0].weight.copy_(new[0].weight)
            stack[1].weight.copy_(new[1].weight)
            if spec['bias']:
                stack[1].bias.copy_(new[1].bias)
            x = random_input((2, spec['first_shape'][1], 9, 14), dtype, 7)
            got, want = pair(x), stack(x)
        checker.expect('output shape of %r' % layer, list(got.shape), [2, spec['last_shape'][0], 9, 14])
        if got.shape == want.shape:
            bound = OUTPUT_RTOL * want.abs().max().item()
            diff = max_difference(got, want)
            checker.require('output of %r' % layer, diff <= bound,
                            'max abs difference %.3g from the same-padded Sequential > %.3g' % (diff, bound))


def check_case(out_dir, item, model_path):
    """Run every check of one case and return the Checker."""
    checker = Checker()
    saved = torch.jit.load(model_path).eval()
    original = torch.jit.load(os.path.join(out_dir, item['model']))
    modules = list(saved.named_modules())
    check_structure(checker, item, modules)
    check_state(checker, item, saved, original)
    if item.get('same_padding'):
        check_same_padding(checker, item, modules)
    check_output(checker, out_dir, item, saved)
    return checker


def serve_checks(out_dir, requests, replies):
    """Check the model of each JSON request line and write the report as one JSON line."""
    with open(os.path.join(out_dir, MANIFEST), encoding='utf-8') as f:
        cases = json.load(f)['cases']
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        name = request['case']
        try:
            item = cases[name]
            checker = check_case(out_dir, item, request['model'])
            reply = {'case': name, 'checks': checker.checks, 'failures': checker.failures}
        except Exception as err:  # noqa: BLE001 (any error is a failed check, reported to the caller)
            reply = {'case': name, 'checks': 0, 'failures': ['%s: %s' % (type(err).__name__, err)]}
        replies.write(json.dumps(reply) + '\n')
        replies.flush()
    return 0


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=('build', 'check'), help='build the cases, or check saved models')
    parser.add_argument('out_dir', help='folder of the models, information files and manifest.json')
    args = parser.parse_args(argv)
    if args.command == 'build':
        build_all(args.out_dir)
        return 0
    return serve_checks(args.out_dir, sys.stdin, sys.stdout)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
