"""Tests for ldm_jax.models.lpips: weight loading from the public layouts and torch parity."""

import importlib.util
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import missing_reference, require
from ldm_jax.storage import weights_io as W
from ldm_jax.models import lpips as L

# torchvision vgg16 "features" config: channels per conv, "M" = 2x2 max-pool.
_TV_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_TAPS = (3, 8, 15, 22, 29)  # ReLU indices LPIPS reads (end of the lpips slices 1..5)
_SHAPE = (2, 32, 36, 3)  # 36 -> 18 -> 9 -> 4: an odd size exercises the pooling floor


def _random_public_state_dicts(seed=0):
    """Random weights in the public key layouts: torchvision vgg16 and lpips v0.1 lin heads."""
    rng = np.random.default_rng(seed)
    vgg, idx, c_in = {}, 0, 3
    for v in _TV_CFG:
        if v == "M":
            idx += 1
            continue
        std = np.sqrt(2.0 / (9 * c_in))  # He init keeps activations O(1) through 13 layers
        w = rng.standard_normal((v, c_in, 3, 3)) * std
        vgg[f"features.{idx}.weight"] = w.astype(np.float32)
        vgg[f"features.{idx}.bias"] = (rng.standard_normal(v) * 0.1).astype(np.float32)
        idx, c_in = idx + 2, v  # conv + ReLU
    # Classifier keys exist in the real file and must be ignored (tiny stand-ins here).
    vgg["classifier.0.weight"] = np.zeros((4, 8), np.float32)
    vgg["classifier.0.bias"] = np.zeros(4, np.float32)
    lin = {f"lin{k}.model.1.weight": (rng.random((1, c, 1, 1)) / c).astype(np.float32)
           for k, c in enumerate(L.LPIPS_CHANNELS)}
    return vgg, lin


