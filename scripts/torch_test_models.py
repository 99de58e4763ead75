#!/usr/bin/python3
"""Write the extra TorchScript models of the torch/ package's tests and Python's values for them.

Usage: /usr/bin/python3 scripts/torch_test_models.py OUTDIR FIXTUREDIR

Writes OUTDIR/NAME.pt for every model of build_models() and every Conv2d case of CONV_CASES
(scripted as conv_CASE.pt, traced as conv_CASE_traced.pt). Then it writes OUTDIR/reference.json
with what Python's torch reports about those models and about the zoo fixtures mixed,
mixed_traced, resnet18 and resnet18_traced, which must already be in FIXTUREDIR:

  modules     name -> [{name, class}] from named_modules() and original_name
  state_dict  name -> [{name, shape, dtype, parameter}] in state_dict() order
  conv        file name -> Conv2d geometry, or {"error": true} for graphs that must be rejected
  forward     name -> {input_shape, outputs: [{shape, values}]} for test_input(input_shape)

reference.json is written last, through a temporary file, so its presence means the set is complete.
"""
import json
import os
import sys
import types
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

EXTRA_FILES = {'meta.txt': 'convsplit test model\nsecond line\n', 'config.json': '{"rank": 4}'}


def test_input(shape):
    """Return the float32 input the Go tests build too: element i is ((7 * i) % 19 - 9) / 9."""
    count = 1
    for size in shape:
        count *= size
    values = ((torch.arange(count) * 7) % 19 - 9).to(torch.float32) / 9
    return values.reshape(shape)


class TwoOutputs(nn.Module):
    """A model whose forward returns a tuple of two tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y)


class ReturnsList(nn.Module):
    """A model whose forward returns a list of tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x) -> List[torch.Tensor]:
        y = self.conv(x)
        return [y, y * 2, torch.relu(y)]


class ReturnsDict(nn.Module):
    """A model whose forward returns a dict, which Module.Forward does not support."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        return {'y': self.conv(x)}


class ReadsWeight(nn.Module):
    """A parent whose forward reads self.conv.weight, so conv cannot be replaced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.other(self.conv(x) * self.conv.weight.mean())


class ExportReadsWeight(nn.Module):
    """A model whose forward only calls conv but whose exported method reads self.conv.weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

    @torch.jit.export
    def weight_mean(self):
        return self.conv.weight.mean()


class Branches(nn.Module):
    """A model that calls its layers inside an if, inside a loop and from an exported method."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1))

    def forward(self, x):
        if bool(x.sum() > 0):
            x = self.a(x)
        else:
            x = self.b(x)
        for _ in range(2):
            x = self.seq(x)
        return self.b(x)

    @torch.jit.export
    def first(self, x):
        return self.a(x)


class Twice(nn.Module):
    """A model that calls one Conv2d twice, so the traced layer gets forward and forward1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


@torch.jit.interface
class TensorMap(nn.Module):
    """The interface of modules that map one tensor to one tensor."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (must match Conv2d.forward)
        pass


class Block(nn.Module):
    """A Conv2d followed by ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, input):  # noqa: A002 (the interface names the argument input)
        return torch.relu(self.conv(input))


class ThroughInterface(nn.Module):
    """A model whose children are attributes of an interface type."""

    layer: TensorMap
    block: TensorMap

    def __init__(self):
        super().__init__()
        self.layer = nn.Conv2d(4, 8, 3, padding=1)
        self.block = Block()

    def forward(self, x):
        return self.block.forward(self.layer.forward(x))


class WithExtras(nn.Module):
    """A model saved with extra files, a frozen weight and a child in eval mode."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.features(x))


class BiasPair(nn.Module):
    """Two Conv2d layers of one configuration, one with a bias and one without."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


class TwoConvs(nn.Module):
    """Two Conv2d layers of one configuration applied in turn."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def aliased():
    """TwoConvs scripted, with attribute b pointing at the same object as a.

    The saved file keeps one object under both names, as torch.jit.load shows.
    """
    module = torch.jit.script(TwoConvs().eval())
    module._c.setattr('b', module._c.getattr('a'))
    return module


class SubConv(nn.Conv2d):
    """A subclass of Conv2d, which convsplit must not treat as a Conv2d."""


def patched(conv, forward):
    """Give one Conv2d instance another forward, so torch.jit.trace records an unusual graph."""
    conv.forward = types.MethodType(forward, conv)
    return conv


def add_after(self, x):
    return self._conv_forward(x, self.weight, self.bias) + 1


def scaled_weight(self, x):
    return self._conv_forward(x, self.weight * 2, self.bias)


