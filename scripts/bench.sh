#!/usr/bin/env bash
# make bench: Go benchmarks, then nnguard's whole-program costs as ratios
# against a baseline run side by side on the same input:
#   nnguard classify FILE   vs  grep -F -f logparse/patterns.txt FILE
#   the pty relay (supervisor.BenchmarkRelay) vs script(1) relaying the same bytes
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/nnguard-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== go benchmarks"
go test -run '^$' -bench . -benchmem -count 1 ./logparse ./nvml ./supervisor | grep -E '^(Benchmark|ok|PASS)' || true

echo
echo "== classify vs grep -F -f (same 64 MiB log, best of 3 wall times)"
log="$work/bench.log"
NNGUARD_BENCH_LOG="$log" go test -count=1 -run '^TestWriteBenchLog$' ./logparse >/dev/null
size=$(stat -c %s "$log")
best() { # best wall time in seconds of 3 runs of "$@"
  local b=""
  for _ in 1 2 3; do
    local s e
    s=$(date +%s%N); "$@" >"$work/out"; e=$(date +%s%N)  # not /dev/null: GNU grep stops at the first match when it sees /dev/null
    local d=$(( e - s ))
    if [ -z "$b" ] || [ "$d" -lt "$b" ]; then b=$d; fi
  done
  echo "$b"
}
g=$(best grep -F -c -f logparse/patterns.txt "$log" || true)
gi=$(best grep -F -i -c -f logparse/patterns.txt "$log" || true)
c=$(best ./bin/nnguard classify "$log")
awk -v s="$size" -v g="$g" -v gi="$gi" -v c="$c" 'BEGIN {
  printf "file:                 %.1f MiB\n", s/1048576
  printf "grep -F -f:           %.3f s  %6.0f MB/s\n", g/1e9, s/(g/1e9)/1e6
  printf "grep -F -i -f:        %.3f s  %6.0f MB/s\n", gi/1e9, s/(gi/1e9)/1e6
  printf "nnguard classify:     %.3f s  %6.0f MB/s  (case-insensitive, all classes)\n", c/1e9, s/(c/1e9)/1e6
  printf "ratio classify/grep -F:    %.2fx the time\n", c/g
  printf "ratio classify/grep -F -i: %.2fx the time\n", c/gi
}'

echo
echo "== pty relay vs script(1) (same 16 MiB of trainer output)"
rlog="$work/relay.log"
ns=$(NNGUARD_BENCH_RELAY_LOG="$rlog" go test -run '^$' -bench '^BenchmarkRelay$' -benchtime 5x ./supervisor | awk '/^BenchmarkRelay/ {print $3}')
s=$(best script -q -c "cat $rlog" "$work/typescript")
rsize=$(stat -c %s "$rlog")
awk -v s="$rsize" -v n="$ns" -v t="$s" 'BEGIN {
  printf "script -q -c cat (typescript file):          %.3f s  %6.1f MB/s\n", t/1e9, s/(t/1e9)/1e6
  printf "nnguard relay (console.log + parse):         %.3f s  %6.1f MB/s\n", n/1e9, s/(n/1e9)/1e6
  printf "ratio nnguard/script: %.2fx the time\n", n/t
}'
