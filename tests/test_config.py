"""Config loading, variants, overrides and their errors."""

import glob
import os

import pytest

from ldm_jax.config import loading as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("variant", ["", ":smoke"])
def test_every_config_and_smoke_variant_loads_with_common_fields(path, variant):
    config = config_lib.load_config(path + variant)
    config_lib.check_common_fields(config)
    if "model_channels" in config.model:  # a UNet config: its shape checks pass
        from ldm_jax.tasks.diffusion import check_unet_config
        check_unet_config(config.model)
    assert config.mesh.data == -1 and config.mesh.fsdp == 1
    if variant:
        assert config.total_steps <= 200 and config.data.source in ("digits", "synthetic_latents")


def test_design_numbers_in_first_stage_configs():
    expected = {  # the paper's first stages: f, z channels, ch_mult, attn_res, codebook
        "autoencoder_kl_f4": ("kl", 3, (1, 2, 4), (), 0),
        "autoencoder_kl_f8": ("kl", 4, (1, 2, 4, 4), (), 0),
        "autoencoder_kl_f16": ("kl", 16, (1, 1, 2, 2, 4), (16,), 0),
        "autoencoder_kl_f32": ("kl", 64, (1, 1, 2, 2, 4, 4), (16, 8), 0),
        "autoencoder_vq_f4": ("vq", 3, (1, 2, 4), (), 8192),
        "autoencoder_vq_f8": ("vq", 4, (1, 2, 2, 4), (32,), 16384),
        "autoencoder_vq_f16": ("vq", 8, (1, 1, 2, 2, 4), (16,), 16384),
    }
    for name, (kind, z, mult, attn, n_embed) in expected.items():
        c = config_lib.load_config(os.path.join(ROOT, "configs", name + ".py"))
        assert (c.model.kind, c.model.z_channels, c.model.ch_mult, c.model.attn_resolutions) == (
            kind, z, mult, attn), name
        assert c.model.ch == 128 and c.model.num_res_blocks == 2 and c.model.dropout == 0.0
        assert c.optimizer.base_learning_rate == 4.5e-6 and (c.optimizer.b1, c.optimizer.b2) == (0.5, 0.9)
        assert c.loss.disc_weight == (0.5 if kind == "kl" else 0.75)
        if kind == "kl":
            assert c.loss.kl_weight == 1e-6 and c.loss.disc_start == 50001
        else:
            assert c.model.n_embed == n_embed and c.model.beta == 0.25


def _digits():
    return config_lib.load_config(os.path.join(ROOT, "configs", "autoencoder_kl_f4_digits.py"))


def test_overrides_are_typed():
    c = config_lib.apply_overrides(_digits(), [
        "total_steps=7", "optimizer.base_learning_rate=0.5", "model.ch_mult=1,2", "data.random_flip=true",
        "data.data_dir=/tmp/x", "data.name=foo"])
    assert c.total_steps == 7 and c.optimizer.base_learning_rate == 0.5
    assert c.model.ch_mult == (1, 2) and c.data.random_flip is True
    assert c.data.data_dir == "/tmp/x" and c.data.name == "foo"


def test_unknown_key_is_a_clear_error():
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'totl_steps'.*total_steps"):
        config_lib.apply_overrides(_digits(), ["totl_steps=3"])
    with pytest.raises(config_lib.ConfigError, match=r"'model.chh'.*model.ch"):
        config_lib.apply_overrides(_digits(), ["model.chh=3"])


def test_ill_typed_value_is_a_clear_error():
    with pytest.raises(config_lib.ConfigError, match=r"total_steps=abc: expected an integer"):
        config_lib.apply_overrides(_digits(), ["total_steps=abc"])
    with pytest.raises(config_lib.ConfigError, match=r"expected a boolean"):
        config_lib.apply_overrides(_digits(), ["data.random_flip=maybe"])
    with pytest.raises(config_lib.ConfigError, match=r"group of settings"):
        config_lib.apply_overrides(_digits(), ["model=3"])


def test_missing_config_file_and_unknown_variant():
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config("configs/nope.py")
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load_config(os.path.join(ROOT, "configs", "autoencoder_kl_f4.py:big"))


def test_design_numbers_in_stage2_configs():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "f4_celebahq.py"))
    m = c.model
    assert (m.model_channels, m.channel_mult, m.attention_resolutions, m.num_head_channels,
            m.num_res_blocks) == (224, (1, 2, 3, 4), (8, 4, 2), 32, 2)
    # The latent shape comes from the precomputed latents (any image size divisible by f).
    assert c.data.latent_shape is None and c.latents.scale_factor == 1.0
    d = c.diffusion
    assert (d.timesteps, d.beta_schedule, d.linear_start, d.linear_end) == (1000, "linear", 0.0015, 0.0195)
    assert c.batch_size == 48 and abs(c.optimizer.base_learning_rate * c.batch_size - 9.6e-5) < 1e-12
    assert c.optimizer.name == "adamw" and c.ema.decay == 0.9999
    c = config_lib.load_config(os.path.join(ROOT, "configs", "f8_lsun_churches.py"))
    assert (c.model.model_channels, c.model.channel_mult, c.model.attention_resolutions,
            c.model.num_heads) == (192, (1, 2, 2, 4, 4), (1, 2, 4, 8), 8)
    assert c.data.latent_shape is None and c.latents.scale_factor <= 0  # scale_by_std
    assert config_lib.load_config(os.path.join(ROOT, "configs", "f8_lsun_churches.py:smoke")
                                  ).data.latent_shape == (8, 8, 4)


