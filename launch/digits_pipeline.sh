#!/usr/bin/env bash
# The whole two-stage LDM pipeline on the embedded digits data, on CPU:
#   stage 1 (KL-f4 autoencoder) -> precompute latents -> stage 2 (class-conditional latent UNet)
#   -> DDIM samples with classifier-free guidance -> evaluation of both stages.
# Every step resumes if rerun. Outputs: runs/ae_kl_f4_digits, data/digits_kl_f4_latents,
# runs/ldm_digits, samples/digits/grid.png (column k holds samples of digit k), and the reports
# runs/ae_kl_f4_digits/eval/<step>.json (PSNR, SSIM, rFID) and runs/ldm_digits/eval/<step>.json
# (FID, IS, precision/recall, class accuracy; features of a CNN trained on the digits, since
# no Inception weights can be downloaded here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
t0=$(date +%s)
$PY -m ldm_jax.train --config=configs/autoencoder_kl_f4_digits.py --workdir=runs/ae_kl_f4_digits
t1=$(date +%s)
$PY -m ldm_jax.precompute_latents --config=configs/ldm_digits.py --first_stage=runs/ae_kl_f4_digits \
    --output=data/digits_kl_f4_latents
t2=$(date +%s)
$PY -m ldm_jax.train --config=configs/ldm_digits.py --workdir=runs/ldm_digits
t3=$(date +%s)
$PY -m ldm_jax.sample --workdir=runs/ldm_digits --num=100 --labels=0,1,2,3,4,5,6,7,8,9 \
    --sampler=ddim --steps=50 --out=samples/digits
t4=$(date +%s)
$PY -m ldm_jax.evaluate --workdir=runs/ae_kl_f4_digits --features=digits
$PY -m ldm_jax.evaluate --workdir=runs/ldm_digits --features=digits --sampler=ddim --steps=50
t5=$(date +%s)
echo "wall time: stage 1 $((t1-t0))s | precompute $((t2-t1))s | stage 2 $((t3-t2))s | sampling $((t4-t3))s | evaluation $((t5-t4))s | total $((t5-t0))s"
echo "sample grid: samples/digits/grid.png"
