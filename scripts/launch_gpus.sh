#!/usr/bin/env bash
# One `evomerge search` worker per local GPU, all on one study (Optuna's distributed mode).
#
#   scripts/launch_gpus.sh SPACE.yaml [extra `evomerge search` options...]
#
# Every worker runs the same command with CUDA_VISIBLE_DEVICES set to its own GPU; they share
# results/<study>/study.db (SQLite; heartbeats re-queue the trial of a worker that dies) and the
# --n-trials budget is met exactly across them. For many hosts pass --storage postgresql://...
# Logs: results/<study>/worker-<gpu>.log. Ctrl-C stops every worker (each marks its running
# trial FAIL, not counted toward the budget); re-running the script resumes the study.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SPACE.yaml [evomerge search options...]" >&2
  exit 2
fi
space="$1"; shift
n_gpus="${N_GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}"
if [[ "$n_gpus" -lt 1 ]]; then
  echo "no GPU found (nvidia-smi); set N_GPUS to override" >&2
  exit 1
fi
study="$(basename "${space%.*}")"
SEED="${SEED:-0}"  # worker k uses seed SEED + k (do not pass --seed yourself)
for ((i = 0; i < $#; i++)); do  # honour --study NAME for the log folder
  args=("$@")
  if [[ "${args[$i]}" == "--study" ]]; then study="${args[$((i + 1))]}"; fi
done
mkdir -p "results/$study"
pids=()
trap 'kill -INT "${pids[@]}" 2>/dev/null; wait' INT TERM
for ((gpu = 0; gpu < n_gpus; gpu++)); do
  # its own seed per worker, or every worker would propose the same random start-up trials
  CUDA_VISIBLE_DEVICES="$gpu" evomerge search "$space" --device cuda --seed "$((SEED + gpu))" "$@" \
    >"results/$study/worker-$gpu.log" 2>&1 &
  pids+=("$!")
  sleep 2  # let the first worker create the study and enqueue the baselines
done
echo "started ${#pids[@]} workers on study '$study' (logs in results/$study/)"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
evomerge status "results/$study" --top 10 || true
exit "$status"
