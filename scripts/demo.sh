#!/usr/bin/env bash
# The main job on real input: make a TorchScript resnet18 with torchvision,
# replace the layers that AMCT's decomposition file for it lists, and show that
# PyTorch loads and runs the result. Run through `make run`, which builds
# bin/convsplit first.
set -euo pipefail
cd "$(dirname "$0")/.."

python=/usr/bin/python3
out=build/demo
mkdir -p "$out"

echo "== 1. TorchScript resnet18 (torchvision, seed 0), scripted by PyTorch"
$python scripts/fixtures.py "$out" resnet18

echo
echo "== 2. convsplit apply with AMCT's decomposition file for it"
bin/convsplit apply \
  -model "$out/resnet18.pt" \
  -info testdata/amct/resnet18/decompose_info.json \
  -o "$out/resnet18_decomposed.pt" \
  -changes "$out/resnet18_changes.json" \
  -seed 0

echo
echo "== 3. PyTorch loads the result and runs it"
$python - "$out/resnet18.pt" "$out/resnet18_decomposed.pt" <<'PY'
import sys
import torch

original = torch.jit.load(sys.argv[1]).eval()
decomposed = torch.jit.load(sys.argv[2]).eval()
x = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    y0, y1 = original(x), decomposed(x)
params = lambda m: sum(p.numel() for p in m.parameters())
print(f"loaded {sys.argv[2]}: {params(decomposed):,} parameters (original {params(original):,})")
print(f"forward on {tuple(x.shape)}: output {tuple(y1.shape)} (original {tuple(y0.shape)})")
modules = dict(decomposed.named_modules())
pair = modules["layer1.0.conv1"]
print("layer1.0.conv1 is now a", pair.original_name, "of",
      ", ".join(f"{name} {tuple(m.weight.shape)}" for name, m in pair.named_children()))
print("the new layers carry default-initialized weights: load the decomposed weights and fine-tune next")
PY
