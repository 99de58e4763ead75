#!/usr/bin/python3
"""Write broken TorchScript files and unusual models for convsplit's robustness tests.

Usage: /usr/bin/python3 scripts/bad_inputs.py OUTDIR

Writes into OUTDIR (created when missing). Models, each built right after
torch.manual_seed(0) in eval mode, taking an input of shape (1, 8, 8, 8):
  small.pt              `conv`, Conv2d(8, 16, 3, padding=1); `fc`, Linear(16, 4);
                        `seq`, Sequential(ReLU, Conv2d(16, 16, 3, padding=1))
  frozen.pt             small.pt after torch.jit.freeze: its layers are inlined
  tuple_out.pt          `conv`, Conv2d(8, 16, 3, padding=1), whose forward returns a
                        tuple of three tensors: (conv(x), relu(conv(x)), x.sum())
Broken files that torch.jit.load must reject:
  empty.pt              0 bytes
  truncated.pt          the first half of small.pt
  not_zip.pt            plain text
  zip_without_model.pt  a valid zip archive holding only a README
  bad_code.pt           small.pt with a syntax error in code/__torch__.py
  bad_types.pt          small.pt whose forward calls a method that does not exist
  no_constants.pt       small.pt without its constants.pkl record
  state_dict.pt         torch.save of small's state_dict: a zip archive with no code
Broken files that torch.jit.load of torch 1.13 accepts:
  bad_crc.pt            small.pt with one byte of a tensor record flipped, so that
                        the record no longer matches its CRC-32; it loads with a
                        wrong conv.weight
  wrong_constants.pt    small.pt whose `conv` type declares in_channels = 4 while its
                        weight has 8 input channels; forward still runs, because it
                        reads only the weight
"""
import argparse
import os
import sys
import zipfile

import torch
import torch.nn as nn

class Small(nn.Module):
    """A Conv2d, a Linear and a Sequential holding a Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.seq = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.seq(self.conv(x)).mean((2, 3)))


class TupleOut(nn.Module):
    """A Conv2d whose parent returns a tuple of three tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y), x.sum()


def build(cls):
    """Return an instance of cls built right after torch.manual_seed(0), in eval mode."""
    torch.manual_seed(0)
    return cls().eval()


def write_bytes(out_dir, name, data):
    """Write data to OUTDIR/NAME through a temporary file, and print the path."""
    path = os.path.join(out_dir, name)
    with open(path + '.partial', 'wb') as f:
        f.write(data)
    os.replace(path + '.partial', path)
    print('wrote', path)


def save(module, out_dir, name):
    """Save a TorchScript module as OUTDIR/NAME through a temporary file."""
    path = os.path.join(out_dir, name)
    module.save(path + '.partial')
    os.replace(path + '.partial', path)
    print('wrote', path)


def rewrite_archive(source, out_dir, name, edit):
    """Copy the zip archive source to OUTDIR/NAME, passing each record through edit.

    edit(record_name, data) returns the new data, or None to leave the record out.
    """
    path = os.path.join(out_dir, name)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path + '.partial', 'w', zipfile.ZIP_STORED) as dst:
        for record in src.infolist():
            data = edit(record.filename, src.read(record.filename))
            if data is not None:
                dst.writestr(record.filename, data)
    os.replace(path + '.partial', path)
    print('wrote', path)


def flip_tensor_byte(source, out_dir, name):
    """Copy source to OUTDIR/NAME with one byte of its first tensor record inverted.

    The zip headers keep the old CRC-32, so a reader that checks it finds the
    record corrupt. torch.jit.load of torch 1.13 does not check it and reads a
    wrong weight.
    """
    with zipfile.ZipFile(source) as z:
        record = next(r for r in z.infolist() if '/data/' in r.filename and r.file_size > 0)
        # The data starts after the 30-byte local header, the name and the extra field.
        with open(source, 'rb') as f:
            f.seek(record.header_offset + 26)
            name_length = int.from_bytes(f.read(2), 'little')
            extra_length = int.from_bytes(f.read(2), 'little')
            f.seek(0)
            data = bytearray(f.read())
    data[record.header_offset + 30 + name_length + extra_length] ^= 0xFF
    write_bytes(out_dir, name, bytes(data))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='folder for the files (created when missing)')
    args = parser.parse_args(argv)
    out = args.out_dir
    os.makedirs(out, exist_ok=True)

    small = torch.jit.script(build(Small))
    save(small, out, 'small.pt')
    save(torch.jit.freeze(torch.jit.script(build(Small))), out, 'frozen.pt')
    save(torch.jit.script(build(TupleOut)), out, 'tuple_out.pt')
    small_path = os.path.join(out, 'small.pt')

    with open(small_path, 'rb') as f:
        small_bytes = f.read()
    write_bytes(out, 'empty.pt', b'')
    write_bytes(out, 'truncated.pt', small_bytes[:len(small_bytes) // 2])
    write_bytes(out, 'not_zip.pt', b'this is not a TorchScript archive\n')

    readme = os.path.join(out, 'zip_without_model.pt')
    with zipfile.ZipFile(readme + '.partial', 'w') as z:
        z.writestr('archive/README', 'no model here\n')
    os.replace(readme + '.partial', readme)
    print('wrote', readme)

    def break_syntax(record, data):
        if record.endswith('code/__torch__.py'):
            return data + b'\ndef broken(:\n'
        return data

    def break_types(record, data):
        if record.endswith('code/__torch__.py'):
            return data.replace(b'.forward(', b'.no_such_method(', 1)
        return data

    rewrite_archive(small_path, out, 'bad_code.pt', break_syntax)
    rewrite_archive(small_path, out, 'bad_types.pt', break_types)
    rewrite_archive(small_path, out, 'no_constants.pt',
                    lambda record, data: None if record.endswith('/constants.pkl') else data)
    flip_tensor_byte(small_path, out, 'bad_crc.pt')

    def misdeclare_channels(record, data):
        if record.endswith('code/__torch__/torch/nn/modules/conv.py'):
            return data.replace(b'in_channels : Final[int] = 8', b'in_channels : Final[int] = 4', 1)
        return data

    rewrite_archive(small_path, out, 'wrong_constants.pt', misdeclare_channels)

    state_path = os.path.join(out, 'state_dict.pt')
    torch.save(build(Small).state_dict(), state_path + '.partial')
    os.replace(state_path + '.partial', state_path)
    print('wrote', state_path)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
