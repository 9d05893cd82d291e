"""precompute_latents (tiny KL / VQ first stages trained in fixtures, digits at 16x16) and the
'latents' source of the input pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax import precompute_latents
from ldm_jax.data import precompute as precompute_lib
from ldm_jax.config import defaults as config_defaults
from ldm_jax.config import loading as config_lib
from ldm_jax.data import digits, latents, pipeline
from ldm_jax.storage.first_stage import load_first_stage
from ldm_jax.training.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    return digits.ensure_digits_prepared(str(tmp_path_factory.mktemp("tfds")))


def _train_first_stage(kind, workdir, digits_dir):
    """Two steps of a shrunk smoke run: enough for a real checkpoint and run directory."""
    name = "autoencoder_kl_f4.py" if kind == "kl" else "autoencoder_vq_f4.py"
    c = config_lib.load_config(os.path.join(ROOT, "configs", name) + ":smoke")
    config_lib.apply_overrides(c, [
        "model.ch_mult=1,2", f"model.resolution={SIZE}", f"data.image_size={SIZE}",
        f"data.data_dir={digits_dir}", "batch_size=8", "total_steps=2", "log_every_steps=2",
        "checkpoint_every_steps=2", "eval_every_steps=0", "image_every_steps=0",
        "async_checkpointing=false", "loss.disc_start=100", "loss.disc_ndf=8",
        "loss.disc_num_layers=2"])
    train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="session")
def kl_dir(tmp_path_factory, digits_dir):
    return _train_first_stage("kl", str(tmp_path_factory.mktemp("fs_kl")), digits_dir)


@pytest.fixture(scope="session")
def vq_dir(tmp_path_factory, digits_dir):
    return _train_first_stage("vq", str(tmp_path_factory.mktemp("fs_vq")), digits_dir)


def stage2_config(digits_dir, scale_factor=-1.0, scale_num_examples=10_000, **source):
    """The groups precompute reads from a stage-2 config, built by hand."""
    c = ml_collections.ConfigDict()
    c.source_data = config_defaults.data_config(source="digits", data_dir=digits_dir,
                                                image_size=SIZE, num_threads=0)
    c.source_data.update(source)
    c.latents = ml_collections.ConfigDict(
        {"scale_factor": scale_factor, "scale_num_examples": scale_num_examples, "seed": 3})
    c.batch_size = 64
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    return c


@pytest.fixture(scope="session")
def kl_latents(tmp_path_factory, digits_dir, kl_dir):
    """Both digits splits, scale_by_std over the whole train split (1498 < 10_000)."""
    out = str(tmp_path_factory.mktemp("kl_latents"))
    meta = precompute_lib.precompute(stage2_config(digits_dir), kl_dir, out,
                                         examples_per_shard=512)
    return out, meta


def read_split(out, split):
    src = latents.latents_source(out, split)
    return [src[i] for i in range(len(src))]


def direct_encode(first_stage, cfg, split):
    """The reference: eval-pipeline images of the split through an unsharded jitted encoder."""
    data_cfg = ml_collections.ConfigDict(cfg.source_data.to_dict())
    data_cfg.eval_split = split
    it = pipeline.make_eval_iterator(data_cfg, global_batch_size=128, process_index=0,
                                     process_count=1)
    encode = jax.jit(first_stage.encode_moments)
    out, labels = [], []
    for b in it:
        out.append(np.asarray(encode(first_stage.params, jnp.asarray(b["image"])))[b["mask"]])
        labels.append(b["label"][b["mask"]])
    return np.concatenate(out), np.concatenate(labels)


def check_round_trip(out, meta, first_stage, cfg, key):
    for split, n in (("train", 1498), ("test", 299)):
        rows = read_split(out, split)
        assert meta["num_examples"][split] == n and len(rows) == n
        assert [int(r["index"]) for r in rows] == list(range(n))  # every example once, in order
        stored = np.stack([r[key] for r in rows])
        assert stored.dtype == np.float32
        assert stored.shape == (n,) + tuple(meta["stored_shape"])
        expected, labels = direct_encode(first_stage, cfg, split)
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal([int(r["label"]) for r in rows], labels)
        assert {int(r["id"]) for r in rows} <= set(range(1797))  # other fields carried too


def test_kl_round_trip_and_scale_by_std(kl_latents, kl_dir, digits_dir):
    out, meta = kl_latents
    fs = load_first_stage(kl_dir)
    assert meta == latents.read_latents_metadata(out)
    assert meta["schema_version"] == 1 and meta["kind"] == "kl" and meta["latent_key"] == "moments"
    assert meta["f"] == 2 and meta["latent_shape"] == [8, 8, 3]
    assert meta["stored_shape"] == [8, 8, 6]
    assert {k: meta["first_stage"][k] for k in fs.identity} == fs.identity
    assert meta["first_stage"]["model_config"]["ch_mult"] == [1, 2]
    assert meta["num_shards"] == {"train": 3, "test": 1}
    assert meta["source_data"]["source"] == "digits"
    assert set(meta["conditioning_keys"]) == {"label", "id"}
    assert os.path.isfile(os.path.join(out, "1.0.0", "ldm_latents.json"))
    check_round_trip(out, meta, fs, stage2_config(digits_dir), "moments")

    # scale_by_std, recomputed here: a posterior sample of every train example with eps keyed
    # by (seed, index), unbiased std over all elements in float64.
    moments = np.stack([r["moments"] for r in read_split(out, "train")])
    mean, logvar = np.split(moments, 2, axis=-1)
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), i),
                                                 mean.shape[1:], jnp.float32))
                    for i in range(len(moments))])
    z = mean.astype(np.float64) + np.exp(0.5 * logvar.astype(np.float64)) * eps
    assert meta["scale_factor_source"] == {"method": "scale_by_std", "num_examples": 1498,
                                           "split": "train", "seed": 3, "ddof": 1}
    np.testing.assert_allclose(meta["scale_factor"], 1.0 / np.std(z, ddof=1), rtol=2e-5)
    # A rerun of a finished precompute returns its metadata without redoing anything.
    again = precompute_lib.precompute(
        stage2_config(digits_dir), kl_dir, out, examples_per_shard=512,
        on_shard_written=lambda *a: pytest.fail("a finished run re-encoded a shard"))
    assert again == meta


def test_vq_round_trip_and_fixed_scale(tmp_path, vq_dir, digits_dir):
    cfg = stage2_config(digits_dir, scale_factor=0.75)
    out = str(tmp_path / "vq")
    meta = precompute_lib.precompute(cfg, vq_dir, out, examples_per_shard=1024)
    assert meta["kind"] == "vq" and meta["latent_key"] == "latent"
    assert meta["stored_shape"] == meta["latent_shape"] == [8, 8, 3]
    assert meta["scale_factor"] == 0.75 and meta["scale_factor_source"] == {"method": "fixed"}
    check_round_trip(out, meta, load_first_stage(vq_dir), cfg, "latent")


def _snapshot(out):
    data_dir = os.path.join(out, "1.0.0")
    shards = sorted(n for n in os.listdir(data_dir) if ".array_record-" in n)
    return {n: open(os.path.join(data_dir, n), "rb").read() for n in shards}


def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path, kl_dir, digits_dir):
    cfg = stage2_config(digits_dir, scale_factor=1.0)
    kw = dict(splits=["test"], examples_per_shard=64)  # 299 examples -> 5 shards
    full = str(tmp_path / "full")
    precompute_lib.precompute(cfg, kl_dir, full, **kw)

    class Crash(RuntimeError):
        pass

    written = []

    def crash_after_two(split, shard):
        written.append((split, shard))
        if len(written) == 2:
            raise Crash()

    split_dir = str(tmp_path / "split")
    with pytest.raises(Crash):
        precompute_lib.precompute(cfg, kl_dir, split_dir, on_shard_written=crash_after_two, **kw)
    assert written == [("test", 0), ("test", 1)]
    assert len(_snapshot(split_dir)) == 2
    with pytest.raises(latents.LatentsNotReadyError, match="did not finish; rerun"):
        latents.read_latents_metadata(split_dir)
    # A partial shard left by the crash (in progress/tmp) must not survive the resume.
    open(os.path.join(split_dir, "progress", "tmp", "garbage.p0"), "wb").write(b"x")

    written.clear()
    precompute_lib.precompute(cfg, kl_dir, split_dir, on_shard_written=written.append
                                  and (lambda s, i: written.append((s, i))), **kw)
    assert written == [("test", 2), ("test", 3), ("test", 4)]  # only the missing shards
    assert os.listdir(os.path.join(split_dir, "progress", "tmp")) == []
    assert _snapshot(split_dir) == _snapshot(full)  # byte-identical shards
    a, b = read_split(full, "test"), read_split(split_dir, "test")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["moments"], y["moments"])
        assert x["index"] == y["index"] and x["label"] == y["label"]
    assert latents.read_latents_metadata(full) == latents.read_latents_metadata(split_dir)


def test_mismatched_first_stage_is_a_clear_error(tmp_path, kl_latents, kl_dir, vq_dir, digits_dir):
    out, meta = kl_latents
    latents.check_first_stage_matches(meta, load_first_stage(kl_dir).identity)  # same: fine
    with pytest.raises(latents.FirstStageMismatchError,
                       match="different first stage.*params_hash"):
        latents.check_first_stage_matches(meta, load_first_stage(vq_dir).identity)
    # Writing into an OUT_DIR made with another first stage (or config) is refused.
    with pytest.raises(precompute_lib.PrecomputeError,
                       match="different first stage or config.*params_hash"):
        precompute_lib.precompute(stage2_config(digits_dir), vq_dir, out,
                                      examples_per_shard=512)
    with pytest.raises(precompute_lib.PrecomputeError, match="examples_per_shard"):
        precompute_lib.precompute(stage2_config(digits_dir), kl_dir, out,
                                      examples_per_shard=100)
    assert latents.read_latents_metadata(out) == meta  # untouched


def test_missing_latents_and_bad_config_are_clear_errors(tmp_path, kl_dir, digits_dir):
    with pytest.raises(latents.LatentsNotReadyError,
                       match=r"No precomputed latents.*run python -m ldm_jax.precompute_latents"):
        latents.read_latents_metadata(str(tmp_path / "nothing"))
    with pytest.raises(latents.LatentsNotReadyError, match="data.latents_dir is not set"):
        pipeline.make_eval_iterator(config_defaults.data_config(source="latents"),
                                    global_batch_size=8)
    with pytest.raises(precompute_lib.PrecomputeError,
                       match=r"source_data.image_size=15 must be a positive multiple.*f=2"):
        precompute_lib.precompute(stage2_config(digits_dir, image_size=15), kl_dir,
                                      str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_conditioning_fields_text_and_arrays(tmp_path, kl_dir, digits_dir, monkeypatch):
    """Captions and variable-length boxes are carried; other images are not."""
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 255, (20, 24, 3), np.uint8),
                 "mask": rng.integers(0, 2, (20, 24), np.uint8),
                 "caption": np.asarray(f"digit number {i}".encode()),
                 "boxes": rng.normal(size=(i % 3, 4)).astype(np.float32),
                 "label": np.int64(i % 10)} for i in range(20)]

    class ListSource:
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return dict(examples[i])

    monkeypatch.setattr(precompute_lib.registry, "make_source", lambda cfg, split: ListSource())
    out = str(tmp_path / "caps")
    meta = precompute_lib.precompute(stage2_config(digits_dir, scale_factor=1.0), kl_dir,
                                         out, splits=["train"], batch_size=8, examples_per_shard=8)
    assert meta["conditioning_keys"] == ["boxes", "caption", "label"]
    assert meta["skipped_keys"] == ["mask"] and meta["num_shards"] == {"train": 3}
    rows = read_split(out, "train")
    for i, r in enumerate(rows):
        assert r["caption"] == f"digit number {i}".encode()
        np.testing.assert_array_equal(r["boxes"], examples[i]["boxes"])
        assert r["moments"].shape == (8, 8, 6) and int(r["index"]) == i


def test_pipeline_latents_source(kl_latents):
    out, meta = kl_latents
    cfg = config_defaults.data_config(source="latents", latents_dir=out, train_split="train",
                                      eval_split="test", label_key="label", random_flip=False,
                                      num_threads=0)
    kw = dict(global_batch_size=32, process_index=0, process_count=1)
    ref = [next(it) for it in [pipeline.make_train_iterator(cfg, seed=1, **kw)] for _ in range(6)]
    batch = ref[0]
    assert set(batch) == {"moments", "label", "index"}
    assert batch["moments"].shape == (32, 8, 8, 6) and batch["moments"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    stored = latents.latents_source(out, "train")
    i = int(batch["index"][5])
    np.testing.assert_array_equal(batch["moments"][5], stored[i]["moments"])
    assert batch["label"][5] == stored[i]["label"]
    # Deterministic, and resumable by start_step.
    again = pipeline.make_train_iterator(cfg, seed=1, **kw)
    resumed = pipeline.make_train_iterator(cfg, seed=1, start_step=4, **kw)
    for a, b in [(ref[0], next(again)), (ref[4], next(resumed)), (ref[5], next(resumed))]:
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Two hosts: the union of the host batches is the global batch.
    hosts = [next(pipeline.make_train_iterator(cfg, seed=1, global_batch_size=32,
                                               process_index=p, process_count=2))
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["moments"] for h in hosts]), ref[0]["moments"])
    # Eval: every test example once, with a mask; no label when label_key is None.
    cfg.label_key = None
    ev = list(pipeline.make_eval_iterator(cfg, **kw))
    assert set(ev[0]) == {"moments", "index", "mask"}
    idx = np.concatenate([b["index"][b["mask"]] for b in ev])
    assert sorted(idx) == list(range(299))
    # random_flip flips latents left-right (train only).
    cfg.random_flip = True
    flipped = next(pipeline.make_train_iterator(cfg, seed=1, **kw))
    np.testing.assert_array_equal(flipped["index"], batch["index"])
    same = [np.array_equal(f, m) for f, m in zip(flipped["moments"], batch["moments"])]
    mirrored = [np.array_equal(f, m[:, ::-1]) for f, m in zip(flipped["moments"], batch["moments"])]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 32
    info = pipeline.dataset_info(cfg)
    assert info["num_train_examples"] == 1498 and info["num_eval_examples"] == 299
    assert info["latent_key"] == "moments" and info["latent_shape"] == (8, 8, 3)
    assert info["image_shape"] == (16, 16, 3)


CONFIG_FILE = """
import ml_collections
from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.source_data = config_defaults.data_config(source="digits", data_dir={data_dir!r},
                                                image_size=16, num_threads=0)
    c.latents = ml_collections.ConfigDict(
        {{"scale_factor": -1.0, "scale_num_examples": 10_000, "seed": 0}})
    c.batch_size = 8
    c.mesh = ml_collections.ConfigDict({{"data": -1, "fsdp": 1}})
    return c