def _torch_lpips(vgg, lin, x, y):
    """Independent LPIPS-VGG in PyTorch (float64, NCHW) from the raw public state dicts."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]

    def features(h):
        h, outs, idx = (h - shift) / scale, [], 0
        for v in _TV_CFG[:-1]:  # the final pool (features.30) comes after the last tap
            if v == "M":
                h, idx = F.max_pool2d(h, kernel_size=2, stride=2), idx + 1
                continue
            h = F.relu(F.conv2d(h, t(vgg[f"features.{idx}.weight"]),
                                t(vgg[f"features.{idx}.bias"]), padding=1))
            if idx + 1 in _TAPS:
                outs.append(h)
            idx += 2
        return outs

    def norm(f):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)

    fx = features(t(x).permute(0, 3, 1, 2))
    fy = features(t(y).permute(0, 3, 1, 2))
    total = 0
    for k, (a, b) in enumerate(zip(fx, fy)):
        d = F.conv2d((norm(a) - norm(b)) ** 2, t(lin[f"lin{k}.model.1.weight"]))
        total = total + d.mean(dim=(2, 3))
    return total[:, 0].numpy()


@pytest.fixture(scope="module")
def public_files(tmp_path_factory):
    torch = require("torch")
    vgg, lin = _random_public_state_dicts()
    d = tmp_path_factory.mktemp("lpips")
    # Both public files predate torch 1.6, so write them in the legacy (non-zip) format too.
    for sd, name in ((vgg, "vgg16-397923af.pth"), (lin, "vgg.pth")):
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, d / name,
                   _use_new_zipfile_serialization=False)
    return d / "vgg16-397923af.pth", d / "vgg.pth", vgg, lin


@pytest.fixture(scope="module")
def params(public_files):
    return L.load_lpips_params(public_files[0], public_files[1])


@pytest.fixture(scope="module")
def lpips_fn(params):
    return L.make_lpips_fn(params)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, _SHAPE).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(_SHAPE), -1, 1).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def jax_results(lpips_fn, images):
    """d(x, y), d(y, x), d(x, x) and gradients of sum d(x, y) -- one jit, one (slow) compile."""
    x, y = images
    # Zero a block of one image so some ReLU columns are all zero (NaN-gradient hazard).
    x = x.copy()
    x[1, 4:20, 6:30] = -1.0  # (x, y are float32 numpy arrays)

    n = x.shape[0]

    def run(fn, a, b):
        # One LPIPS call on stacked pairs (x,y), (y,x), (x,x): compile time grows with the
        # number of calls, not the batch size.
        lhs, rhs = jnp.concatenate([a, b, a]), jnp.concatenate([b, a, a])

        def loss(fn, lhs):
            d = fn(lhs, rhs)
            return d[:n].sum(), d

        (_, d), (g_fn, g_lhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(fn, lhs)
        return d[:n], d[n:2 * n], d[2 * n:], g_fn, g_lhs[:n]

    # The LPIPS fn is an argument (a pytree), so the VGG weights are not baked into the HLO.
    out = jax.jit(run)(lpips_fn, jnp.asarray(x), jnp.asarray(y))
    return x, y, jax.tree_util.tree_map(np.asarray, out)


def test_loader_layout_and_transpose(public_files, params):
    _, _, vgg, lin = public_files
    assert set(params) == {"vgg", "lin0", "lin1", "lin2", "lin3", "lin4"}
    assert list(params["vgg"]) == list(L.VGG16_CONV_NAMES)
    for idx, name in L.TORCHVISION_TO_FLAX.items():
        np.testing.assert_array_equal(params["vgg"][name]["kernel"],
                                      vgg[f"features.{idx}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(params["vgg"][name]["bias"], vgg[f"features.{idx}.bias"])
    for k, c in enumerate(L.LPIPS_CHANNELS):
        assert params[f"lin{k}"]["kernel"].shape == (c, 1)
        np.testing.assert_array_equal(params[f"lin{k}"]["kernel"][:, 0],
                                      lin[f"lin{k}.model.1.weight"].reshape(-1))
    # The Flax module's own parameter tree has exactly this structure.
    shapes = jax.eval_shape(lambda: L.LPIPS().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                                   jnp.zeros((1, 16, 16, 3))))["params"]
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == \
        jax.tree_util.tree_map(np.shape, params)


def test_parity_with_independent_torch_implementation(public_files, jax_results):
    _, _, vgg, lin = public_files
    x, y, (ours, *_) = jax_results
    ref = _torch_lpips(vgg, lin, x, y)
    assert ours.shape == (_SHAPE[0],) and ours.dtype == np.float32
    rel = np.max(np.abs(ours - ref) / np.abs(ref))
    print(f"LPIPS parity: jax f32 {ours} vs torch f64 {ref}, max rel err {rel:.2e}")
    assert rel <= 1e-5


def test_identity_symmetry_positivity(jax_results):
    _, _, (d_xy, d_yx, d_xx, _, _) = jax_results
    assert np.all(d_xy > 0)
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
    # Mathematically 0 (and exactly 0 op-by-op); under jit XLA:CPU may fuse the two halves of
    # the batch differently (last-bit differences of the normalised features): ~1e-16 residue.
    assert np.all(np.abs(d_xx) <= 1e-12 * max(1.0, float(d_xy.max())))


def test_grad_is_finite_and_params_frozen(jax_results):
    _, _, (_, _, _, g_params, g_x) = jax_results
    assert all(np.all(p == 0) for p in jax.tree_util.tree_leaves(g_params))  # stop_gradient
    assert np.all(np.isfinite(g_x)) and np.abs(g_x).max() > 0
    # _unit_normalize of an all-zero vector: value 0 and a finite gradient (plain sqrt -> NaN).
    gz = jax.grad(lambda f: L._unit_normalize(f).sum())(jnp.zeros((2, 4)))
    assert bool(jnp.all(jnp.isfinite(gz)))


def test_bfloat16_compute_dtype(public_files, params, images):
    x, y = (a[:1, :16, :16] for a in images)  # tiny: bf16 convs are emulated on CPU
    fn = L.make_lpips_fn(params, dtype=jnp.bfloat16)
    d = np.asarray(jax.jit(lambda fn, a, b: fn(a, b))(fn, x, y))
    assert d.dtype == np.float32  # distances are always reduced in float32
    np.testing.assert_allclose(d, _torch_lpips(public_files[2], public_files[3], x, y), rtol=0.05)


def test_combined_npz_and_safetensors_round_trip(params, tmp_path):
    for name in ("lpips_vgg.npz", "lpips_vgg.safetensors"):
        L.save_lpips_params_npz(params, tmp_path / name)
        back = L.load_lpips_params(tmp_path / name)
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    with np.load(tmp_path / "lpips_vgg.npz") as z:
        assert "vgg/conv1_1/kernel" in z.files and z["lin4/kernel"].shape == (512, 1)
    # {'params': ...} wrappers are accepted too.
    L.save_lpips_params_npz({"params": params}, tmp_path / "wrapped.npz")
    assert (tmp_path / "wrapped.npz").exists()


def test_full_lpips_module_state_dict_layout():
    vgg, lin = _random_public_state_dicts(seed=3)
    slices = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
    full = {"scaling_layer.shift": np.zeros((1, 3, 1, 1)),
            "scaling_layer.scale": np.ones((1, 3, 1, 1))}
    for key, v in vgg.items():
        if key.startswith("features."):
            idx = int(key.split(".")[1])
            s = next(s for s, lo, hi in slices if lo <= idx < hi)
            full[f"net.slice{s}.{idx}.{key.split('.')[2]}"] = v
    full.update(lin)
    a = L.lpips_params_from_state_dict(full)
    b = L.lpips_params_from_state_dict({**vgg, **lin})
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_missing_unknown_and_bad_shape_keys_are_reported():
    vgg, lin = _random_public_state_dicts(seed=4)
    sd = {**vgg, **lin}
    del sd["features.28.bias"], sd["lin3.model.1.weight"]
    sd["features.3.weight"] = np.zeros((1,), np.float32)  # index 3 is a ReLU: unknown key
    sd["extra.thing"] = np.zeros(1)
    sd["features.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as e:
        L.lpips_params_from_state_dict(sd)
    msg = str(e.value)
    for s in ("features.3.weight", "extra.thing", "vgg/conv5_3/bias", "lin3/kernel",
              "features.0.weight: (64, 3, 5, 5)", "vgg16-397923af.pth", "vgg.pth"):
        assert s in msg, s


def test_vgg_file_without_lin_file_is_reported(public_files):
    with pytest.raises(ValueError, match=r"missing parameters \['lin0/kernel'"):
        L.load_lpips_params(public_files[0])
    with pytest.raises(ValueError, match="both define"):
        L.load_lpips_params(public_files[0], public_files[0])


def test_real_lpips_package_lin_weights(public_files, images):
    """Parity with the ``lpips`` package: its shipped v0.1 linear heads, the SAME random VGG16.

    ``lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True)`` loads the shipped
    ``weights/v0.1/vgg.pth`` heads over a randomly initialised torchvision VGG16 (no download).
    We read that same ``vgg.pth`` with our torch-free loader, take the VGG weights from the
    package model's state dict (``net.slice{s}.N.*`` layout) and compare distances.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        missing_reference("lpips", "its shipped weights/v0.1/vgg.pth is the reference")
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")
    lin = W.load_weights(path)  # restricted unpickler, no torch
    assert sorted(lin) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k, c in enumerate(L.LPIPS_CHANNELS):
        assert lin[f"lin{k}.model.1.weight"].shape == (1, c, 1, 1)
        assert lin[f"lin{k}.model.1.weight"].min() >= 0  # shipped non-negative
    params = L.load_lpips_params(public_files[0], path)
    np.testing.assert_array_equal(params["lin2"]["kernel"][:, 0],
                                  lin["lin2.model.1.weight"].reshape(-1))

    torch = require("torch")
    require("torchvision")
    lpips = require("lpips")

    with torch.random.fork_rng():  # torchvision's VGG init draws from the global torch RNG
        torch.manual_seed(0)
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
        with torch.no_grad():  # torchvision zero-inits conv biases; make them non-trivial
            for m in ref.net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.bias.normal_(0.0, 0.1)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    for k in range(5):  # the package model really carries the shipped heads
        np.testing.assert_array_equal(sd[f"lin{k}.model.1.weight"], lin[f"lin{k}.model.1.weight"])
    # 'lins.{k}' are aliases of 'lin{k}' in the module's state dict; the heads come from the file.
    vgg = {k: v for k, v in sd.items() if k.startswith(("net.", "scaling_layer."))}
    params = L.lpips_params_from_state_dict({**vgg, **lin}, source="lpips package model")

    x, y = images
    ours = np.asarray(jax.jit(lambda fn, a, b: fn(a, b))(L.make_lpips_fn(params), x, y))
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        want = ref.double()(t(x), t(y)).reshape(-1).numpy()  # float64 reference
        want32 = ref.float()(t(x).float(), t(y).float()).reshape(-1).numpy()
    rel = np.max(np.abs(ours - want) / np.abs(want))
    rel_t = np.max(np.abs(want32 - want) / np.abs(want))
    print(f"lpips package parity: jax f32 {ours} vs lpips f64 {want}, max rel err {rel:.2e} "
          f"(lpips f32 vs f64 {rel_t:.2e})")
    assert np.all(want > 0) and rel <= 1e-5


def test_require_lpips_weights(tmp_path):
    for empty in (None, "", []):
        with pytest.raises(ValueError) as e:
            L.require_lpips_weights(empty, "loss.lpips_weights")
        for s in ("loss.lpips_weights", "vgg16-397923af.pth", "vgg.pth", "lpips", ".npz"):
            assert s in str(e.value), s
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights"):
        L.require_lpips_weights(str(tmp_path / "missing.npz"), "loss.lpips_weights")
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    assert L.require_lpips_weights(f"{a},{b}", "f") == (str(a), str(b))
    assert L.require_lpips_weights([a, b], "f") == (str(a), str(b))
    assert L.require_lpips_weights(a, "f") == (str(a), None)


def test_input_validation():
    with pytest.raises(ValueError, match="B, H, W, 3"):
        L.LPIPS().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 4)))
