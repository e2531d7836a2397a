#!/usr/bin/env bash
# VGG16 bf16 training on one GPU: vggjax against PyTorch's best configuration, side by side, one table.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine: batch 128 and 256 at 224, about 5 minutes
#   bash benchmarks/gpu.sh --memory        # then also remat's cost and the largest batch (about 4 more)
#   bash benchmarks/gpu.sh --smoke         # the same path on a CPU with a tiny net (a few minutes)
#   bash benchmarks/gpu.sh --fetch-wheels  # on a machine with PyPI: the wheels the GPU machine lacks
#
# Results (JSON lines, the log, summary.md/.json) go to $OUT if set, else RESULTS_DIR, else runs/gpu-DATE.
# Phases, each in its own process (peak memory is per process), in this order:
#   1. vggjax: train step at batch 128 and 256, dense eval at 384 (batch 128)   -> vggjax.jsonl
#   2. PyTorch eager (bf16 autocast, channels_last, cudnn.benchmark, fused SGD) -> torch.jsonl
#   3. PyTorch torch.compile, same settings                                     -> torch.jsonl
#   4. (--memory) vggjax with remat at 256; the largest per-device batch without and with remat, found
#      from compiled memory analysis and checked by running it                 -> memory.jsonl
# A phase that would overrun BUDGET_S (default 285 s for 1-3, +240 s with --memory) is skipped, and one
# that fails does not stop the others; the table shows what ran.
#
# Nothing is fetched on the GPU machine. Its image has jax (CUDA), flax, optax, orbax, chex and torch but
# not ml_collections, which vggjax.train imports. Where `import ml_collections` fails, the script installs
# the wheels in .whl/ with pip --no-index into a temporary directory. Fetch them first, on a machine with
# PyPI, from the repository root (.whl/ is git-ignored; carry it with the working tree):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
# (that is what --fetch-wheels runs; ml_collections needs absl-py and PyYAML, which the image has).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=gpu
MEMORY=0
for arg in "$@"; do
  case "$arg" in
    --smoke) MODE=smoke ;;
    --memory) MEMORY=1 ;;
    --fetch-wheels)
      exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

R=${OUT:-${RESULTS_DIR:-runs/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$R"
LOG="$R/log.txt"
: >"$LOG"
BUDGET_S=${BUDGET_S:-285}
if [ "$MEMORY" = 1 ]; then BUDGET_S=$((BUDGET_S + 240)); fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A second run on the same machine reuses compiled executables (compile_s then reads as cache loads).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/vggjax-jax-cache}

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/vggjax-site .whl/*.whl || exit 3
    export PYTHONPATH="$PYTHONPATH:/tmp/vggjax-site"
  else
    echo "ml_collections is missing and .whl/ has no wheels: run 'bash benchmarks/gpu.sh --fetch-wheels'" \
      "where PyPI is reachable and carry .whl/ (see the top of this script)" >&2
    exit 3
  fi
fi

if [ "$MODE" = smoke ]; then
  # A tiny net on the CPU: the same commands, in seconds.
  NET=(--model=vgg11 --width=0.0625 --fc-features=64 --num-classes=10 --image-size=32 --dtype=bfloat16)
  B1=8; B2=16; EVAL=(--eval-size=64 --eval-batch=8); STEPS=(--steps=3 --repeats=2 --warmup=1)
  TORCH_DEV=(--device=cpu); MEM=(--memory-limit-gb=0.05); BUDGET_S=$((BUDGET_S + 300))
else
  NET=(--model=vgg16 --image-size=224 --dtype=bfloat16)
  B1=128; B2=256; EVAL=(--eval-size=384 --eval-batch=128); STEPS=(--steps=10 --repeats=3 --warmup=2)
  TORCH_DEV=(--device=cuda); MEM=()
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv,noheader
  "$PY" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())' 2>&1
  JAX_PLATFORMS=cpu "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1
} | tee "$R/env.txt"

START=$SECONDS
# phase NAME OUTPUT_FILE MIN_SECONDS COMMAND...: runs COMMAND (stdout: JSON lines) if MIN_SECONDS remain.
phase() {
  local name=$1 out=$2 need=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: skipped ($left s of the budget left, needs about $need)" | tee -a "$LOG"
    return
  fi
  echo "== $name ($left s left)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$left" "$@" >>"$R/$out" 2> >(tee -a "$LOG" >&2)
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

phase "vggjax train $B1,$B2 + dense eval" vggjax.jsonl 60 \
  "$PY" -m vggjax.benchmark "${NET[@]}" --batch=$B1,$B2 "${EVAL[@]}" "${STEPS[@]}" --json
phase "PyTorch eager $B1,$B2" torch.jsonl 30 \
  "$PY" benchmarks/torch_reference.py "${NET[@]}" --batch=$B1,$B2 "${STEPS[@]}" "${TORCH_DEV[@]}" --json
phase "PyTorch torch.compile $B1,$B2" torch.jsonl 90 \
  "$PY" benchmarks/torch_reference.py "${NET[@]}" --batch=$B1,$B2 "${STEPS[@]}" "${TORCH_DEV[@]}" --compile --json
if [ "$MEMORY" = 1 ]; then
  phase "vggjax remat $B2" memory.jsonl 60 \
    "$PY" -m vggjax.benchmark "${NET[@]}" --batch=$B2 --remat --eval-size=0 "${STEPS[@]}" --json
  # The largest batch with 95% of the GPU's memory given to JAX's allocator (its default is 75%).
  for remat in "" --remat; do
    phase "vggjax largest batch ${remat:-no remat}" memory.jsonl 60 \
      env XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95} \
      "$PY" -m vggjax.benchmark "${NET[@]}" $remat --max-batch --verify ${MEM[@]+"${MEM[@]}"} --json
  done
fi
echo "== total $((SECONDS - START)) s" | tee -a "$LOG"
echo
"$PY" benchmarks/summarize.py "$R"
echo
echo "results: $R"
