"""FID Inception in Flax vs pytorch-fid's InceptionV3 under the same random weights.

The weight file is produced the way the public one was: the torch state dict of pytorch-fid's FID
Inception, saved with ``torch.save`` under the public file name. pytorch-fid then loads the same
file through its own (monkeypatched, download-free) ``load_state_dict_from_url`` with
``strict=True``, which also proves the generated key layout is exactly the real one.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import require
from ldm_jax.evaluation import inception as I
from ldm_jax.evaluation.statistics import frechet_distance

torch = require("torch")
pfid = require("pytorch_fid.inception")
fid_score = require("pytorch_fid.fid_score")


def _fid_inception_skeleton():
    """pytorch-fid's ``fid_inception_v3()`` graph without its weight download."""
    torchvision = require("torchvision")
    inc = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
    inc.Mixed_5b = pfid.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = pfid.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = pfid.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = pfid.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = pfid.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = pfid.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = pfid.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = pfid.FIDInceptionE_1(1280)
    inc.Mixed_7c = pfid.FIDInceptionE_2(2048)
    return inc


def _randomise(module, seed=0):
    """Non-trivial random weights: He-normal convs and random BN affine *and* running stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.7 + 0.6 * torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    inc = _fid_inception_skeleton()
    _randomise(inc)
    path = tmp_path_factory.mktemp("fid") / I.FID_WEIGHTS_FILE
    sd = inc.state_dict()
    torch.save(sd, path)
    return path, {k: v.numpy().copy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def torch_fid_model(weights):
    path = weights[0]
    mp = pytest.MonkeyPatch()
    calls = []

    def fake_download(url, progress=True):
        calls.append(url)
        return torch.load(path, map_location="cpu")

    mp.setattr(pfid, "load_state_dict_from_url", fake_download)
    try:
        model = pfid.InceptionV3([3], resize_input=True, normalize_input=True,
                                 use_fid_inception=True).eval()
    finally:
        mp.undo()
    assert calls == [pfid.FID_WEIGHTS_URL] and pfid.FID_WEIGHTS_URL == I.FID_WEIGHTS_URL
    return model


@pytest.fixture(scope="module")
def extractor(weights):
    return I.load_inception_extractor(weights[0])


def test_resize_matches_torch_bilinear():
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((64, 48), (299, 299)), ((7, 13), (5, 31)), ((512, 300), (299, 299)),
                             ((299, 299), (299, 299)), ((1, 3), (4, 2))]:
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(oh, ow),
                            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        ours = np.asarray(I.resize_bilinear_torch(jnp.asarray(x), oh, ow))
        assert ours.shape == ref.shape
        # Same two weights per output pixel as torch; only the summation order differs.
        np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-7, err_msg=f"{(h, w, oh, ow)}")


def test_features_and_logits_match_pytorch_fid(weights, torch_fid_model, extractor):
    sd = weights[1]
    rng = np.random.default_rng(1)
    # Non-square input exercises both resize matrices; pytorch-fid takes [0, 1] NCHW.
    x = rng.uniform(-1, 1, (3, 64, 48, 3)).astype(np.float32)
    x01 = torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ref32 = torch_fid_model(x01)[0][:, :, 0, 0].numpy()
        ref64 = torch_fid_model.double()(x01.double())[0][:, :, 0, 0].numpy()
    torch_fid_model.float()
    out = jax.jit(extractor)(extractor.params, jnp.asarray(x))
    pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
    assert pool.shape == (3, 2048) and pool.dtype == np.float32
    assert logits.shape == (3, 1008) and logits.dtype == np.float32
    assert extractor.name == "inception_v3_fid" and extractor.dim == 2048

    scale = np.abs(ref64).max()
    err32 = np.abs(pool - ref32).max() / scale
    err64 = np.abs(pool - ref64).max() / scale
    err_t = np.abs(ref32 - ref64).max() / scale
    big = np.abs(ref64) > 0.1 * scale  # elementwise, where features are not ~0
    elem = np.max(np.abs(pool - ref64)[big] / np.abs(ref64)[big])
    print(f"pool3 |feat| max {scale:.3f} mean {np.abs(ref64).mean():.3f}; max err / max|feat|: "
          f"jax-f32 vs torch-f32 {err32:.2e}, jax-f32 vs torch-f64 {err64:.2e}, torch-f32 vs "
          f"torch-f64 {err_t:.2e}; elementwise rel (|f|>0.1 max) vs f64 {elem:.2e}")
    assert scale > 0.1 and np.mean(ref64 > 0) > 0.5  # weights are non-degenerate
    # Measured ~3e-7 (normalised) and ~1.5e-6 (elementwise): our float32 stack is as close to
    # the float64 truth as torch's own float32 stack is. Bounds leave ~5x for other CPUs.
    assert err64 <= 2e-6 and err32 <= 2e-6 and elem <= 1e-5

    ref_logits = ref64.astype(np.float64) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
    lerr = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    print(f"logits max err / max|logit| vs f64 {lerr:.2e}")
    assert lerr <= 3e-6

    # FID on these features vs pytorch-fid's calculate_frechet_distance (same algorithm, f64).
    rng2 = np.random.default_rng(2)
    a = pool[:, :16].astype(np.float64)
    feats1 = np.concatenate([a, a + 0.1 * rng2.standard_normal(a.shape),
                             a * 1.1 + 0.05, a[::-1] - 0.2, a + 0.3 * rng2.standard_normal(a.shape),
                             rng2.standard_normal((20, 16))])
    feats2 = feats1 + 0.2 * rng2.standard_normal(feats1.shape) + 0.1
    args = (feats1.mean(0), np.cov(feats1, rowvar=False), feats2.mean(0),
            np.cov(feats2, rowvar=False))
    ours, ref = frechet_distance(*args), fid_score.calculate_frechet_distance(*args)
    print(f"FID ours {ours!r} pytorch-fid {ref!r} rel {abs(ours - ref) / abs(ref):.1e}")
    assert abs(ours - ref) <= 1e-9 * abs(ref)


def test_loader_layout_and_legacy_format(weights, extractor, tmp_path):
    path, sd = weights
    v = extractor.params
    np.testing.assert_array_equal(v["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
                                  sd["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"])
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
    n_leaves = len(jax.tree_util.tree_leaves(v))
    assert n_leaves == len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472
    # The pre-1.6 (non-zip) torch format reads to the same variables.
    legacy = tmp_path / I.FID_WEIGHTS_FILE
    torch.save({k: torch.from_numpy(a) for k, a in sd.items()}, legacy,
               _use_new_zipfile_serialization=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           I.load_inception_extractor(legacy).params, v)


def test_bad_weights_are_reported(weights, tmp_path):
    sd = dict(weights[1])
    del sd["Mixed_6b.branch7x7_2.bn.running_mean"]
    sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as e:
        I.inception_variables_from_state_dict(sd, source="my.pth")
    msg = str(e.value)
    for s in ("my.pth", "Mixed_6b.branch7x7_2.bn.running_mean", "AuxLogits.fc.weight",
              "fc.weight: (1000, 2048), expected (1008, 2048)", I.FID_WEIGHTS_URL):
        assert s in msg, s
    with pytest.raises(FileNotFoundError) as e:
        I.load_inception_extractor(tmp_path / "nope.pth")
    assert I.FID_WEIGHTS_URL in str(e.value) and "nope.pth" in str(e.value)


def test_input_validation(extractor):
    with pytest.raises(ValueError, match="NHWC"):
        extractor(extractor.params, jnp.zeros((8, 8, 3)))
    with pytest.raises(TypeError, match=r"\[-1, 1\]"):
        extractor(extractor.params, jnp.zeros((1, 8, 8, 3), jnp.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        jax.eval_shape(extractor, extractor.params, jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="image_size"):
        I.make_inception_extractor(extractor.params, image_size=32)


def test_sharded_extraction_matches_unsharded(weights):
    """Batch-sharded jit over the 8 fake devices == the single-device result."""
    # 75x75 (Inception's minimum) instead of 299 keeps this CPU test cheap; the graph is the
    # same apart from the resize target.
    ext = I.load_inception_extractor(weights[0], image_size=75)
    assert ext.name == "inception_v3_fid@75"
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    x = np.random.default_rng(3).uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)  # grey
    fn = jax.jit(ext, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P("data")))
    sharded = fn(ext.params, jnp.asarray(x))
    assert sharded["pool"].sharding.spec == P("data")
    plain = jax.jit(ext)(ext.params, jnp.asarray(np.repeat(x, 3, axis=-1)))
    for key in ("pool", "logits"):
        a, b = np.asarray(sharded[key]), np.asarray(plain[key])
        err = np.abs(a - b).max() / np.abs(b).max()
        print(f"sharded vs unsharded {key}: max err / max {err:.1e}")
        # Not bitwise: XLA:CPU picks conv/matmul loop orders per shape (batch 1 per device vs
        # 8), so float32 reduction order differs (measured ~6e-7 pool, ~1e-6 logits).
        assert err <= 1e-5
