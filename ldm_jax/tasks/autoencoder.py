"""Stage 1 task: KL / VQ autoencoder with L1 (+ LPIPS) reconstruction, regulariser and PatchGAN.

The generator (encoder, decoder, 1x1 convs, codebook, learned logvar) and the discriminator are
updated in one jitted step with their own optimisers. Two step variants are compiled before the
loop: 'rec' (before `loss.disc_start`: no discriminator work at all, which is exactly what the
reference computes since its disc_factor is 0 there) and 'gan' (adversarial term with the
adaptive weight, plus the discriminator update).
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config.loading import ConfigError

from ldm_jax.tasks import autoencoder_loss as losses
from ldm_jax.evaluation import image_metrics as metrics
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.train_state import TrainState, all_finite, compute_dtype


def resolve_config(config):
    """A copy of `config` with `model.resolution` taken from `data.image_size` when unset
    (attention levels are named by the nominal feature-map size), checked when set."""
    config = copy.deepcopy(config)
    size, resolution = config.data.image_size, config.model.resolution
    if resolution is None:
        config.model.resolution = int(size)
    elif int(resolution) != int(size):
        raise ConfigError(
            f"config.model.resolution={resolution} differs from config.data.image_size={size}; "
            f"set --config.model.resolution=None to follow the image size, or make them equal.")
    return config


class AutoencoderTask:
    """Builds, steps and evaluates a first-stage autoencoder for the generic train loop."""

    name = "autoencoder"
    input_key = "image"

    def __init__(self, config):
        config = self.config = resolve_config(config)
        self.kind = config.model.kind
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"config.model.kind={self.kind!r}: use 'kl' or 'vq'.")
        if config.loss.disc_loss not in losses.D_LOSSES:
            raise ConfigError(f"config.loss.disc_loss={config.loss.disc_loss!r}: use one of "
                              f"{sorted(losses.D_LOSSES)}.")
        self.dtype = compute_dtype(config.dtype)
        self.model = ae_models.make_first_stage(config.model, self.dtype)
        self.disc = NLayerDiscriminator(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers,
                                        norm=config.loss.disc_norm)
        self.lpips_params = self._load_lpips(config)
        self.gen_opt = make_optimizer(
            config.optimizer, global_batch_size=config.batch_size, total_steps=config.total_steps)
        self.gen_lr = self.gen_opt.schedule
        self.disc_opt = make_optimizer(
            config.optimizer, global_batch_size=config.batch_size, total_steps=config.total_steps,
            multiplier=config.optimizer.disc_lr_mult)

    @staticmethod
    def _load_lpips(config):
        """LPIPS parameters from the public weight files, or None when no perceptual term (and
        no evaluation LPIPS) is wanted; a perceptual weight > 0 without files is an error."""
        loss_cfg = config.loss
        if loss_cfg.perceptual_weight <= 0 and not loss_cfg.lpips_weights:
            return None
        from ldm_jax.models import lpips
        paths = lpips.require_lpips_weights(loss_cfg.lpips_weights or None, "loss.lpips_weights")
        return lpips.load_lpips_params(*paths)

    def constants(self) -> dict:
        """Frozen inputs of the steps (passed as arguments, not baked into the executable)."""
        return {} if self.lpips_params is None else {"lpips": self.lpips_params}

    @staticmethod
    def _lpips(constants, x, y):
        from ldm_jax.models.lpips import LPIPS
        return LPIPS().apply({"params": jax.lax.stop_gradient(constants["lpips"])}, x, y)

    # ----------------------------------------------------------------------------- state
    def phase_for_step(self, step: int) -> str:
        """'gan' from the step the reference's adopt_weight switches the discriminator on."""
        return "gan" if step >= self.config.loss.disc_start else "rec"

    def init_state(self, rng: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
        """Fresh parameters and optimiser states (call under jit with output shardings)."""
        example_images = jnp.zeros(input_shape, jnp.float32)
        k_model, k_sample, k_disc, k_state = jax.random.split(rng, 4)
        variables = self.model.init({"params": k_model, "sample": k_sample, "dropout": k_sample},
                                    example_images)
        disc_params = self.disc.init(k_disc, example_images)["params"]
        gen = {"model": variables["params"],
               "logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32)}
        params = {"generator": gen, "discriminator": disc_params}
        opt_state = {"generator": self.gen_opt.init(gen), "discriminator": self.disc_opt.init(disc_params)}
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt_state,
                          ema_params=None, rng=jax.random.key_data(k_state))

    # ----------------------------------------------------------------------------- losses
    def _nll(self, constants, x, recon, logvar):
        cfg = self.config.loss
        perceptual = self._lpips(constants, x, recon) if (
            "lpips" in constants and cfg.perceptual_weight > 0) else None
        rec = losses.reconstruction_loss(x, recon, pixel_weight=cfg.pixel_weight,
                                         perceptual=perceptual, perceptual_weight=cfg.perceptual_weight)
        nll = losses.kl_nll(rec, logvar) if self.kind == "kl" else losses.vq_nll(rec)
        return nll, jnp.mean(rec)

    def _disc_logits(self, disc_params, images):
        return self.disc.apply({"params": disc_params}, images).astype(jnp.float32)

    def _generator_loss(self, gen_params, disc_params, constants, x, rng, phase):
        cfg = self.config.loss
        k_sample, k_drop = jax.random.split(rng)
        call_kwargs = {"sample_posterior": True} if self.kind == "kl" else {}
        out = self.model.apply({"params": gen_params["model"]}, x, train=True,
                               rngs={"sample": k_sample, "dropout": k_drop}, **call_kwargs)
        recon = out["recon"]
        logvar = gen_params["logvar"] if cfg.learn_logvar else jax.lax.stop_gradient(gen_params["logvar"])
        nll, rec_mean = self._nll(constants, x, recon, logvar)
        reg_weight = cfg.kl_weight if self.kind == "kl" else cfg.codebook_weight
        loss = nll + reg_weight * out["reg_loss"]
        aux = {"nll": nll, "rec_loss": rec_mean, "logvar": gen_params["logvar"]}
        if self.kind == "kl":
            aux["kl"] = out["reg_loss"]
        else:
            aux.update(vq_loss=out["reg_loss"], perplexity=out["perplexity"],
                       code_usage=out["code_usage"])
        if phase == "gan":
            logits_fake = self._disc_logits(disc_params, recon)
            g_loss = losses.generator_adversarial_loss(logits_fake)
            d_weight = self._adaptive_weight(gen_params, disc_params, constants, x,
                                             out["decoder_features"])
            loss = loss + d_weight * cfg.disc_factor * g_loss
            aux.update(g_loss=g_loss, d_weight=d_weight)
        return loss, (aux, recon)

    def _adaptive_weight(self, gen_params, disc_params, constants, x, features):
        """Gradient norms of nll and g_loss w.r.t. the decoder's last conv kernel.

        Only conv_out is re-applied to the (stop-gradient) decoder features, so this costs one
        extra pass through the loss heads, not through the decoder; every input is
        stop-gradient, so the outer gradient sees a constant.
        """
        sg = jax.lax.stop_gradient
        conv_out = sg(gen_params["model"]["decoder"]["conv_out"])
        features, logvar, disc_params = sg(features), sg(gen_params["logvar"]), sg(disc_params)

        def nll_of(conv_params):
            recon = ae_models.apply_decoder_conv_out(conv_params, features, self.dtype)
            return self._nll(constants, x, recon, logvar)[0]

        def g_of(conv_params):
            recon = ae_models.apply_decoder_conv_out(conv_params, features, self.dtype)
            return losses.generator_adversarial_loss(self._disc_logits(disc_params, recon))

        nll_grad = jax.grad(nll_of)(conv_out)["kernel"]
        g_grad = jax.grad(g_of)(conv_out)["kernel"]
        return losses.adaptive_weight(nll_grad, g_grad, disc_weight=self.config.loss.disc_weight,
                                      max_weight=self.config.loss.adaptive_weight_max)

    def _disc_loss(self, disc_params, x, recon):
        logits_real = self._disc_logits(disc_params, x)
        logits_fake = self._disc_logits(disc_params, recon)
        d_loss = self.config.loss.disc_factor * losses.D_LOSSES[self.config.loss.disc_loss](
            logits_real, logits_fake)
        return d_loss, {"logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}

    # ----------------------------------------------------------------------------- steps
    def train_step(self, state: TrainState, batch: dict, constants: dict,
                   phase: str) -> tuple[TrainState, dict]:
        """One generator (+ discriminator in phase 'gan') update. Pure; jitted by the loop."""
        x = batch["image"]
        rng = state.step_rng()
        gen, disc = state.params["generator"], state.params["discriminator"]
        (loss, (aux, recon)), gen_grads = jax.value_and_grad(self._generator_loss, has_aux=True)(
            gen, disc, constants, x, rng, phase)
        new_gen, gen_opt, _, grad_norm = self.gen_opt.step(gen, state.opt_state["generator"],
                                                           gen_grads)
        metrics_out = dict(aux, loss=loss, grad_norm=grad_norm, lr=self.gen_lr(state.step))
        finite = all_finite(loss, grad_norm)
        new_disc, disc_opt = disc, state.opt_state["discriminator"]
        if phase == "gan":
            (d_loss, d_aux), d_grads = jax.value_and_grad(self._disc_loss, has_aux=True)(
                disc, x, jax.lax.stop_gradient(recon))
            new_disc, disc_opt, _, d_norm = self.disc_opt.step(disc, disc_opt, d_grads)
            metrics_out.update(d_aux, d_loss=d_loss, d_grad_norm=d_norm)
            finite = finite & all_finite(d_loss, d_norm)
        metrics_out["finite"] = finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + 1,
                                  params={"generator": new_gen, "discriminator": new_disc},
                                  opt_state={"generator": gen_opt, "discriminator": disc_opt})
        return new_state, metrics_out

    def reconstruct(self, params: Any, images: jax.Array) -> dict:
        """Deterministic reconstructions (posterior mode / quantised) and VQ code indices."""
        model_params = params["generator"]["model"]
        if self.kind == "kl":
            out = self.model.apply({"params": model_params}, images, sample_posterior=False)
        else:
            out = self.model.apply({"params": model_params}, images)
        return out

    def eval_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """Masked sums over the batch of PSNR, SSIM (LPIPS) and, for VQ, a code histogram."""
        x, mask = batch["image"], batch["mask"].astype(jnp.float32)
        out = self.reconstruct(state.params, x)
        recon = jnp.clip(out["recon"], -1.0, 1.0)
        sums = {"count": jnp.sum(mask),
                "psnr": jnp.sum(metrics.psnr(x, recon) * mask),
                "l1": jnp.sum(jnp.mean(jnp.abs(x - recon), axis=(1, 2, 3)) * mask)}
        if x.shape[1] >= 11:
            sums["ssim"] = jnp.sum(metrics.ssim(x, recon) * mask)
        if "lpips" in constants:
            sums["lpips"] = jnp.sum(self._lpips(constants, x, recon) * mask)
        if self.kind == "vq":
            n = self.config.model.n_embed
            onehot = jax.nn.one_hot(out["indices"], n, dtype=jnp.float32)
            sums["code_hist"] = jnp.einsum("bhwn,b->n", onehot, mask)
        return sums

    def summarise_eval(self, sums: dict) -> dict:
        """Means of the eval sums; codebook usage and perplexity over the whole eval set."""
        count = max(float(sums["count"]), 1.0)
        result = {k: float(v) / count for k, v in sums.items() if k not in ("count", "code_hist")}
        if "code_hist" in sums:
            hist = np.asarray(sums["code_hist"], np.float64)
            p = hist / max(hist.sum(), 1.0)
            result["code_usage"] = float(np.mean(hist > 0))
            result["perplexity"] = float(np.exp(-np.sum(p * np.log(p + 1e-10))))
        result["num_examples"] = float(sums["count"])
        return result

    def image_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """Named image sets (in [-1, 1]) for the PNG grids: inputs and reconstructions."""
        out = self.reconstruct(state.params, batch["image"])
        return {"inputs": batch["image"], "reconstructions": jnp.clip(out["recon"], -1.0, 1.0)}
