"""Text (and cross-attention class) models through python -m ldm_jax.convert and export: CompVis
text2img / cin256-v2 checkpoints with their cond_stage_model, diffusers LDMTextToImagePipeline and
Stable-Diffusion-1.x folders become bundles that carry their tokenizer (and frozen encoder) and
sample from prompts; Stable Diffusion matches diffusers' own pipeline; exports load in diffusers.

Tiny random weights, float32.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import require, smoke_config
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, state_dict_np

torch = require("torch")
diffusers = require("diffusers")
transformers = require("transformers")
yaml = require("yaml")

from ldm_jax import convert, export, sample  # noqa: E402
from ldm_jax.conditioning import ldm_bert  # noqa: E402
from ldm_jax.conditioning.encoders import COND_STAGE_KEY  # noqa: E402
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.convert.compvis import ae_fields_from_compvis, unet_fields_from_compvis  # noqa: E402
from ldm_jax.inference import sampling  # noqa: E402
from ldm_jax.models.autoencoder import make_first_stage  # noqa: E402
from ldm_jax.storage import bundle as bundle_lib  # noqa: E402
from ldm_jax.tasks.diffusion import make_sampler, make_unet  # noqa: E402
from ldm_jax.training.trainer import train_and_evaluate  # noqa: E402

STEPS = 10
GUIDANCE = 3.0
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The torch references are tiny: one thread, instead of contending with XLA's (10x faster
    on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_tree(tree, seed, std=0.05):
    """Every leaf N(0, std^2): no zero-initialised layer hides a lost array."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(std * jax.random.normal(k, np.shape(x))) for k, x in zip(keys, leaves)])


def _sample(workdir, out, *args):
    assert sample.main([f"--workdir={workdir}", f"--out={out}", "--num=2", "--steps=3",
                        "--batch_size=8", *args]) == 0
    return np.load(os.path.join(out, "samples.npz"))


def _equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _equal_state_dicts(a, b, skip=()):
    sa, sb = state_dict_np(a), state_dict_np(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if k not in skip:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# CompVis checkpoints with a condition encoder
# ------------------------------------------------------------------------------------------------

WIDTH = 32  # text encoder / class embedding width = the UNet's context_dim
UNET_YAML = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                 attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2],
                 num_head_channels=16, use_spatial_transformer=True, transformer_depth=1,
                 context_dim=WIDTH, legacy=False)
KL_STAGE = {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 3, "ddconfig": dict(
                double_z=True, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)}}
BERT_STAGE = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
              "params": {"n_embed": WIDTH, "n_layer": 1}}
CLASS_STAGE = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
               "params": {"embed_dim": WIDTH, "n_classes": 5, "key": "class_label"}}


def _compvis_checkpoint(tmp_path, cond_stage):
    """A LatentDiffusion text2img- (BERTEmbedder) or cin256-v2-shaped (ClassEmbedder) .ckpt +
    YAML: a UNet with a SpatialTransformer, a KL first stage and cond_stage_model.*."""
    fields = unet_fields_from_compvis(UNET_YAML)
    unet = make_unet(ml_collections.ConfigDict(dict(fields, attention_impl=None)))
    unet_params = _random_tree(unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                         jnp.zeros((1,), jnp.int32),
                                         context=jnp.zeros((1, 77, WIDTH)))["params"], 1,
                               std=0.2)  # large enough for the prompt to move uint8 pixels
    ae_fields = ae_fields_from_compvis(KL_STAGE["target"], KL_STAGE["params"])
    ae = _random_tree(make_first_stage(ae_fields).init(jax.random.key(2),
                                                        jnp.zeros((1, 16, 16, 3)))["params"], 3,
                      std=0.2)
    sd = {f"model.diffusion_model.{k}": v
          for k, v in convert.unet_params_to_compvis(unet_params, fields).items()}
    sd.update({f"first_stage_model.{k}": v
               for k, v in convert.ae_params_to_compvis(ae, ae_fields).items()})
    if cond_stage is BERT_STAGE:
        # The shipped bert-base-uncased vocabulary (30522 tokens); x-transformers' 8 heads.
        module = ldm_bert.LDMBert(vocab_size=30522, max_length=77, width=WIDTH, depth=1, heads=8,
                                  dim_head=8)
        cond = _random_tree(module.init(jax.random.key(4), jnp.zeros((1, 77), jnp.int32))["params"],
                            5, std=0.2)
        fields_bert = dict(vocab_size=30522, max_length=77, width=WIDTH, depth=1, heads=8,
                           dim_head=8, ff_mult=4)
        cond_sd = ldm_bert.ldm_bert_params_to_compvis(cond, fields_bert)
    else:
        cond = {"embedding": np.asarray(np.random.default_rng(6).standard_normal((5, WIDTH)),
                                        np.float32)}
        cond_sd = {"embedding.weight": cond["embedding"]}
    sd.update({f"cond_stage_model.{k}": v for k, v in cond_sd.items()})
    ckpt, cfg = str(tmp_path / "model.ckpt"), str(tmp_path / "config.yaml")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, ckpt)
    params = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, image_size=8,
                  channels=3, scale_factor=0.18215, conditioning_key="crossattn",
                  cond_stage_trainable=True, unet_config={
                      "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                      "params": UNET_YAML},
                  first_stage_config=KL_STAGE, cond_stage_config=cond_stage)
    with open(cfg, "w") as f:
        yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                  "params": params}}, f)
    return ckpt, cfg, unet_params, cond


