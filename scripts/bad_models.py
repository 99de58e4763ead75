#!/usr/bin/python3
"""Write small TorchScript models that convsplit must reject or treat specially.

Usage: /usr/bin/python3 scripts/bad_models.py OUTDIR

Writes into OUTDIR (created when missing):
  weight_reader.pt        layers `first` and `reader`, Conv2d(16, 16, 3, padding=1) each;
                          the parent's forward reads `self.reader.weight`, so `reader`
                          cannot be replaced by a Sequential
  same_padding.pt         `conv`, Conv2d(16, 32, 3, padding='same'), then `even`,
                          Conv2d(32, 32, 4, padding='same'), scripted
  same_padding_traced.pt  the same model, traced
  conv_subclass.pt        `conv`, an instance of a subclass of Conv2d(16, 32, 3)
  dtypes.pt               `wide`, a float64 Conv2d(16, 32, 3, padding=1), and `cl`, a
                          float32 Conv2d(16, 32, 3, padding=1) whose weight is stored
                          channels-last
Every model is built right after torch.manual_seed(0), in eval mode, and takes an
input of shape (1, 16, 8, 8).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

INPUT_SHAPE = (1, 16, 8, 8)


class WeightReader(nn.Module):
    """A parent whose forward reads a layer's weight besides calling the layer."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(16, 16, 3, padding=1)
        self.reader = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.reader(self.first(x)) + self.reader.weight.sum()


class SamePadding(nn.Module):
    """Layers built with padding='same', with an odd and an even kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding='same')
        self.even = nn.Conv2d(32, 32, 4, padding='same')

    def forward(self, x):
        return self.even(self.conv(x))


class MyConv(nn.Conv2d):
    """A Conv2d subclass, which is not a torch.nn.Conv2d for TorchScript."""


class ConvSubclass(nn.Module):
    """A model whose only layer is a Conv2d subclass."""

    def __init__(self):
        super().__init__()
        self.conv = MyConv(16, 32, 3)

    def forward(self, x):
        return self.conv(x)


class DTypes(nn.Module):
    """A float64 layer and a channels-last layer."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(16, 32, 3, padding=1).double()
        self.cl = nn.Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.wide(x.double()).float() + self.cl(x)


def build(cls):
    """Return an instance of cls built right after torch.manual_seed(0), in eval mode."""
    torch.manual_seed(0)
    return cls().eval()


def save(module, out_dir, name):
    """Save a TorchScript module as OUTDIR/NAME.pt through a temporary file."""
    path = os.path.join(out_dir, name + '.pt')
    module.save(path + '.partial')
    os.replace(path + '.partial', path)
    print('wrote', path)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='folder for the .pt files (created when missing)')
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    save(torch.jit.script(build(WeightReader)), args.out_dir, 'weight_reader')
    save(torch.jit.script(build(SamePadding)), args.out_dir, 'same_padding')
    with torch.no_grad():
        traced = torch.jit.trace(build(SamePadding), torch.zeros(INPUT_SHAPE))
    save(traced, args.out_dir, 'same_padding_traced')
    save(torch.jit.script(build(ConvSubclass)), args.out_dir, 'conv_subclass')
    save(torch.jit.script(build(DTypes)), args.out_dir, 'dtypes')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
