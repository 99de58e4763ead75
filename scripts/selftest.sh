#!/usr/bin/env bash
# Self-test of the Python reference tools.
#
# amct_eager.py must reproduce every testdata/amct/*/reference.json, seeded SHA-256
# included. check_reference.py must pass the TorchScript files that amct_eager.py builds
# and fail, with the right message, on files that are wrong in known ways.
#
# Usage: scripts/selftest.sh [--all]
#   --all  also runs check_reference.py on resnet50 and vgg16. They need over 1 GB in a
#          temporary folder, because vgg16's scripted file alone is over 500 MB.
# Exit status: 0 when every case passed, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=/usr/bin/python3
AMCT=testdata/amct
CHECK=scripts/check_reference.py

names=(resnet18 mixed root_conv shared_weight lowrank)
if [[ ${1:-} == --all ]]; then
    names+=(resnet50 vgg16)
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--all]" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

passed=0
failed=0

# expect_pass LABEL COMMAND...: the command must exit 0.
expect_pass() {
    local label=$1 output
    shift
    if output=$("$@" 2>&1); then
        echo "ok   $label"
        passed=$((passed + 1))
    else
        echo "FAIL $label: expected success"
        sed 's/^/    /' <<<"$output"
        failed=$((failed + 1))
    fi
}

# expect_fail LABEL PATTERN COMMAND...: the command must exit 1 and print a line matching
# PATTERN (an extended regular expression).
expect_fail() {
    local label=$1 pattern=$2 output status
    shift 2
    status=0
    output=$("$@" 2>&1) || status=$?
    if [[ $status -eq 1 ]] && grep -qE -- "$pattern" <<<"$output"; then
        echo "ok   $label"
        passed=$((passed + 1))
    else
        echo "FAIL $label: expected exit status 1 and a line matching '$pattern', got status $status"
        sed 's/^/    /' <<<"$output"
        failed=$((failed + 1))
    fi
}

# io_args NAME: the --io and --state options for folders that have io.pt.
io_args() {
    if [[ -f $AMCT/$1/io.pt ]]; then
        echo "--io $AMCT/$1/io.pt --state $AMCT/$1/decomposed_state.pt"
    fi
}

echo "== amct_eager.py against every reference.json"
expect_pass "amct_eager verify (all folders)" $PY scripts/amct_eager.py verify

echo "== building fixtures and expected models in $work"
$PY scripts/fixtures.py "$work/fixtures" "${names[@]}" >/dev/null
$PY scripts/amct_eager.py script "$work/expected" "${names[@]}" >/dev/null
$PY scripts/amct_eager.py script "$work/expected" --traced resnet18 mixed >/dev/null
$PY scripts/amct_eager.py script "$work/wrong_seed" --seed 1235 mixed >/dev/null

echo "== check_reference.py accepts the expected models"
for name in "${names[@]}"; do
    # shellcheck disable=SC2046  # io_args prints separate words on purpose
    expect_pass "check $name (scripted)" $PY $CHECK --reference "$AMCT/$name/reference.json" \
        --model "$work/expected/$name.pt" --changes "$work/expected/$name.changes.json" \
        --original "$work/fixtures/$name.pt" $(io_args "$name")
done
for name in resnet18 mixed; do
    expect_pass "check $name (traced original)" $PY $CHECK --reference "$AMCT/$name/reference.json" \
        --model "$work/expected/${name}_traced.pt" --changes "$work/expected/$name.changes.json" \
        --traced "$work/fixtures/${name}_traced.pt"
done

echo "== check_reference.py rejects wrong models"
mixed_ref="$AMCT/mixed/reference.json"

expect_fail "undecomposed model" "^FAIL named_modules: missing" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/fixtures/mixed.pt"

expect_fail "wrong seed" "^FAIL seeded down.0.weight: SHA-256 differs" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/wrong_seed/mixed.pt"
# With the wrong seed only the seeded hashes may fail: the structure is still right.
wrong_seed_output=$($PY $CHECK --reference "$mixed_ref" --model "$work/wrong_seed/mixed.pt" 2>&1 || true)
if grep '^FAIL' <<<"$wrong_seed_output" | grep -qv '^FAIL seeded'; then
    echo "FAIL wrong seed fails only seeded checks"
    sed 's/^/    /' <<<"$wrong_seed_output"
    failed=$((failed + 1))
else
    echo "ok   wrong seed fails only seeded checks"
    passed=$((passed + 1))