def test_train_cli_reports_input_errors_in_one_line(tmp_path, capsys):
    from ldm_jax import train
    config = os.path.join(ROOT, "configs", "autoencoder_kl_f4.py") + ":smoke"
    assert train.main([f"--config={config}", f"--workdir={tmp_path}", "--config.totl_steps=3"]) == 2
    assert "unknown config key 'totl_steps'" in capsys.readouterr().err
    assert train.main([f"--config={config}", f"--workdir={tmp_path}", "--config.data.source=folder",
                       f"--config.data.folder={tmp_path / 'missing'}"]) == 2
    assert "data.folder" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["--config.model.model_channels=48"],
     r"model_channels=48 with channel_mult=\(1, 2\) gives channel counts \[48\] .*GroupNorm"),
    (["--config.model.num_head_channels=24"],
     r"config.model.num_head_channels=24 does not divide the channels \[64\]"),
    (["--config.model.num_head_channels=-1"], r"set exactly one of config.model.num_heads"),
    (["--config.model.num_head_channels=-1", "--config.model.num_heads=3"],
     r"config.model.num_heads=3 does not divide the channels \[64\]"),
])
def test_unet_shape_errors_name_the_fields(tmp_path, capsys, overrides, message):
    """A UNet the config cannot build is a one-line error naming its fields, before any data
    or compile (flax would fail inside GroupNorm or the attention, naming none)."""
    import re
    from ldm_jax import train
    config = os.path.join(ROOT, "configs", "f4_celebahq.py") + ":smoke"
    assert train.main([f"--config={config}", f"--workdir={tmp_path}", *overrides]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_first_stage_shape_errors_name_the_fields(tmp_path, capsys):
    from ldm_jax import train
    config = os.path.join(ROOT, "configs", "autoencoder_kl_f4.py") + ":smoke"
    assert train.main([f"--config={config}", f"--workdir={tmp_path}", "--config.model.ch=12"]) == 2
    assert "config.model.ch=12 with ch_mult" in capsys.readouterr().err


def test_none_on_the_command_line_clears_optional_fields():
    """`--config.FIELD=None` means None for every field that may be None (strings, tuples,
    unset fields), the same through the mesh sweep's overrides; numbers refuse it."""
    c = config_lib.load_config(os.path.join(ROOT, "configs", "f4_celebahq.py"))
    config_lib.apply_overrides(c, ["data.label_key=None", "source_data.data_dir=None",
                                   "model.attention_impl=None", "data.latent_shape=None",
                                   "source_data.label_key=null"])
    assert c.data.label_key is None and c.source_data.data_dir is None
    assert c.model.attention_impl is None and c.data.latent_shape is None
    assert c.source_data.label_key is None
    config_lib.apply_overrides(c, ["data.label_key=label", "data.latent_shape=16,16,3",
                                   "model.attention_impl=xla"])
    assert c.data.label_key == "label" and c.data.latent_shape == (16, 16, 3)
    assert c.model.attention_impl == "xla"
    with pytest.raises(config_lib.ConfigError, match="expected an integer"):
        config_lib.apply_overrides(c, ["batch_size=None"])
    # Every entry point, and the mesh sweep's per-mesh runs (launch/mesh_sweep.py ->
    # ldm_jax.training.step_timing), load configs through the same function.
    from ldm_jax.cli import runner
    c = runner.load_config(os.path.join(ROOT, "configs", "autoencoder_vq_f4.py:smoke"),
                           ["data.label_key=None", "data.data_dir=None"])
    assert c.data.label_key is None and c.data.data_dir is None


def test_saved_configs_are_completed_with_new_defaults():
    """A config.json written before a field existed reads back with the field's default."""
    c = config_lib.load_config(os.path.join(ROOT, "configs", "ldm_digits.py"))
    saved = config_lib.to_json_dict(c)
    del saved["data"]["holdout_percent"], saved["conditioning"]["class_names"]
    del saved["data"]["max_unreadable_fraction"]
    restored = config_lib.config_from_json(saved)
    assert restored.data.holdout_percent == 5 and restored.conditioning.class_names == ()
    assert restored.model.channel_mult == (1, 2)  # saved values win, tuples restored
