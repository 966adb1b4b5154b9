#!/usr/bin/env bash
# One device call of the quality grid: map the package in place (no install: the GPU image
# has the dependencies but no network), merge the previous calls' runs, run until the time
# limit, then pack the whole output into one file under $OUT (only a few files come back).
#   bash benchmarks/gpu_quality.sh TIME_LIMIT_S [quality.py options...]
# QNAME=NAME names the output (.gpu/NAME, $OUT/NAME.tgz, $OUT/NAME-log.txt; default q), so that two
# grids (e.g. baselines and search ablations) can share the GPU in one call, each with its own WORKERS.
# Expects .gpu/model (the fp16 MiniLM), .gpu/data (GLUE/SuperGLUE files) and, optionally,
# .gpu/prev*.tgz (what earlier calls packed).
set -u
limit=$1; shift
q=${QNAME:-q}
ln -sfn ../search_spaces s3pet/search_spaces
ln -sfn ../tasks s3pet/task_cards
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Every earlier call's pack (.gpu/prev*.tgz: keep one per call, e.g. prev1.tgz, prev2.tgz) and the
# committed runs: a call that forgets one of them would only redo its runs.
merge=()
for f in docs/results/quality/runs.tgz .gpu/prev*.tgz; do [ -f "$f" ] && merge+=(--merge "$f"); done
timeout $((limit + 30)) python3 benchmarks/quality.py --model .gpu/model --data-dir .gpu/data --out ".gpu/$q" \
  --workers "${WORKERS:-14}" --threads 1 --time-limit "$limit" "${merge[@]}" "$@" > "$OUT/$q-log.txt" 2>&1
echo "exit $?"
tail -c 3000 "$OUT/$q-log.txt"
tar czf "$OUT/$q.tgz" -C .gpu "$q"
# A file over 16 MiB does not come back from a device call (--keep-weights can make one): keep the
# results and the checkpoints of cut searches, drop the finished runs' weights, pack again.
if [ "$(stat -c %s "$OUT/$q.tgz")" -gt $((15 * 1024 * 1024)) ]; then
  echo "pack over 15 MiB: dropping the weights of finished runs (delta.safetensors, *.bin, finished searches' search.pt)"
  find ".gpu/$q" \( -name '*.safetensors' -o -name '*.bin' \) -delete
  find ".gpu/$q" -name search.pt -execdir test -f metrics.json \; -delete  # finished searches' only
  tar czf "$OUT/$q.tgz" -C .gpu "$q"
fi
mkdir -p "$OUT/$q" && cp ".gpu/$q/results.md" ".gpu/$q/results.json" ".gpu/$q/quality.png" "$OUT/$q/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv
