"""ldm_jax/models/conv.py: the models' Conv is flax's Conv in parameters and forward pass, and
its GEMM weight gradient equals autodiff of XLA's convolution for every kernel / stride /
padding the models use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.config.loading import ConfigError
from ldm_jax.models import conv
from ldm_jax.models.conv import Conv


@pytest.fixture(autouse=True)
def _restore_default():
    yield
    conv.set_default_weight_grad("auto")


CASES = [  # kernel, stride, padding, input hw, cin, cout
    (3, 1, ((1, 1), (1, 1)), (9, 7), 5, 6),        # resblock conv
    (3, 2, ((1, 1), (1, 1)), (8, 10), 4, 4),       # UNet downsample
    (3, 2, ((0, 1), (0, 1)), (8, 8), 3, 5),        # first-stage downsample (asymmetric pad)
    (4, 2, ((1, 1), (1, 1)), (12, 12), 3, 8),      # PatchGAN
    (4, 1, ((1, 1), (1, 1)), (6, 6), 8, 1),        # PatchGAN head (even kernel, stride 1)
    (1, 1, ((0, 0), (0, 0)), (5, 5), 6, 3),        # skip / proj_in
    (3, 1, "SAME", (5, 6), 2, 3),
    (3, 1, "VALID", (5, 6), 2, 3),
]


@pytest.mark.parametrize("kernel,stride,padding,hw,cin,cout", CASES)
def test_same_parameters_and_forward_as_flax(kernel, stride, padding, hw, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, *hw, cin))
    kw = dict(features=cout, kernel_size=(kernel, kernel), strides=(stride, stride),
              padding=padding)
    ours, theirs = Conv(**kw), nn.Conv(**kw)
    p_ours = ours.init(jax.random.key(1), x)
    p_theirs = theirs.init(jax.random.key(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_ours, p_theirs)
    np.testing.assert_array_equal(ours.apply(p_ours, x), theirs.apply(p_theirs, x))


@pytest.mark.parametrize("kernel,stride,padding,hw,cin,cout", CASES)
def test_gemm_weight_gradient_matches_autodiff(kernel, stride, padding, hw, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, *hw, cin))
    module = lambda wg: Conv(cout, (kernel, kernel), (stride, stride), padding, weight_grad=wg)
    params = module("xla").init(jax.random.key(1), x)
    y = module("xla").apply(params, x)
    cot = jax.random.normal(jax.random.key(2), y.shape)

    def grads(wg):
        return jax.grad(lambda p, x: jnp.sum(module(wg).apply(p, x) * cot), argnums=(0, 1))(
            params, x)

    (gp_x, gx_x), (gp_g, gx_g) = grads("xla"), grads("gemm")
    np.testing.assert_array_equal(gx_g, gx_x)  # the input gradient is XLA's own in both
    scale = float(jnp.abs(gp_x["params"]["kernel"]).max())
    np.testing.assert_allclose(gp_g["params"]["kernel"], gp_x["params"]["kernel"],
                               rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(gp_g["params"]["bias"], gp_x["params"]["bias"], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_parameter_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    m = lambda wg: Conv(8, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16, weight_grad=wg)
    params = m("xla").init(jax.random.key(1), x)
    g = {wg: jax.grad(lambda p: jnp.sum(m(wg).apply(p, x).astype(jnp.float32) ** 2))(params)
         for wg in ("xla", "gemm")}
    assert g["gemm"]["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(g["gemm"]["params"]["kernel"], g["xla"]["params"]["kernel"],
                               rtol=0.05, atol=0.05 * float(jnp.abs(g["xla"]["params"]["kernel"]).max()))


def test_weight_gradient_selection():
    cpu = jax.default_backend() == "cpu"
    assert conv.resolve_weight_grad("auto") == ("gemm" if cpu else "xla")
    assert conv.resolve_weight_grad("auto", conv.AUTO_GEMM_MIN_ROWS) == ("gemm" if cpu else "xla")
    assert conv.resolve_weight_grad("auto", conv.AUTO_GEMM_MIN_ROWS - 1) == "xla"
    assert conv.resolve_weight_grad("gemm", 1) == "gemm"
    conv.set_default_weight_grad("xla")
    assert conv.resolve_weight_grad(None) == "xla"
    assert conv.resolve_weight_grad("gemm") == "gemm"  # the module field wins
    with pytest.raises(ValueError, match="conv_weight_grad='fast'"):
        conv.set_default_weight_grad("fast")


def test_config_switch_is_validated_and_applied():
    from ldm_jax.config import loading as config_lib
    from ldm_jax.tasks import make_task
    config = config_lib.load_config("configs/f4_celebahq.py:smoke")
    config.conv_weight_grad = "xla"
    make_task(config)
    assert conv.resolve_weight_grad(None) == "xla"
    config.conv_weight_grad = "cudnn"
    with pytest.raises(ConfigError, match="config.conv_weight_grad='cudnn'"):
        make_task(config)
