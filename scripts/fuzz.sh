#!/usr/bin/env bash
# Fuzz one target of package decompose and print a summary at the end:
# the target, the number of executions, the wall-clock duration and any
# failing input that Go wrote to decompose/testdata/fuzz/TARGET/.
#
# Usage: scripts/fuzz.sh [DURATION] [TARGET]
#   DURATION  a go test -fuzztime value such as 10m, 90s or 100000x (default 10m)
#   TARGET    the fuzz test to run (default FuzzParseInfo; FuzzNetworkInfo also exists)
#
# One fuzzing worker runs (-parallel 1), so the rest of the machine stays usable.
# The execution count stops growing while Go minimizes a new interesting input,
# for at most 10 s each here (go test's default is 60 s). The exit status is
# that of go test: 0 when no failing input was found.
set -uo pipefail
cd "$(dirname "$0")/.."

duration=${1:-10m}
target=${2:-FuzzParseInfo}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

start=$(date +%s)
go test -run '^$' -fuzz "^${target}\$" -fuzztime "$duration" -fuzzminimizetime 10s -parallel 1 ./decompose/ 2>&1 |
	tee "$log"
status=${PIPESTATUS[0]}
end=$(date +%s)

# go test prints progress lines such as
#   fuzz: elapsed: 3m0s, execs: 1234567 (6858/sec), new interesting: 2 (total: 40)
last=$(grep -E '^fuzz: elapsed: .*execs: [0-9]+' "$log" | tail -n 1)
execs=$(sed -E 's/.*execs: ([0-9]+).*/\1/' <<<"$last")
elapsed=$(sed -E 's/^fuzz: elapsed: ([^,]+),.*/\1/' <<<"$last")
failing=$(grep -E 'Failing input written to' "$log" | sed -E 's/.*written to //')

echo
echo "target:     $target"
echo "executions: ${execs:-unknown} (fuzzing time ${elapsed:-unknown})"
echo "duration:   $((end - start)) s wall clock, including the build"
if [ -n "$failing" ]; then
	echo "failing input: decompose/$failing"
else
	echo "failing input: none"
fi
exit "$status"
