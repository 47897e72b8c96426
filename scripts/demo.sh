#!/usr/bin/env bash
# make demo: a throwaway nnU-Net tree whose plans ask for a batch size too large
# for the simulated GPU, on a simulated host with too little memory for 12
# data-augmentation workers; nnguard trains the fold to the end on the
# simulated trainer, so you see the failures, the diagnosis, the adaptation,
# the resume and the summary. Takes well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d "${TMPDIR:-/tmp}/nnguard-demo.XXXXXX")
trap 'rm -rf "$root"' EXIT

python3 sim/mktree.py "$root" --dataset-id 4 --dataset-name Hippocampus --batch-size 8 >/dev/null
export nnUNet_raw="$root/nnUNet_raw" nnUNet_preprocessed="$root/nnUNet_preprocessed" nnUNet_results="$root/nnUNet_results"

# the simulated machine: a 8 GiB GPU (2 GB model + 1 GB per sample: batch 8
# does not fit, 4 does) and a 4 GiB host (0.8 GB main + 0.3 GB per worker:
# 12+6 workers do not fit, 6+3 do).
export nnUNet_n_proc_DA=12
export NNGUARD_SIM_EPOCHS=8 NNGUARD_SIM_EPOCH_SECONDS=0.4 NNGUARD_SIM_SAVE_EVERY=2
export NNGUARD_SIM_GPU_MIB=8192 NNGUARD_SIM_BASE_MIB=2000 NNGUARD_SIM_SAMPLE_MIB=1000 NNGUARD_SIM_OOM_FROM_EPOCH=3
export NNGUARD_SIM_HOST_MIB=4096 NNGUARD_SIM_MAIN_MIB=800 NNGUARD_SIM_WORKER_MIB=300 NNGUARD_SIM_HOST_OOM_FROM_EPOCH=1
export NNGUARD_SIM_VAL_CASES=4 NNGUARD_SIM_MAX_POOL=2

set +e
./bin/nnguard train --trainer-cmd "python3 sim/nnunetv2_train.py" --backoff 1s --grace 5s \
  4 3d_fullres 0
code=$?
set -e
fold="$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0"
echo
echo "==== nnguard exited $code; what it recorded in $fold/nnguard ===="
python3 - "$fold/nnguard/events.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    ev = e["event"]
    if ev == "attempt_start":
        print(f'attempt {e["attempt"]}: batch_size={e["batch_size"]} n_proc_da={e["n_proc_da"]} plans={e["plans_identifier"]} resume_from={e.get("resume_from") or "-"} (epoch {e.get("resume_epoch", 0)}, lost {e.get("lost_epochs", 0)})')
    elif ev == "failure":
        print(f'  failure: {e["class"]}: {e["reason"]}')
    elif ev == "action":
        print(f'  action:  {e["kind"]} {e.get("from","")} -> {e.get("to","")}')
    elif ev == "run_end":
        print(f'run_end: {e["outcome"]} (exit {e["exit_code"]}) after {e["attempts"]} attempt(s)')
PY
echo "fold contents:"; ls "$fold"
exit $code