fi

expect_fail "traced layers without --traced" "no TorchScript constants" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed_traced.pt"

# A decomposed model traced as a whole: its new layers have no constants either.
$PY - "$work" <<'EOF'
import sys
sys.path.insert(0, 'scripts')
import torch
import amct_eager
import zoo_models
model, _ = amct_eager.decomposed('mixed', 1234)
with torch.no_grad():
    traced = torch.jit.trace(model.eval(), torch.zeros(zoo_models.INPUTS['mixed']))
traced.save(sys.argv[1] + '/mixed_all_traced.pt')

# The scripted original with one untouched weight changed.
original = torch.jit.load(sys.argv[1] + '/fixtures/mixed.pt')
with torch.no_grad():
    original.stem.weight.add_(1)
original.save(sys.argv[1] + '/mixed_changed_stem.pt')

# shared_weight with the new weights of c2 no longer shared with those of c1.
model, _ = amct_eager.decomposed('shared_weight', 1234)
model.c2[0].weight = torch.nn.Parameter(model.c2[0].weight.detach().clone())
zoo_models.script(model).save(sys.argv[1] + '/shared_weight_unshared.pt')

# resnet18 with two new layers sharing a weight that the original layers did not share.
model, _ = amct_eager.decomposed('resnet18', 1234)
model.layer1[0].conv2[0].weight = model.layer1[0].conv1[0].weight
zoo_models.script(model).save(sys.argv[1] + '/resnet18_overshared.pt')

# AMCT's decomposed weights with one bias moved by 0.01.
state = torch.load('testdata/amct/mixed/decomposed_state.pt')
state['tail.0.1.1.bias'] += 0.01
torch.save(state, sys.argv[1] + '/mixed_changed_state.pt')
EOF
expect_fail "new layers traced" "FAIL module 'down.0': new Conv2d has no TorchScript constants" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/mixed_all_traced.pt" \
    --traced "$work/fixtures/mixed_traced.pt"

expect_fail "untouched weight changed" "^FAIL original stem.weight: values differ" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" --original "$work/mixed_changed_stem.pt"

expect_fail "shared weights not kept shared" "^FAIL sharing c2.0.weight: not shared with c1.0.weight" \
    $PY $CHECK --reference "$AMCT/shared_weight/reference.json" --model "$work/shared_weight_unshared.pt" \
    --original "$work/fixtures/shared_weight.pt"

expect_fail "unshared weights made shared" "^FAIL sharing layer1.0.conv2.0.weight: shares storage with layer1.0.conv1.0.weight" \
    $PY $CHECK --reference "$AMCT/resnet18/reference.json" --model "$work/resnet18_overshared.pt" \
    --original "$work/fixtures/resnet18.pt"

$PY -c 'import json, sys; c = json.load(open(sys.argv[1])); json.dump(dict(reversed(list(c.items()))), open(sys.argv[2], "w"))' \
    "$work/expected/mixed.changes.json" "$work/reversed.changes.json"
expect_fail "changes out of order" "^FAIL changes: got" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" --changes "$work/reversed.changes.json"

expect_fail "io with another model's weights" "^FAIL io: load_state_dict" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" \
    --io "$AMCT/mixed/io.pt" --state "$AMCT/lowrank/decomposed_state.pt"

expect_fail "io output differs" "^FAIL io: max abs difference 0.01 " \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" \
    --io "$AMCT/mixed/io.pt" --state "$work/mixed_changed_state.pt"

expect_fail "io input of a wrong shape" "^FAIL io: forward on io.pt input of shape \[1, 256, 16, 16\] failed: .*expected input" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" \
    --io "$AMCT/lowrank/io.pt" --state "$AMCT/mixed/decomposed_state.pt"

expect_fail "forward on a wrong input shape" "^FAIL forward: input of shape" \
    $PY $CHECK --reference "$mixed_ref" --model "$work/expected/mixed.pt" --input-shape 1,5,32,32

echo "== amct_eager.py rejects a file that does not fit the model"
sed '0,/"in_channels": 128/s//"in_channels": 64/' "$AMCT/mixed/decompose_info.json" >"$work/bad_info.json"
expect_fail "information file with wrong in_channels" "layer 'down': in_channels is 64 in the file but 128" \
    $PY scripts/amct_eager.py script "$work/bad" mixed --info "$work/bad_info.json"

echo "selftest: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
