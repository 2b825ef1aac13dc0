#!/usr/bin/env bash
# Issue 26's timed path (bench/webhook_sweep.py) on a lent GPU, in as few device calls as its length needs:
#
#   bash bench/webhook_sweep_gpu.sh start [webhook_sweep.py options]   # set up, start it in the background, wait
#   bash bench/webhook_sweep_gpu.sh wait                                # (next call, machine still warm) wait more
#
# Each call waits up to WAIT_S seconds (default 540: a device call may last 600 s), then prints the progress
# lines and copies what exists (the JSON, the logs) to $OUT. The run survives between calls while the machine
# stays warm (started with setsid nohup).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
mode=${1:-start}
root=/root/webhook-sweep
if [[ $mode == start ]]; then
  python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
  mkdir -p /root/keep /root/ws-out && cp -r .gpu/tok32k /root/keep/
  # Then, with LEVERS=default,mse2.4,... set, issue 27's GPU rows on the pushed model (bench/levers_gpu.py).
  setsid nohup bash -c "python3 bench/webhook_sweep.py --root $root --out /root/ws-out ${*:2}; \
    [[ -n '${LEVERS:-}' ]] && python3 bench/levers_gpu.py --model $root/model-v1 --configs '${LEVERS:-}' --out /root/ws-out" \
    > /root/ws.log 2>&1 < /dev/null &
  sleep 5
fi
deadline=$((SECONDS + ${WAIT_S:-540}))
running() { pgrep -f "bench/(webhook_sweep|levers_gpu).py" > /dev/null; }
while (( SECONDS < deadline )) && running; do sleep 10; done
running && echo "== still running" || echo "== finished"
grep -E '^\[|^\{"config|Error|error' /root/ws.log | tail -n 30
echo "== cpu worker"; grep -E 'gpu-stage:|sweep |Finished in state (Failed|Crashed)|Error' "$root/cpu-worker/worker.log" 2>/dev/null | tail -n 25 | cut -c1-320
echo "== gpu worker"; tail -n 15 "$root"/gpu-worker/logs/*.log 2>/dev/null | cut -c1-320
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
mkdir -p "$OUT/logs"
cp /root/ws-out/*.json "$OUT"/ 2>/dev/null
cp /root/ws.log "$OUT/logs/" 2>/dev/null
for f in "$root"/cpu-worker/worker.log "$root"/gpu-worker/logs/*.log "$root"/gpu-worker/start-workers.log; do
  [[ -f $f ]] && tail -c 2000000 "$f" > "$OUT/logs/$(basename "$(dirname "$f")")-$(basename "$f")"
done
true