def test_compvis_text2img_checkpoint_converts_and_samples_from_prompts(tmp_path, capsys):
    ckpt, cfg, unet_params, bert = _compvis_checkpoint(tmp_path, BERT_STAGE)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}"]) == 0
    assert "BERTEmbedder width 32, depth 1, 8 heads x 8" in capsys.readouterr().out

    with open(os.path.join(out, "bundle.json")) as f:
        record = json.load(f)
    cond = record["config"]["conditioning"]
    assert (cond["kind"], cond["text_encoder"], cond["tokenizer"]) == ("text", "bert", "wordpiece")
    assert (cond["width"], cond["depth"], cond["heads"], cond["dim_head"]) == (WIDTH, 1, 8, 8)
    # The shipped vocabulary travels inside the bundle, named relative to it.
    assert cond["tokenizer_path"] == "tokenizer/vocab.txt"
    assert record["bundle_paths"] == {"conditioning.tokenizer_path": "tokenizer/vocab.txt"}
    assert not os.path.exists(os.path.join(out, "text_encoder"))

    # Moved elsewhere, the bundle still samples: its paths resolve against where it is now.
    moved = str(tmp_path / "elsewhere" / "bundle")
    os.makedirs(os.path.dirname(moved))
    shutil.move(out, moved)
    b = bundle_lib.load_bundle(moved)
    assert b.config.conditioning.tokenizer_path == os.path.join(moved, "tokenizer", "vocab.txt")
    _equal_trees(b.unet_params[COND_STAGE_KEY], bert)
    _equal_trees({k: v for k, v in b.unet_params.items() if k != COND_STAGE_KEY}, unet_params)
    red = _sample(moved, tmp_path / "red", "--prompt=a red bus", "--prompt=a cat",
                  "--guidance_scale=3")
    assert red["images"].shape == (2, 16, 16, 3) and red["images"].std() > 0
    assert list(red["prompts"]) == ["a red bus", "a cat"]
    blue = _sample(moved, tmp_path / "blue", "--prompt=a blue bus", "--prompt=a cat",
                   "--guidance_scale=3")
    # Same noise: the first sample changes with its prompt, the second does not.
    assert np.abs(red["images"][0].astype(int) - blue["images"][0]).max() > 0
    np.testing.assert_array_equal(red["images"][1], blue["images"][1])

    # Back to diffusers: LDMTextToImagePipeline loads bert/ (the converted weights) and a
    # BertTokenizer from the shipped vocab.txt giving the same token ids.
    exported = str(tmp_path / "exported")
    assert convert_main([f"--source={moved}", f"--output={exported}", "--to=diffusers"]) == 0
    pipe = diffusers.LDMTextToImagePipeline.from_pretrained(exported)
    fields = dict(vocab_size=30522, max_length=77, width=WIDTH, depth=1, heads=8, dim_head=8,
                  ff_mult=4)
    expected = ldm_bert.ldm_bert_params_to_diffusers(bert, fields)
    got = state_dict_np(pipe.bert)
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    prompts = ["A red bus!", "a cat", ""]
    np.testing.assert_array_equal(
        pipe.tokenizer(prompts, padding="max_length", max_length=77)["input_ids"],
        sampling.load_bundle_task(moved)[1].condition.request(3, prompts=prompts)["tokens"])

    # A vocabulary that does not fit the encoder's embedding is a one-line error naming the flag.
    small = tmp_path / "vocab.txt"
    small.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={tmp_path}/b2",
                         f"--tokenizer_path={small}"]) == 2
    assert "--tokenizer_path" in capsys.readouterr().err


