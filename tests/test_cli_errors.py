"""Every entry point reports a user's mistake as one line on stderr and exit status 2, without a
traceback: a malformed flag value, a path that does not exist, a config key that does not."""

import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SMOKE = os.path.join(ROOT, "configs", "ldm_digits.py:smoke")
AE_SMOKE = os.path.join(ROOT, "configs", "autoencoder_vq_f4.py:smoke")
MISSING = "/nonexistent/ldm_jax_path"

CASES = {
    # entry point: (wrong flag value, missing path, bad config key)
    "train": (
        [f"--config={SMOKE}", "--workdir=W", "--config.total_steps=many"],
        [f"--config={MISSING}.py", "--workdir=W"],
        [f"--config={SMOKE}", "--workdir=W", "--config.totl_steps=3"],
    ),
    "precompute_latents": (
        [f"--config={SMOKE}", f"--first_stage={MISSING}", "--output=O", "--batch_size=x"],
        [f"--config={SMOKE}", f"--first_stage={MISSING}", "--output=O"],
        [f"--config={SMOKE}", f"--first_stage={MISSING}", "--output=O", "--config.latents.sed=1"],
    ),
    "sample": (
        ["--workdir=W", "--out=O", "--num=abc"],
        [f"--workdir={MISSING}", "--out=O"],
        ["--workdir=W", "--out=O", "--config.modl.channels=3"],
    ),
    "evaluate": (
        ["--workdir=W", "--num_samples=x"],
        [f"--workdir={MISSING}", "--features=digits"],
        ["--workdir=W", "--config.modl.channels=3"],
    ),
    "export": (
        ["--workdir=W", "--output=O", "--step=last"],
        [f"--workdir={MISSING}", "--output=O"],
        ["--workdir=W", "--output=O", "--config.model.ch=3"],
    ),
    "convert": (
        [f"--source={MISSING}", "--output=O", "--to=pytorch"],
        [f"--source={MISSING}", "--output=O"],
        [f"--source={MISSING}", "--output=O", "--config.model.ch=3"],
    ),
}


def _main(name):
    module = importlib.import_module("ldm_jax.convert.__main__" if name == "convert"
                                     else f"ldm_jax.{name}")
    return module.main


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["bad_value", "missing_path", "bad_config_key"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_entry_point_reports_user_error_in_one_line(name, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative W / O paths land here (and do not exist)
    code = _main(name)(CASES[name][kind])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (name, kind, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]


def test_subprocess_user_error_has_no_traceback(tmp_path):
    """The same through `python -m`, as a user meets it (the bad config key of a real config)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "ldm_jax.train", f"--config={AE_SMOKE}",
                           f"--workdir={tmp_path / 'w'}", "--config.data.labl_key=None"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.label_key" in lines[0], done.stderr
