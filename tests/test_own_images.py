"""Own images, the card's command: a folder of photos (train/ and test/, mixed sizes, modes and
aspect ratios) goes through stage 1, precompute_latents and stage 2 with
configs/f4_celebahq.py naming only the folder, the image size and width/step overrides (no
label key, latent shape, split or resolution overrides); a folder with class sub-folders trains
a class-conditional LDM that samples by class name.

The commands are README's "Train on your own images" section, read from README.md and run in a
scratch working directory with the folder substituted and step counts shrunk; they are also
README's two-stage pipeline with a folder as the data (checked below)."""

import json
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from ldm_jax import precompute_latents, sample, train

SIZE = 64
LDM = os.path.join(ROOT, "configs", "f4_celebahq.py")
# Width and step overrides only (a CPU-sized UNet, a few steps).
SMALL = ["--config.model.model_channels=32", "--config.model.num_res_blocks=1",
         "--config.batch_size=8",
         "--config.total_steps=2", "--config.checkpoint_every_steps=2",
         "--config.image_every_steps=0", "--config.eval_num_examples=8",
         "--config.eval_every_steps=2"]


def _photo(rng, mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return base.convert(mode) if mode != "RGB" else base


def write_folder(root, rng, classes=None, per_split=(10, 4)):
    """root/train|test[/<class>]/*.png|jpg of mixed modes, sizes and aspect ratios."""
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
    sizes = [(80, 64), (64, 96), (120, 70), (64, 64), (200, 150)]
    i = 0
    for split, count in zip(("train", "test"), per_split):
        for name in classes or [None]:
            folder = os.path.join(root, split, name) if name else os.path.join(root, split)
            os.makedirs(folder, exist_ok=True)
            for _ in range(count):
                mode, size = modes[i % len(modes)], sizes[i % len(sizes)]
                ext = "jpg" if mode == "CMYK" or (mode in ("RGB", "L") and i % 2) else "png"
                _photo(rng, mode, size).save(os.path.join(folder, f"img{i:03d}.{ext}"))
                i += 1
    return root


def readme_commands(section: str) -> list[list[str]]:
    """The `python -m ldm_jax.X ...` lines of a README section, as argv lists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    body = re.sub(r"\\\n\s+", " ", body)  # join continued lines
    lines = re.findall(r"^    (python -m ldm_jax\.\S+ .*)$", body, flags=re.M)
    return [shlex.split(line)[2:] for line in lines]  # drop "python -m"


def _run(argv: list[str], photos: str, extra=()) -> int:
    """Runs one README command with the test's folder and a CPU-sized run."""
    entry, args = argv[0], [a.replace("=photos", f"={photos}") for a in argv[1:]]
    # README commands run from the repository root; the test runs them from a scratch dir.
    args = [a.replace("--config=configs/", f"--config={ROOT}/configs/") for a in args]
    args = [a for a in args if not a.startswith("--config.total_steps=")]
    module = {"ldm_jax.train": train, "ldm_jax.precompute_latents": precompute_latents,
              "ldm_jax.sample": sample}[entry]
    return module.main(args + list(extra))


COMMANDS = readme_commands("Train on your own images")
STAGE1_TINY = ["--config.total_steps=2", "--config.checkpoint_every_steps=2",
               "--config.eval_every_steps=2", "--config.image_every_steps=0"]


def test_readme_two_stage_pipeline_is_the_own_images_one_with_other_data():
    own = [[a for a in c if not a.startswith(("--config.data.", "--config.source_data.",
                                               "--config.total_steps", "--config.model."))]
           for c in COMMANDS]
    paper = readme_commands("The two-stage pipeline")
    assert [c[0] for c in own[:4]] == [c[0] for c in paper]
    assert own[0][1].removesuffix(":smoke") == paper[0][1]  # the same first-stage config
    assert own[1] == paper[1] and own[2][1] == paper[2][1]  # precompute; stage 2's config


@pytest.fixture(scope="module")
def own_stage1(tmp_path_factory):
    """Stage 1 (VQ-f4 smoke) on an unlabelled folder: the section's first command."""
    work = tmp_path_factory.mktemp("own")
    photos = write_folder(str(work / "photos"), np.random.default_rng(0))
    old = os.getcwd()
    os.chdir(work)
    try:
        assert COMMANDS[0][0] == "ldm_jax.train" and "image_size=64" in COMMANDS[0][-1]
        assert _run(COMMANDS[0], photos, STAGE1_TINY) == 0
    finally:
        os.chdir(old)
    return work, photos


def test_own_images_unconditional_pipeline(own_stage1, monkeypatch, capsys):
    work, photos = own_stage1
    monkeypatch.chdir(work)
    assert _run(COMMANDS[1], photos) == 0  # precompute_latents
    meta = json.load(open("data/celebahq_vq_f4/1.0.0/ldm_latents.json"))
    assert meta["num_examples"] == {"train": 10, "test": 4}  # both splits stage 2 reads
    assert meta["latent_shape"] == [SIZE // 4, SIZE // 4, 3]
    assert _run(COMMANDS[2], photos, SMALL) == 0  # stage 2 with configs/f4_celebahq.py
    config = json.load(open("runs/ldm_photos/config.json"))
    assert config["data"]["latent_shape"] == [16, 16, 3] and config["model"]["in_channels"] == 3
    metrics = [json.loads(line) for line in open("runs/ldm_photos/metrics.jsonl")]
    assert any("eval_loss" in m for m in metrics)  # the held-out test split was read
    assert _run([a for a in COMMANDS[3] if not a.startswith("--num=")], photos,
                ["--num=2", "--steps=2"]) == 0
    images = np.load("samples/photos/samples.npz")["images"]
    assert images.shape == (2, SIZE, SIZE, 3)
    # A class-conditional run on these unlabelled latents: one line naming both fields.
    capsys.readouterr()
    assert train.main([f"--config={LDM}", "--workdir=runs/bad", "--config.conditioning.kind=class",
                       *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conditioning.kind" in err[0] and "data.label_key" in err[0]


def test_own_images_class_folders_sample_by_name(own_stage1, tmp_path, monkeypatch):
    work, _ = own_stage1
    photos = write_folder(str(tmp_path / "pets"), np.random.default_rng(1),
                          classes=["dog", "cat", "bird"], per_split=(3, 1))
    monkeypatch.chdir(work)
    source = ["--config.source_data.source=folder", f"--config.source_data.folder={photos}",
              f"--config.source_data.image_size={SIZE}"]
    assert precompute_latents.main([f"--config={LDM}", "--first_stage=runs/ae_vq_f4",
                                    "--output=data/pets", *source]) == 0
    meta = json.load(open("data/pets/1.0.0/ldm_latents.json"))
    assert meta["class_names"] == {"label": ["bird", "cat", "dog"]}  # sorted, as ImageFolder
    from ldm_jax.data import latents
    train_split = latents.latents_source("data/pets", "train")
    by_file = {}
    for i in range(len(train_split)):
        by_file.setdefault(int(train_split[i]["label"]), 0)
        by_file[int(train_split[i]["label"])] += 1
    assert by_file == {0: 3, 1: 3, 2: 3}
    assert train.main([f"--config={LDM}", "--workdir=runs/pets", "--config.data.latents_dir=data/pets",
                       "--config.conditioning.kind=class", "--config.conditioning.p_uncond=0.2",
                       *SMALL]) == 0
    config = json.load(open("runs/pets/config.json"))
    assert config["model"]["num_classes"] == 4  # 3 classes + the null label
    assert config["conditioning"]["class_names"] == ["bird", "cat", "dog"]
    assert sample.main(["--workdir=runs/pets", "--out=pet_samples", "--num=3", "--steps=2",
                        "--labels=dog,cat,2"]) == 0
    np.testing.assert_array_equal(np.load("pet_samples/samples.npz")["labels"], [2, 1, 2])
    assert sample.main(["--workdir=runs/pets", "--out=x", "--labels=horse"]) == 2