def test_compvis_class_embedder_checkpoint_converts_and_samples_labels(tmp_path, capsys):
    ckpt, cfg, _, cond = _compvis_checkpoint(tmp_path, CLASS_STAGE)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}"]) == 0
    assert "class 4 is the null label" in capsys.readouterr().out
    b = bundle_lib.load_bundle(out)
    assert b.config.conditioning.kind == "class_crossattn"
    assert b.config.conditioning.num_embed_classes == 5
    np.testing.assert_array_equal(b.unet_params[COND_STAGE_KEY]["embedding"], cond["embedding"])
    npz = _sample(out, tmp_path / "s", "--labels=0,3")
    assert list(npz["labels"]) == [0, 3]
    # No diffusers pipeline takes a class_crossattn model: refused, naming the kind.
    assert convert_main([f"--source={out}", f"--output={tmp_path}/d", "--to=diffusers"]) == 2
    assert "class_crossattn" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x-shaped diffusers folder
# ------------------------------------------------------------------------------------------------

# A tiny byte-level BPE in CLIP's format (vocab.json + merges.txt, '</w>' word ends).
CLIP_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
              "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
              "<|startoftext|>", "<|endoftext|>"]
CLIP_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
PROMPTS = ["lower newer", "lowest wider low"]


def _write_clip_tokenizer_files(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(CLIP_VOCAB)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(CLIP_MERGES) + "\n")


def _sd_pipeline(root):
    """UNet2DConditionModel (cross_attention_dim = the CLIP width) + AutoencoderKL +
    CLIPTextModel + CLIPTokenizer + DDIMScheduler with Stable Diffusion's settings."""
    _write_clip_tokenizer_files(str(root / "files"))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "files"),
                                                           model_max_length=77)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(CLIP_VOCAB), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=21, eos_token_id=22,
        pad_token_id=22))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=WIDTH, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.18215)
    randomize(text_encoder, seed=1, std=0.2)
    randomize(unet, seed=2, std=0.05)
    randomize(vae, seed=3, std=0.2)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                        beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    src = str(root / "sd")
    pipe.save_pretrained(src)
    # As a Stable Diffusion folder ships them (transformers 5 saves only tokenizer.json).
    _write_clip_tokenizer_files(os.path.join(src, "tokenizer"))
    return src, pipe


def _diffusers_latents(pipe, noise):
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(noise), eta=0.0, output_type="latent")
        latents = out.images
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    return latents.numpy(), images.numpy()


def test_stable_diffusion_folder_converts_samples_prompts_and_matches_diffusers(tmp_path, capsys):
    src, pipe = _sd_pipeline(tmp_path)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={src}", f"--output={out}"]) == 0
    assert "CLIPTextModel 32 wide" in capsys.readouterr().out
    with open(os.path.join(out, "bundle.json")) as f:
        record = json.load(f)
    assert record["bundle_paths"] == {"conditioning.tokenizer_path": "tokenizer",
                                      "conditioning.encoder_path": "text_encoder"}
    assert sorted(os.listdir(os.path.join(out, "text_encoder"))) == ["config.json",
                                                                     "model.safetensors"]
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(out, "tokenizer")))
    shutil.rmtree(src)  # the bundle needs nothing from the source folder

    config, task, b = sampling.load_bundle_task(out)
    cond = config.conditioning
    assert (cond.kind, cond.text_encoder, cond.tokenizer, cond.max_length) == \
        ("text", "clip_text", "clip", 77)
    assert config.model.context_dim == WIDTH and b.scale_factor == pytest.approx(0.18215)

    # Our DDIM + guidance from the same initial noise as diffusers' StableDiffusionPipeline.
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref_z, ref_img = _diffusers_latents(pipe, noise)
    ddim = make_sampler(config, task.schedule, name="ddim", num_steps=STEPS, eta=0.0)
    x_T = jnp.asarray(nchw_to_nhwc(noise))
    constants = task.constants()
    tokens = task.condition.request(2, prompts=PROMPTS)
    np.testing.assert_array_equal(  # the pipeline's own tokenisation
        tokens["tokens"], pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                         truncation=True)["input_ids"])

    @jax.jit
    def run(cond):
        z = task.sample_latents(b.unet_params, jax.random.key(0), 2, cond=cond,
                                constants=constants, guidance_scale=GUIDANCE,
                                sampler=lambda fn, shape, rng: ddim(fn, shape, rng, x_T=x_T))
        return z, task.decode(constants, z)

    z, img = run(jax.tree_util.tree_map(jnp.asarray, tokens))
    err_z, err_img = rel_err(nhwc_to_nchw(z), ref_z), rel_err(nhwc_to_nchw(img), ref_img)
    print(f"Stable Diffusion DDIM {STEPS} steps, guidance {GUIDANCE}: latents rel err "
          f"{err_z:.2e}, decoded rel err {err_img:.2e}")
    assert err_z <= TOL and err_img <= TOL

    npz = _sample(out, tmp_path / "s", f"--prompt={PROMPTS[0]}", "--guidance_scale=3")
    assert npz["images"].shape == (2, 16, 16, 3) and list(npz["prompts"]) == [PROMPTS[0]] * 2

    # Back to diffusers: StableDiffusionPipeline loads the folder and gives the same latents.
    exported = str(tmp_path / "exported")
    assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 0
    pipe2 = diffusers.StableDiffusionPipeline.from_pretrained(exported)
    pipe2.set_progress_bar_config(disable=True)
    for a, b2 in ((pipe.unet, pipe2.unet), (pipe.vae, pipe2.vae),
                  (pipe.text_encoder, pipe2.text_encoder)):
        _equal_state_dicts(a, b2)
    assert pipe2.tokenizer(PROMPTS)["input_ids"] == pipe.tokenizer(PROMPTS)["input_ids"]
    z2, _ = _diffusers_latents(pipe2, noise)
    np.testing.assert_array_equal(z2, ref_z)