def asymmetric_pad(self, x):
    return F.conv2d(F.pad(x, [1, 0, 1, 0], 'reflect'), self.weight, self.bias)


def constant_pad(self, x):
    return F.conv2d(F.pad(x, [1, 1, 1, 1], value=1.0), self.weight, self.bias)


def two_convolutions(self, x):
    y = self._conv_forward(x, self.weight, self.bias)
    return self._conv_forward(y, self.weight, self.bias)


def pads_twice(self, x):
    return F.conv2d(F.pad(x, [1, 1, 1, 1], 'reflect'), self.weight, self.bias, padding=1)


# CONV_CASES maps a case name to (a function making the layer, forms, whether it must be
# rejected). Forms: 's' for torch.jit.script, 't' for torch.jit.trace. CPU convolution has no
# float16 kernel in torch 1.13, so float16 layers are scripted only.
CONV_CASES = {
    'zeros': (lambda: nn.Conv2d(4, 8, 3), 'st', False),
    'zeros_padded': (lambda: nn.Conv2d(4, 8, 3, padding=1), 'st', False),
    'reflect': (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode='reflect'), 'st', False),
    'replicate': (lambda: nn.Conv2d(4, 8, (3, 5), padding=(1, 2), padding_mode='replicate'), 'st', False),
    'circular': (lambda: nn.Conv2d(4, 8, (5, 3), padding=(2, 1), padding_mode='circular'), 'st', False),
    'reflect_strided': (lambda: nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(0, 2), padding_mode='reflect'),
                        'st', False),
    'stride': (lambda: nn.Conv2d(4, 8, (1, 3), stride=(2, 1), padding=(0, 1)), 'st', False),
    'dilation': (lambda: nn.Conv2d(4, 8, 3, dilation=(2, 3), padding=(2, 3)), 'st', False),
    'groups': (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), 'st', False),
    'depthwise': (lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), 'st', False),
    'no_bias': (lambda: nn.Conv2d(4, 8, 3, stride=2, bias=False), 'st', False),
    'same': (lambda: nn.Conv2d(4, 8, 3, padding='same'), 'st', False),
    'same_even': (lambda: nn.Conv2d(4, 8, (2, 4), padding='same', dilation=(1, 2)), 'st', False),
    'valid': (lambda: nn.Conv2d(4, 8, 3, padding='valid'), 'st', False),
    'same_reflect': (lambda: nn.Conv2d(4, 8, 3, padding='same', padding_mode='reflect'), 'st', False),
    'float64': (lambda: nn.Conv2d(4, 8, 3, padding=1).double(), 'st', False),
    'float16': (lambda: nn.Conv2d(4, 8, 3, padding=1).half(), 's', False),
    'channels_last': (lambda: nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last), 'st', False),
    'reflect_float64_channels_last': (
        lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode='reflect').double().to(memory_format=torch.channels_last),
        'st', False),
    # Graphs convsplit must reject, because no Conv2d geometry describes them exactly.
    'subclass': (lambda: SubConv(4, 8, 3), 'st', True),
    'same_reflect_even': (lambda: nn.Conv2d(4, 8, 4, padding='same', padding_mode='reflect'), 't', True),
    'add_after': (lambda: patched(nn.Conv2d(4, 8, 3), add_after), 't', True),
    'scaled_weight': (lambda: patched(nn.Conv2d(4, 8, 3), scaled_weight), 't', True),
    'asymmetric_pad': (lambda: patched(nn.Conv2d(4, 8, 3), asymmetric_pad), 't', True),
    'constant_pad': (lambda: patched(nn.Conv2d(4, 8, 3), constant_pad), 't', True),
    'two_convolutions': (lambda: patched(nn.Conv2d(4, 4, 3), two_convolutions), 't', True),
    'pads_twice': (lambda: patched(nn.Conv2d(4, 8, 3), pads_twice), 't', True),
}

# Height and width of the input each Conv2d case is traced with.
CONV_INPUT_SIZE = 12


def dtype_name(dtype):
    """Return the dtype's name as Go's torch.DType.String writes it ("float32")."""
    return str(dtype).replace('torch.', '')


