#!/usr/bin/env bash
# On a machine with CUDA: the device self-test, the exactness tests (pytest -m device), one block eager
# against torch.compile (bench_block.py), then bench_step.py on a 7B-shaped model with bf16 compute, from
# disk (--ram-budget 0) and from host RAM (--ram-budget none), within 8 minutes.
# Every result goes to one folder (default: gpu_check-<date>):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# "7B-shaped": Llama 2 7B's block (dim 4096, 32 heads, FFN 11008) and a small vocabulary, with
# LAYERS blocks (default 8, 1.6B parameters) so that generating, preparing and three steps fit the
# time; LAYERS=32 is the full depth when there is more time. PYTHON picks the interpreter; DEVICE, DIM,
# HEADS, SEQ and THREADS shrink it for a smoke run on a cpu (DEVICE=cpu DIM=64 HEADS=4 LAYERS=2 SEQ=16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
LAYERS=${LAYERS:-8}
DEVICE=${DEVICE:-cuda}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-480} ))
mkdir -p "$OUT"
left() { echo $(( DEADLINE - $(date +%s) )); }

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  df -h . | tail -1; free -g | sed -n 2p; nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
echo "== self-test"
timeout "$(left)" "$PY" -m slowllama.cli.selftest --device "$DEVICE" --out "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# The exactness tests (streamed steps against whole-model autograd, bit for bit) on the device, in
# deterministic mode on cuda (conftest.py); needs pytest. At most 2 minutes, so the benchmarks keep theirs.
t=$(left); [ "$t" -gt 120 ] && t=120
echo "== exactness tests on $DEVICE"
SLOWLLAMA_TEST_DEVICE="$DEVICE" timeout "$t" "$PY" -m pytest -q -m device -p no:cacheprovider \
  --junitxml "$OUT/exactness.xml" 2>&1 | tee "$OUT/exactness.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# One 7B block's forward and backward, eager against torch.compile (figures only: a compiled block that is not
# bit-identical stays out of training). At most 90 s, compilation included.
t=$(left); [ "$t" -gt 90 ] && t=90
echo "== bench_block, eager and compiled"
timeout "$t" "$PY" benchmarks/bench_block.py --dim "${DIM:-4096}" --n-heads "${HEADS:-32}" --batch 2 --seq "${SEQ:-512}" \
  --dtype bfloat16 --device "$DEVICE" --compile > "$OUT/bench_block.json" 2> "$OUT/bench_block.err" || status=1
tail -c 1200 "$OUT/bench_block.json"; echo

SHAPE=(--dim "${DIM:-4096}" --n-layers "$LAYERS" --n-heads "${HEADS:-32}" --multiple-of 256 --vocab-size 320
       --batch 4 --seq "${SEQ:-512}" --micro-batch 2 --steps 2 --compute-dtype bfloat16 --ckpt-dtype bfloat16
       --device "$DEVICE" --threads "${THREADS:-8}")
for variant in disk:0 host:none; do
  name=${variant%%:*}; budget=${variant#*:}
  extra=(); [ "$name" = host ] && extra=(--skip-in-memory)  # the in-memory reference does not depend on the budget
  t=$(left)
  if [ "$t" -lt 60 ]; then echo "skipped: under a minute left" > "$OUT/bench_$name.json.err"; status=1; continue; fi
  echo "== bench_step, modules from $name (--ram-budget $budget), ${t} s left"
  timeout "$t" "$PY" benchmarks/bench_step.py "${SHAPE[@]}" --ram-budget "$budget" "${extra[@]}" \
    > "$OUT/bench_$name.json" 2> "$OUT/bench_$name.err" || status=1
  tail -c 2000 "$OUT/bench_$name.json"; echo
done
echo "results in $OUT (status $status, $(( $(date +%s) - DEADLINE + ${BUDGET_S:-480} )) s)"
exit $status