# ------------------------------------------------------------------------------------------------
# diffusers LDMTextToImagePipeline folder
# ------------------------------------------------------------------------------------------------

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "bus", "cat", "dog",
              "the", "##s", "on", "blue"]


def _ldm_text_pipeline(root):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                                LDMBertModel)
    words = root / "words"
    words.mkdir()
    (words / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(words))
    bert = LDMBertModel(LDMBertConfig(
        vocab_size=len(BERT_WORDS), max_position_embeddings=77, d_model=WIDTH, encoder_layers=2,
        encoder_attention_heads=2, head_dim=16, encoder_ffn_dim=4 * WIDTH, dropout=0.0))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=WIDTH, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # The released ldm-text2im-large-256 keeps a KL autoencoder under the name `vqvae`.
    vqvae = diffusers.AutoencoderKL(block_out_channels=(32,), latent_channels=4,
                                    layers_per_block=1, sample_size=8)
    for seed, module in enumerate((bert, unet, vqvae)):
        randomize(module, seed=10 + seed, std=0.05 if module is unet else 0.2)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer,
                                            unet=unet, scheduler=diffusers.DDIMScheduler())
    src = str(root / "ldm")
    pipe.save_pretrained(src)
    return src, pipe


def test_ldm_text_to_image_folder_round_trip(tmp_path, capsys):
    src, pipe = _ldm_text_pipeline(tmp_path)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={src}", f"--output={out}"]) == 0
    assert "LDMBertModel width 32, depth 2, 2 heads x 16" in capsys.readouterr().out
    config, task, b = sampling.load_bundle_task(out)
    cond = config.conditioning
    assert (cond.kind, cond.text_encoder, cond.width, cond.depth, cond.heads, cond.dim_head) == \
        ("text", "bert", WIDTH, 2, 2, 16)
    # The bundle's tokenizer + encoder give the pipeline's text embeddings.
    prompts = ["a red bus", "the blue cats", ""]
    tokens = task.condition.request(3, prompts=prompts)["tokens"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    np.testing.assert_array_equal(tokens, ids.numpy())
    with torch.no_grad():
        ref = pipe.bert(ids)[0].numpy()
    context = task.unet_inputs(b.unet_params, task.constants(), {"tokens": tokens})["context"]
    assert rel_err(context, ref) <= 1e-5
    npz = _sample(out, tmp_path / "s", "--prompt=a red bus")
    assert npz["images"].shape == (2, 8, 8, 3)

    # Back to diffusers: LDMTextToImagePipeline loads it with the same weights and tokens.
    exported = str(tmp_path / "exported")
    assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 0
    pipe2 = diffusers.LDMTextToImagePipeline.from_pretrained(exported)
    for a, b2 in ((pipe.unet, pipe2.unet), (pipe.vqvae, pipe2.vqvae)):
        _equal_state_dicts(a, b2)
    # Every LDMBert weight round-trips; the LM head (never used by the pipeline) comes back 0.
    _equal_state_dicts(pipe.bert, pipe2.bert, skip=("to_logits.weight", "to_logits.bias"))
    assert not state_dict_np(pipe2.bert)["to_logits.weight"].any()
    assert pipe2.tokenizer(prompts)["input_ids"] == pipe.tokenizer(prompts)["input_ids"]


# ------------------------------------------------------------------------------------------------
# python -m ldm_jax.export of a text run; layout and frozen-encoder bundles
# ------------------------------------------------------------------------------------------------

def test_exported_text_run_samples_prompts_after_a_move(tmp_path):
    run = str(tmp_path / "run")
    train_and_evaluate(smoke_config("ldm_digits_text.py", "async_checkpointing=false",
                                    "eval_every_steps=0", "image_every_steps=0", total_steps=1,
                                    checkpoint_every_steps=1), run)
    out = str(tmp_path / "bundle")
    assert export.main([f"--workdir={run}", f"--output={out}"]) == 0
    # The shipped vocabulary the run names as package://... is inside the bundle now.
    assert os.path.isfile(os.path.join(out, "tokenizer", "vocab.txt"))
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    shutil.rmtree(run)
    npz = _sample(moved, tmp_path / "s", "--prompt=the digit 7")
    assert npz["images"].shape[0] == 2 and list(npz["prompts"]) == ["the digit 7"] * 2


def test_layout_bundle_samples_layouts(tmp_path):
    """A layout model's tokenizer is built from its config: nothing to copy, and the bundle
    (which reads no data) knows its box classes from the saved config."""
    from ldm_jax.tasks.diffusion import DiffusionTask
    task = DiffusionTask(smoke_config("ldm_digits_layout.py"))
    params = _random_tree(task.init_state(jax.random.key(0)).params["model"], 1)
    out = str(tmp_path / "bundle")
    bundle_lib.save_bundle(out, config=task.config, unet_params=params)
    assert sorted(os.listdir(out)) == ["bundle.json", "params"]
    npz = _sample(out, tmp_path / "s", "--layout=1:0.1,0.1,0.5,0.5")
    assert list(npz["layouts"]) == ["1:0.1,0.1,0.5,0.5"] * 2


def test_frozen_text_encoder_and_tokenizer_travel_in_the_bundle(tmp_path):
    """A frozen transformers BERT given as pytorch_model.bin: the bundle holds config.json +
    model.safetensors and the vocabulary, and samples once the originals are gone."""
    from ldm_jax.conditioning.hf_bert import hf_bert_params_from_transformers
    from ldm_jax.tasks.diffusion import DiffusionTask
    words, encoder = tmp_path / "words", tmp_path / "encoder"
    words.mkdir()
    (words / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(BERT_WORDS), hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=80))
    randomize(model, seed=20)
    encoder.mkdir()
    model.config.to_json_file(str(encoder / "config.json"))
    torch.save(model.state_dict(), str(encoder / "pytorch_model.bin"))
    config = smoke_config("ldm_digits_text.py", **{
        "conditioning.text_encoder": "hf_bert", "conditioning.encoder_path": str(encoder),
        "conditioning.tokenizer_path": str(words / "vocab.txt")})
    task = DiffusionTask(config)
    params = _random_tree(task.init_state(jax.random.key(0)).params["model"], 1)
    out = str(tmp_path / "bundle")
    bundle_lib.save_bundle(out, config=task.config, unet_params=params)
    assert sorted(os.listdir(os.path.join(out, "text_encoder"))) == ["config.json",
                                                                     "model.safetensors"]
    shutil.rmtree(encoder)
    shutil.rmtree(words)
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    _, task2, b = sampling.load_bundle_task(moved)
    assert b.config.conditioning.encoder_path == os.path.join(moved, "text_encoder")
    _equal_trees(task2.constants()["cond_stage"],
                 hf_bert_params_from_transformers(state_dict_np(model)))
    npz = _sample(moved, tmp_path / "s", "--prompt=a red bus")
    assert list(npz["prompts"]) == ["a red bus"] * 2
    # A damaged bundle (its tokenizer gone) is a clear error naming the file.
    os.remove(os.path.join(moved, "tokenizer", "vocab.txt"))
    with pytest.raises(bundle_lib.BundleError, match="tokenizer/vocab.txt"):
        bundle_lib.load_bundle(moved)