def pair(value):
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def conv_geometry(conv, traced):
    """Return the geometry Go's Module.Conv2d must report for conv in the given form."""
    weight = conv.weight
    padding_string = conv.padding if isinstance(conv.padding, str) else ''
    padding = [0, 0] if padding_string else pair(conv.padding)
    if traced and padding_string and conv.padding_mode != 'zeros':
        # Traced, such a layer pads explicitly with the amounts the padding string implies.
        reversed_twice = conv._reversed_padding_repeated_twice
        padding = [reversed_twice[2], reversed_twice[0]]
        padding_string = ''
    return {
        'in_channels': conv.in_channels,
        'out_channels': conv.out_channels,
        'kernel_size': pair(conv.kernel_size),
        'stride': pair(conv.stride),
        'padding': padding,
        'dilation': pair(conv.dilation),
        'groups': conv.groups,
        'padding_mode': conv.padding_mode,
        'padding_string': padding_string,
        'bias': conv.bias is not None,
        'scripted': not traced,
        'channels_last': (not weight.is_contiguous()) and weight.is_contiguous(memory_format=torch.channels_last),
        'training': conv.training,
        'dtype': dtype_name(weight.dtype),
        'weight_shape': list(weight.shape),
    }


def describe_modules(module):
    return [{'name': name, 'class': child.original_name} for name, child in module.named_modules()]


def describe_state_dict(module):
    parameters = {name for name, _ in module.named_parameters()}
    return [{'name': name, 'shape': list(value.shape), 'dtype': dtype_name(value.dtype), 'parameter': name in parameters}
            for name, value in module.state_dict().items()]


def describe_forward(module, shape):
    with torch.no_grad():
        result = module(test_input(shape))
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    return {'input_shape': list(shape),
            'outputs': [{'shape': list(t.shape), 'values': t.flatten().tolist()} for t in outputs]}


def build_models():
    """Return name -> (TorchScript module, extra files) of the models other than the Conv2d cases."""
    torch.manual_seed(0)
    twice = torch.jit.trace(Twice().eval(), test_input((1, 8, 8, 8)))

    extras = WithExtras()
    extras.features[0].weight.requires_grad_(False)
    extras.train()
    extras.head.eval()

    return {
        'two_outputs': (torch.jit.script(TwoOutputs().eval()), None),
        'returns_list': (torch.jit.script(ReturnsList().eval()), None),
        'returns_dict': (torch.jit.script(ReturnsDict().eval()), None),
        'reads_weight': (torch.jit.script(ReadsWeight().eval()), None),
        'export_reads_weight': (torch.jit.script(ExportReadsWeight().eval()), None),
        'branches': (torch.jit.script(Branches().eval()), None),
        'twice_traced': (twice, None),
        'interface': (torch.jit.script(ThroughInterface().eval()), None),
        'with_extras': (torch.jit.script(extras), EXTRA_FILES),
        'bias_pair': (torch.jit.script(BiasPair().eval()), None),
        'aliased': (aliased(), None),
    }


def write_conv_cases(out_dir, reference):
    torch.manual_seed(0)
    for case, (make, forms, rejected) in CONV_CASES.items():
        for form in forms:
            conv = make().eval()
            traced = form == 't'
            name = 'conv_' + case + ('_traced' if traced else '')
            if traced:
                example = test_input((1, conv.in_channels, CONV_INPUT_SIZE, CONV_INPUT_SIZE)).to(conv.weight.dtype)
                example = example.contiguous(memory_format=torch.channels_last) if case.endswith('channels_last') \
                    else example
                with torch.no_grad():
                    module = torch.jit.trace(conv, example)
            else:
                module = torch.jit.script(conv)
            module.save(os.path.join(out_dir, name + '.pt'))
            reference['conv'][name] = {'error': True} if rejected else conv_geometry(conv, traced)


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    out_dir, fixture_dir = argv
    os.makedirs(out_dir, exist_ok=True)
    reference = {'modules': {}, 'state_dict': {}, 'conv': {}, 'forward': {}}

    for name in ('mixed', 'mixed_traced', 'resnet18', 'resnet18_traced'):
        module = torch.jit.load(os.path.join(fixture_dir, name + '.pt'))
        reference['modules'][name] = describe_modules(module)
        reference['state_dict'][name] = describe_state_dict(module)
    for name in ('mixed', 'mixed_traced'):
        module = torch.jit.load(os.path.join(fixture_dir, name + '.pt'))
        reference['forward'][name] = describe_forward(module, (1, 3, 32, 32))

    for name, (module, extra_files) in build_models().items():
        torch.jit.save(module, os.path.join(out_dir, name + '.pt'), _extra_files=extra_files or {})
        reference['modules'][name] = describe_modules(module)
        reference['state_dict'][name] = describe_state_dict(module)
    for name in ('two_outputs', 'returns_list'):
        reference['forward'][name] = describe_forward(torch.jit.load(os.path.join(out_dir, name + '.pt')), (1, 3, 8, 8))

    write_conv_cases(out_dir, reference)

    partial = os.path.join(out_dir, 'reference.json.partial')
    with open(partial, 'w') as f:
        json.dump(reference, f)
    os.replace(partial, os.path.join(out_dir, 'reference.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