"""


def test_command_line(tmp_path, kl_latents, kl_dir, digits_dir, capsys):
    out, meta = kl_latents
    config = tmp_path / "stage2.py"
    config.write_text(CONFIG_FILE.format(data_dir=digits_dir))
    args = [f"--config={config}", f"--first_stage={kl_dir}", f"--output={out}",
            "--config.latents.seed=3", "--batch_size=64", "--examples_per_shard=512"]
    # Same settings as the finished run in `out`: nothing to do.
    assert precompute_latents.main(args) == 0
    assert "complete; nothing to do" in capsys.readouterr().out
    assert precompute_latents.main(args + ["--config.latents.sed=1"]) == 2
    assert "did you mean latents.seed" in capsys.readouterr().err.lower()
    assert precompute_latents.main(args[:-1] + ["--examples_per_shard=100"]) == 2
    assert "Refusing to mix" in capsys.readouterr().err


def test_serialization_does_not_depend_on_the_process(tmp_path):
    """A resumed run is a new process (another string hash seed): shard bytes must not change."""
    script = """
import sys
import numpy as np
from ldm_jax.data import latents
example = {"image": np.zeros((4, 4, 3), np.uint8), "label": np.int64(3), "id": np.int64(7),
           "caption": b"a three", "boxes": np.ones((2, 4), np.float32)}
features, kept, _ = latents.make_features(None, example, image_key="image", kind="kl",
                                          stored_shape=(2, 2, 6))
record = {k: example[k] for k in kept}
record.update(moments=np.arange(24, dtype=np.float32).reshape(2, 2, 6), index=5)
sys.stdout.write(latents.example_serializer(features)(record).hex())
"""
    import subprocess
    import sys

    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout)
    assert outs[0] == outs[1] and len(outs[0]) > 100
