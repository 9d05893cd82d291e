#!/usr/bin/env bash
# The accelerator rows of the performance suite, in one call on one GPU (docs/performance.md,
# "On a GPU"): ldm_jax against the PyTorch reference in the same process on the same device.
#   1. unet_bf16    stage-2 train step, configs/f4_celebahq.py at the paper's size (width 224,
#                   batch 48, 64x64x3 latents), bfloat16 compute over float32 weights on both
#                   sides (torch: autocast), MFU against a bf16 8192^3 matmul measured in the run
#   2. sample_bf16  DDIM-50 sampling of that UNet, same weights on both sides
#   3. profile_bf16 where that step's time goes on the device: kernel time per op kind (cuDNN
#                   convolution forward / input / weight gradient, GEMMs, attention, fusions)
#                   and per UNet block, and the device's idle share (bench/profile_step.py);
#                   the trace is kept ($OUT/profile_trace.json.gz) for --from_trace
#   4. unet_compile the stage-2 step against torch.compile (its compile takes minutes)
#   5. ae_bf16      stage-1 KL-f4 + LPIPS + PatchGAN step at ch 128, 256x256, batch 8
# Each part runs in its own process under a time limit; a part that does not fit in what is
# left of BUDGET_S is skipped and says so. On an H200 (2026-12-04) part 1 took 220-250 s (the
# jax step compiles in about 100 s, torch's first eager step with cudnn.benchmark about 40 s),
# part 2 about 100 s, part 3 about 150 s and part 5 about 150 s; torch.compile (part 4) needs
# more than the 105 s it had there. The parts' limits add up to about 20 minutes, more than the
# default BUDGET_S=900; a lent device call of at most 10 minutes needs BUDGET_S=540 or less.
# PARTS picks the parts and their order, e.g. PARTS=unet_compile for the row no H200 run has
# measured yet. Logs and JSON go to $OUT (default bench/results/accelerator).
# `bash bench/accelerator_suite.sh smoke` runs the same parts at toy sizes (on CPU too) to check
# the script itself. Exit status 1 when a part that ran failed (a skipped part is not a
# failure), 2 on a bad variant, part name or OUT.
#
# Usage: [OUT=dir] [BUDGET_S=900] [PARTS="unet_bf16 ..."] [TORCH_MODES=eager,eager_cl]
#        [PYTHON=python3]
#        bash bench/accelerator_suite.sh [paper|smoke]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
variant=${1:-paper}
OUT=${OUT:-bench/results/accelerator}
mkdir -p "$OUT" || { echo "cannot create OUT=$OUT: set OUT to a writable folder" >&2; exit 2; }
BUDGET_S=${BUDGET_S:-900}
# The eager PyTorch rows of the train-step parts (channels_last was the slower one on an H200).
TORCH_MODES=${TORCH_MODES:-eager,eager_cl}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX and torch share the device in one process: JAX takes half up front, torch the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}

case "$variant" in
  paper) W=224 B=48 S=64 AE_CH=128 AE_S=256 AE_B=8 STEPS=20 SAMPLE_STEPS=3 PROFILE_STEPS=3 ;;
  smoke) W=32 B=2 S=16 AE_CH=32 AE_S=32 AE_B=2 STEPS=2 SAMPLE_STEPS=1 PROFILE_STEPS=1 ;;
  *) echo "unknown variant '$variant': use paper or smoke" >&2; exit 2 ;;
esac
ALL_PARTS="unet_bf16 sample_bf16 profile_bf16 unet_compile ae_bf16"
PARTS=${PARTS:-$ALL_PARTS}
for name in $PARTS; do
  [[ " $ALL_PARTS " == *" $name "* ]] || {
    echo "unknown part '$name' in PARTS: use some of: $ALL_PARTS" >&2; exit 2; }
done

part() {  # part NAME LIMIT_S SCRIPT ARGS...: run one bench under min(LIMIT_S, time left)
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS))
  shift 2
  if (( left < limit / 2 )); then
    echo "[$name skipped: ${left}s of the budget left, it needs about ${limit}s]"
    return
  fi
  (( limit > left )) && limit=$left
  echo "[$name: limit ${limit}s, started at ${SECONDS}s]"
  timeout "$limit" "$PY" "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^\[' "$OUT/$name.log" | tail -n 30
  echo "[$name: exit $rc at ${SECONDS}s]"
  (( rc == 0 )) || failed+=("$name (exit $rc)")
}
failed=()

"$PY" - <<'EOF' 2>&1
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "ml_collections"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # report and go on: the parts say what they miss
        print(name, "missing:", type(e).__name__, e)
import jax
print("jax devices:", jax.devices())
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv

run_part() {  # the parts by name, in the order PARTS gives
  case "$1" in
    unet_bf16) part unet_bf16 260 bench/train_step.py --parts unet --width "$W" --batch "$B" \
      --size "$S" --channels 3 --dtype bfloat16 --steps "$STEPS" --warmup 3 \
      --torch_modes "$TORCH_MODES" --skip_model_row ;;
    sample_bf16) part sample_bf16 150 bench/sample.py --width "$W" --batch "$B" --size "$S" \
      --channels 3 --dtype bfloat16 --ddim_steps 50 --steps "$SAMPLE_STEPS" --warmup 1 \
      --torch_modes eager --skip_generate ;;
    profile_bf16) part profile_bf16 200 bench/profile_step.py --width "$W" --batch "$B" \
      --size "$S" --channels 3 --dtype bfloat16 --steps "$PROFILE_STEPS" --warmup 2 \
      --ops ALL --top 25 --save_trace "$OUT/profile_trace.json.gz" ;;
    unet_compile) part unet_compile 300 bench/train_step.py --parts unet --width "$W" \
      --batch "$B" --size "$S" --channels 3 --dtype bfloat16 --steps "$STEPS" --warmup 3 \
      --torch_modes compile --skip_model_row ;;
    ae_bf16) part ae_bf16 250 bench/train_step.py --parts ae --ae_ch "$AE_CH" \
      --ae_size "$AE_S" --ae_batch "$AE_B" --dtype bfloat16 --steps "$STEPS" --warmup 2 \
      --torch_modes "$TORCH_MODES" ;;
  esac
}
for name in $PARTS; do
  run_part "$name"
done
echo "[suite done at ${SECONDS}s of ${BUDGET_S}s]"
if (( ${#failed[@]} )); then
  echo "failed parts: ${failed[*]} (logs in $OUT; exit 124 = ran out of its time limit)" >&2
  exit 1
fi
