"""conditioning.precompute_context: a frozen text encoder's context computed once by
precompute_latents and stored in the latent shards, training on it with no text encoder in the
step, the refusal of latents precomputed by another encoder, and sampling from prompts."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import QUIET_RUN, require, smoke_config
from test_conditioned_data import Head, tfds_dir, tiny_first_stage  # noqa: F401 (fixtures)
from ldm_jax import sample
from ldm_jax.conditioning import encoders
from ldm_jax.config import loading as config_lib
from ldm_jax.config.loading import ConfigError
from ldm_jax.data import digits_conditioned as dc
from ldm_jax.data import latents as latents_lib
from ldm_jax.data import pipeline, registry
from ldm_jax.data import precompute as precompute_lib
from ldm_jax.tasks.diffusion import DiffusionTask
from ldm_jax.training.trainer import train_and_evaluate

MAX_LENGTH = 12
NUM_EXAMPLES = 24


def _vocab(path):
    """A WordPiece vocab.txt holding the digits captions' words (others map to [UNK])."""
    words = {"[PAD]": 0}
    for token in ("[UNK]", "[CLS]", "[SEP]", "[MASK]", ","):
        words.setdefault(token, len(words))
    for digit in range(10):
        for caption in dc.captions_for(digit) + dc.captions_for(digit, dc.HELDOUT_PHRASINGS):
            for word in caption.replace(",", " ").lower().split():
                words.setdefault(word, len(words))
    path.write_text("".join(w + "\n" for w in words))
    return len(words)


def _save_bert(folder, vocab_size, seed):
    """A tiny transformers BertModel with random weights, as save_pretrained writes it."""
    require("torch")
    transformers = require("transformers")
    import torch
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=32))
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    vocab_size = _vocab(root / "vocab.txt")
    return {"vocab": str(root / "vocab.txt"),
            "bert": _save_bert(root / "bert", vocab_size, seed=0),
            "other": _save_bert(root / "other", vocab_size, seed=1)}


def _config(encoders_dir, tfds_dir, latents_dir, *extra, encoder="bert"):
    """configs/ldm_digits_text.py at 16 px with the tiny frozen BERT, then `extra` overrides."""
    config = smoke_config(
        "ldm_digits_text.py", *QUIET_RUN, variant=None, **{
            "source_data.data_dir": tfds_dir, "source_data.image_size": 16,
            "source_data.num_threads": 0, "latents.scale_factor": 1.0,
            "data.latents_dir": latents_dir, "data.train_split": "test",
            "data.eval_split": "test", "data.num_threads": 0,
            "conditioning.text_encoder": "hf_bert",
            "conditioning.encoder_path": encoders_dir[encoder],
            "conditioning.tokenizer_path": encoders_dir["vocab"],
            "conditioning.max_length": MAX_LENGTH, "conditioning.precompute_context": True,
            "model.num_res_blocks": 1, "batch_size": 8, "sampling.num_steps": 2})
    return config_lib.apply_overrides(config, list(extra))


def _precompute(config, first_stage_dir, out):
    real = registry.make_source
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompute_lib.registry, "make_source",
                      lambda cfg, split: Head(real(cfg, split), NUM_EXAMPLES))
        return precompute_lib.precompute(config, first_stage_dir, out, splits=["test"],
                                         examples_per_shard=16)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, encoders_dir, tfds_dir, tiny_first_stage):  # noqa: F811
    out = str(tmp_path_factory.mktemp("latents"))
    config = _config(encoders_dir, tfds_dir, out)
    return config, _precompute(config, tiny_first_stage, out)


