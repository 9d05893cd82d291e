#!/usr/bin/env bash
# The whole two-stage LDM pipeline on the embedded digits data, on CPU:
#   stage 1 (KL-f4 autoencoder) -> precompute latents -> stage 2 (latent UNet) -> DDIM samples
#   with classifier-free guidance -> evaluation of both stages.
#   bash launch/digits_pipeline.sh [class|text|layout|sr|inpaint|semantic]     (default: class)
# class:  class-conditional (configs/ldm_digits.py); samples/digits/grid.png, column k = digit k.
# text:   text-to-image (configs/ldm_digits_text.py), prompts such as "a handwritten seven";
#         the evaluation reports how often the digit a prompt names is drawn (guidance 1, 2, 4;
#         training and held-out phrasings).
# layout: layout-to-image (configs/ldm_digits_layout.py) on 64 px canvases of 2-3 digits in
#         boxes; the evaluation reports per-box accuracy and the intensity outside the boxes.
# sr:       4x super-resolution (configs/ldm_digits_sr.py) of the native 8x8 digits to 32 px;
#           the evaluation reports PSNR/SSIM/feature distance against plain bicubic, the
#           classifier's accuracy and 2x2 mosaics (16x16 -> 64x64, convolutional sampling).
# inpaint:  inpainting (configs/ldm_digits_inpaint.py); evaluated with the left or right half
#           masked (accuracy of the filled digit per mask).
# semantic: semantic synthesis (configs/ldm_digits_semantic.py) from digit label maps;
#           evaluated by the classifier and the foreground IoU with the map.
# Every step resumes (or is skipped) if rerun; the three tasks share the stage-1 run.
# Outputs: runs/ae_kl_f4_digits, data/digits*_kl_f4_latents, runs/ldm_digits[_text|_layout],
# samples/digits[_text|_layout]/grid.png and the reports runs/*/eval/<step>.json (FID, IS,
# precision/recall and the condition accuracies; features of a CNN trained on the digits, since
# no Inception weights can be downloaded here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
t0=$(date +%s)
$PY -m ldm_jax.train --config=configs/autoencoder_kl_f4_digits.py --workdir=runs/ae_kl_f4_digits
t1=$(date +%s)
TASK=${1:-class}
case "$TASK" in
  class)  CONFIG=configs/ldm_digits.py; NAME=ldm_digits; LATENTS=data/digits_kl_f4_latents
          SAMPLE_ARGS=("--labels=0,1,2,3,4,5,6,7,8,9"); OUT=samples/digits ;;
  text)   CONFIG=configs/ldm_digits_text.py; NAME=ldm_digits_text; LATENTS=data/digits_text_kl_f4_latents
          SAMPLE_ARGS=(--prompt="a handwritten zero" --prompt="the digit 1" --prompt="number two"
                       --prompt="a picture of a 3" --prompt="four" --prompt="digit five"
                       --prompt="a six written by hand" --prompt="an image of the number seven"
                       --prompt="the digit 8" --prompt="a handwritten nine"); OUT=samples/digits_text ;;
  layout) CONFIG=configs/ldm_digits_layout.py; NAME=ldm_digits_layout; LATENTS=data/digits_layout_kl_f4_latents
          SAMPLE_ARGS=("--layout=7:0.05,0.05,0.45,0.45;3:0.55,0.5,0.95,0.9"
                       "--layout=1:0.1,0.5,0.45,0.95;0:0.5,0.05,0.9,0.45;4:0.55,0.55,0.95,0.95"
                       "--layout=2:0.3,0.3,0.7,0.7" "--layout=8:0.05,0.3,0.45,0.7;9:0.55,0.3,0.95,0.7");
          OUT=samples/digits_layout ;;
  sr|inpaint|semantic)
          CONFIG=configs/ldm_digits_$TASK.py; NAME=ldm_digits_$TASK
          LATENTS=data/digits_${TASK}_kl_f4_latents; OUT=samples/digits_$TASK
          SAMPLE_ARGS=(--input="$OUT/inputs.npz"); NUM=16
          if [ "$TASK" = inpaint ]; then SAMPLE_ARGS+=(--mask="$OUT/inputs.npz"); fi ;;
  *) echo "usage: bash launch/digits_pipeline.sh [class|text|layout|sr|inpaint|semantic]" >&2; exit 2 ;;
esac
$PY -m ldm_jax.precompute_latents --config="$CONFIG" --first_stage=runs/ae_kl_f4_digits --output="$LATENTS"
t2=$(date +%s)
$PY -m ldm_jax.train --config="$CONFIG" --workdir="runs/$NAME"
t3=$(date +%s)
case "$TASK" in  # image tasks sample from held-out inputs
  sr|inpaint|semantic) mkdir -p "$OUT"
    $PY -m ldm_jax.evaluation.image_tasks --workdir="runs/$NAME" --out="$OUT/inputs.npz" --num=16 ;;
esac
$PY -m ldm_jax.sample --workdir="runs/$NAME" --num="${NUM:-100}" "${SAMPLE_ARGS[@]}" --sampler=ddim --steps=50 \
    --out="$OUT"
t4=$(date +%s)
$PY -m ldm_jax.evaluate --workdir=runs/ae_kl_f4_digits --features=digits
$PY -m ldm_jax.evaluate --workdir="runs/$NAME" --features=digits --sampler=ddim --steps=50
t5=$(date +%s)
echo "wall time: stage 1 $((t1-t0))s | precompute $((t2-t1))s | stage 2 $((t3-t2))s | sampling $((t4-t3))s | evaluation $((t5-t4))s | total $((t5-t0))s"
echo "sample grid: $OUT/grid.png"
