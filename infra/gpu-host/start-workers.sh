#!/usr/bin/env bash
# Start the GPU workers of one host: one Prefect process worker per GPU on the `gpu` work pool.
#
#   infra/gpu-host/start-workers.sh [N]
#
# Worker i runs with CUDA_VISIBLE_DEVICES=<i-th GPU id> and --limit MODELFACTORY_GPU_SLOTS (default 1),
# so it holds exactly one GPU and runs at most that many flow runs on it at a time; further runs wait in
# the pool's queue. Slots > 1 let sweep members share a GPU (one quantizes while another is benchmarked);
# choose them from measured memory (docs/gpu-pool.md, "Slots"); a timed decode still has the GPU alone. N defaults
# to the number of GPUs `nvidia-smi -L` lists; MODELFACTORY_GPU_IDS="2,3" picks the GPUs instead.
#
# Environment (the flow runs inherit it; see infra/README.md):
#   PREFECT_API_URL                    the Prefect server (required)
#   MODELFACTORY_STAGE_STORE_URL       s3://bucket/prefix shared with the factory: step outputs move
#                                      through it (plus MODELFACTORY_S3_ENDPOINT_URL / AWS credentials);
#                                      then MODELFACTORY_HOME / _WORK_DIR / _CACHE_DIR are this host's own.
#                                      Unset: MODELFACTORY_WORK_DIR must be the factory's (shared volume)
#   MODELFACTORY_DATA_DIR              local dataset copies (calibration / perplexity text)
#   MODELFACTORY_SOURCE_DIR            checkout the flow code runs from (default: this one)
#   PREFECT_FLOWS_HEARTBEAT_FREQUENCY  flow-run heartbeat seconds (default 30; the zombie-run
#                                      automation marks a run Crashed after --zombie-after, 90 s)
#   MODELFACTORY_GPU_SLOTS             flow runs per GPU at once (default 1; docs/gpu-pool.md, "Slots")
#   GPU_POOL (gpu), PREFECT (the prefect executable), MODELFACTORY (the modelfactory executable), WORKER_LOG_DIR (unset: stdout)
#   MODELFACTORY_PREPARE_KERNELS       1 (default): build GPTQModel's CUDA kernels into MODELFACTORY_CACHE_DIR
#                                      first (`modelfactory kernels prepare`; minutes once per cache, seconds
#                                      after), so no flow run pays them; 0 skips it. A kernel that cannot be
#                                      built (e.g. Machete offline without GPTQMODEL_CUTLASS_DIR) is reported,
#                                      and the workers start anyway: the factory then verifies another kernel.
#
# Runs in the foreground (systemd: Type=simple, Restart=always). SIGTERM/SIGINT stop every
# worker; if one worker exits, the others are stopped too and the script exits with its code.
set -euo pipefail
set -m  # each worker in its own process group: signals reach the worker itself, not via the shell

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
POOL="${GPU_POOL:-gpu}"
SLOTS="${MODELFACTORY_GPU_SLOTS:-1}"
if [[ -z "${PREFECT:-}" ]]; then
  PREFECT="$(command -v prefect || true)"
  [[ -n "$PREFECT" ]] || PREFECT="$ROOT/.venv/bin/prefect"
fi
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://prefect:4200/api}"
export PREFECT_API_URL
export MODELFACTORY_SOURCE_DIR="${MODELFACTORY_SOURCE_DIR:-$ROOT}"
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

if [[ -n "${MODELFACTORY_GPU_IDS:-}" ]]; then
  IFS=',' read -r -a GPUS <<< "$MODELFACTORY_GPU_IDS"
else
  N="${1:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}"
  if ! [[ "$N" =~ ^[0-9]+$ ]] || (( N < 1 )); then
    echo "start-workers.sh: no GPUs found (nvidia-smi -L): pass the number of workers, e.g. $0 4" >&2
    exit 2
  fi
  GPUS=()
  for ((i = 0; i < N; i++)); do GPUS+=("$i"); done
fi

if [[ "${MODELFACTORY_PREPARE_KERNELS:-1}" == 1 ]]; then
  MODELFACTORY="${MODELFACTORY:-$(command -v modelfactory || echo "$ROOT/.venv/bin/modelfactory")}"
  CUDA_VISIBLE_DEVICES="${GPUS[0]}" "$MODELFACTORY" kernels prepare \
    || echo "start-workers.sh: some GPTQ kernels are not prebuilt (see above); starting the workers anyway" >&2
fi

HOST="$(hostname -s 2>/dev/null || hostname)"
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all; wait; exit 143' TERM INT

for gpu in "${GPUS[@]}"; do
  name="gpu-$HOST-$gpu"
  cmd=(env CUDA_VISIBLE_DEVICES="$gpu" "$PREFECT" --no-prompt worker start --pool "$POOL" --type process
       --limit "$SLOTS" --name "$name")
  echo "start-workers.sh: $name: CUDA_VISIBLE_DEVICES=$gpu ${cmd[*]:2}"
  if [[ -n "${WORKER_LOG_DIR:-}" ]]; then
    mkdir -p "$WORKER_LOG_DIR"
    "${cmd[@]}" >> "$WORKER_LOG_DIR/$name.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  PIDS+=("$!")
done
echo "start-workers.sh: ${#PIDS[@]} worker(s) on pool '$POOL' -> $PREFECT_API_URL (pids ${PIDS[*]})"

set +e
wait -n
code=$?
echo "start-workers.sh: a worker exited with code $code: stopping the others" >&2
stop_all
wait
exit "$code"