def test_precompute_stores_the_encoders_context(precomputed, encoders_dir, tfds_dir,
                                                tiny_first_stage):  # noqa: F811
    config, meta = precomputed
    condition = encoders.make_condition(config)
    identity = condition.context_identity()
    assert meta["context_encoder"] == json.loads(json.dumps(identity))
    assert identity["text_encoder"] == "hf_bert" and identity["max_length"] == MAX_LENGTH
    assert len(identity["weights_sha256"]) == 64 and identity["width"] == 32
    assert condition.frozen_params() is None  # the steps get no text encoder weights
    # The same encoder without precompute_context: tokens in, the encoder in the step.
    by_tokens = encoders.make_condition(config_lib.apply_overrides(
        config.copy_and_resolve_references(), ["conditioning.precompute_context=False"]))
    apply = jax.jit(lambda w, t: by_tokens.module.apply({"params": w}, t))
    stored = latents_lib.latents_source(config.data.latents_dir, "test")
    for i in (0, 5, 17, 23):
        record = stored[i]
        captions = [c.decode() for c in record["caption"]]
        assert len(captions) == 3 and record["context"].shape == (3, MAX_LENGTH, 32)
        tokens = by_tokens.tokenize(captions)
        expected = np.asarray(apply(by_tokens.frozen_params(), tokens))
        np.testing.assert_allclose(record["context"], expected, rtol=0, atol=1e-6)
    # The condition_fn picks a caption's row as the token path picks the caption: a random
    # one per epoch in training (same rng rule), the first in eval.
    fields = {"caption": captions, "context": record["context"]}
    picked = set()
    for seed in range(8):
        row = condition.condition_fn(fields, np.random.default_rng(seed), True)["context"]
        tok = by_tokens.condition_fn(fields, np.random.default_rng(seed), True)["tokens"]
        index = int(np.flatnonzero((tokens == tok).all(axis=1))[0])
        np.testing.assert_array_equal(row, record["context"][index])
        picked.add(index)
    assert len(picked) > 1
    np.testing.assert_array_equal(condition.condition_fn(fields, None, False)["context"],
                                  record["context"][0])
    batch = next(pipeline.make_eval_iterator(config.data, global_batch_size=8,
                                             condition_fn=condition.condition_fn,
                                             process_index=0, process_count=1))
    assert batch["context"].shape == (8, MAX_LENGTH, 32) and "tokens" not in batch
    np.testing.assert_array_equal(batch["context"][0], stored[0]["context"][0])
    # An example without captions gets the null context (the encoded empty prompt).
    empty = condition.condition_fn({"context": np.zeros((0, MAX_LENGTH, 32))}, None, False)
    np.testing.assert_allclose(empty["context"], condition.encode_texts([""])[0], atol=1e-6)
    # Resume: the same command finds the latents complete; another encoder into the same
    # directory is refused (the run fingerprint holds the context encoder).
    assert _precompute(config, tiny_first_stage, config.data.latents_dir) == meta
    other = _config(encoders_dir, tfds_dir, config.data.latents_dir, encoder="other")
    with pytest.raises(precompute_lib.PrecomputeError, match="context_encoder"):
        _precompute(other, tiny_first_stage, config.data.latents_dir)


def test_train_on_the_stored_context_then_sample_from_prompts(tmp_path, precomputed,
                                                              monkeypatch):
    config, _ = precomputed
    seen = []
    step = DiffusionTask.train_step

    def recording_step(self, state, batch, constants, phase="main"):
        seen.append((sorted(constants), sorted(batch)))
        return step(self, state, batch, constants, phase)

    monkeypatch.setattr(DiffusionTask, "train_step", recording_step)
    workdir = str(tmp_path / "run")
    run = config.copy_and_resolve_references()
    run.total_steps, run.checkpoint_every_steps, run.log_every_steps = 2, 2, 1
    result = train_and_evaluate(run, workdir)
    assert result["step"] == 2 and result["finite"] == 1.0
    assert seen and all(keys == ["first_stage"] for keys, _ in seen)  # no 'cond_stage'
    assert all("context" in batch and "tokens" not in batch for _, batch in seen)
    # Sampling encodes the prompts on the host with the frozen encoder.
    out = tmp_path / "samples"
    assert sample.main([f"--workdir={workdir}", f"--out={out}", "--num=3", "--steps=2",
                        "--prompt=the digit 7", "--prompt=number three",
                        "--batch_size=8"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape[0] == 3
    assert list(npz["prompts"]) == ["the digit 7", "number three", "the digit 7"]
    task = DiffusionTask(run)
    cond = task.condition.request(3, prompts=["the digit 7", "number three"])
    np.testing.assert_allclose(cond["context"][2],
                               task.condition.encode_texts(["the digit 7"])[0], atol=1e-6)
    assert task.constants().keys() == {"first_stage"}


def test_latents_of_another_encoder_are_refused(precomputed, encoders_dir, tfds_dir):
    config, _ = precomputed
    out = config.data.latents_dir

    def refusal(cfg):
        with pytest.raises(latents_lib.ContextEncoderMismatchError) as e:
            DiffusionTask(cfg)
        message = str(e.value)
        assert "\n" not in message and "precompute_context=False" in message
        return message

    other = _config(encoders_dir, tfds_dir, out, encoder="other")
    message = refusal(other)
    mine = encoders.make_condition(config).context_identity()["weights_sha256"]
    theirs = encoders.make_condition(other).context_identity()["weights_sha256"]
    assert "weights_sha256" in message and mine in message and theirs in message
    assert "max_length" not in message
    message = refusal(_config(encoders_dir, tfds_dir, out, "conditioning.max_length=10"))
    assert "max_length: latents 12, config 10" in message and "weights_sha256" not in message
    with pytest.raises(latents_lib.ContextEncoderMismatchError, match="hold no precomputed"):
        latents_lib.check_context_encoder_matches({}, {"text_encoder": "hf_bert"}, out)
    # Only a frozen text encoder can precompute its context; the error names the field.
    bert = _config(encoders_dir, tfds_dir, out, "conditioning.text_encoder=bert")
    with pytest.raises(ConfigError, match="conditioning.precompute_context=True"):
        DiffusionTask(bert)
    layout = _config(encoders_dir, tfds_dir, out, "conditioning.kind=layout")
    with pytest.raises(ConfigError, match="conditioning.precompute_context=True"):
        DiffusionTask(layout)
    assert os.path.isdir(out)
