"""bench.common's accelerator helpers, checked on CPU: the host FLOP count, the torch rows on a
GPU, the peak matmul record."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from bench import common


def test_host_lowered_flops_counts_a_matmul_exactly():
    a = jnp.ones((64, 128), jnp.float32)
    b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    assert common.host_lowered_flops(jnp.dot, (a, b)) == 2 * 64 * 128 * 32


def test_host_lowered_flops_keeps_static_arguments():
    def f(x, n):
        for _ in range(n):
            x = x @ x
        return x
    x = np.ones((16, 16), np.float32)
    assert common.host_lowered_flops(f, (x, 3), static_argnums=(1,)) == 3 * 2 * 16 ** 3


def test_xla_flops_on_an_accelerator_path_matches_the_compiled_count():
    from unittest import mock

    def f(x, w):
        return jnp.tanh(x @ w) @ w.T
    args = (np.ones((8, 32), np.float32), np.ones((32, 16), np.float32))
    compiled = common.xla_flops(f, args)
    with mock.patch.object(common, "on_accelerator", lambda: True):
        host = common.xla_flops(f, args)
    assert compiled >= 2 * 2 * 8 * 32 * 16
    assert abs(host - compiled) / compiled < 0.05


def test_torch_variants_on_a_gpu_give_one_row_per_mode():
    a = types.SimpleNamespace(torch_modes="eager, eager_cl,compile", torch_threads="1,2",
                              torch_device="cuda")
    assert list(common.torch_variants(a)) == [(None, "eager", "torch eager cuda"),
                                              (None, "eager_cl", "torch eager_cl cuda"),
                                              (None, "compile", "torch compile cuda")]
    a.torch_device = "cpu"
    assert [name for _, _, name in common.torch_variants(a)] == [
        "torch eager 1T", "torch eager_cl 1T", "torch compile 1T",
        "torch eager 2T", "torch eager_cl 2T", "torch compile 2T"]


def test_matmul_peak_records_dtype_and_size():
    out = common.matmul_peak_gflops(n=256, reps=1, dtype="bfloat16")
    assert out["dtype"] == "bfloat16" and out["n"] == 256
    assert out["peak"] == out["jax"] > 0


def test_flops_only_matches_the_compiled_step_with_the_gpu_choices():
    """train_step.py --flops_only counts the task step as a GPU run does (XLA convolutions,
    'xla' attention) without compiling it; the compiled count of that program agrees."""
    import functools

    from bench import train_step
    from ldm_jax.tasks.diffusion import DiffusionTask
    # A namespace, not parse_args: the scripts' parser re-executes the process with malloc
    # tunables (ldm_jax/cli/host_memory.py), which must not happen inside pytest.
    a = types.SimpleNamespace(config="configs/f4_celebahq.py", width=32, batch=2, size=16,
                              channels=3, dtype="float32")
    counted = train_step.print_task_flops(a)
    config, _ = common.diffusion_config(a.config, width=32, size=16, channels=3, batch=2,
                                        conv_impl="xla")
    common.set_field(config, "model.attention_impl", "xla")
    task = DiffusionTask(config)
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    batch = {task.input_key: jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)}
    compiled = common.xla_flops(functools.partial(task.train_step, phase="main"),
                                (state, batch, task.constants()), host=False)
    assert counted > 1e9
    assert abs(counted - compiled) / compiled < 0.05, (counted, compiled)


def test_xla_flops_counts_the_model_not_the_formulation():
    """Every formulation of a conv + attention layer counts as XLA's convolution and 'xla'
    attention: the GEMM weight gradient (which multiplies the zero padding) and chunked
    attention walking its (batch, head) groups in a loop (whose body the analysis counts once)
    would each give another number."""
    from unittest import mock

    from ldm_jax.models import attention, chunked_attention, conv

    def step(conv_impl, attn_impl):
        def loss(x, w):
            y = conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), weight_grad=conv_impl)
            q = y.reshape(4, 64, 4, 8)
            return jnp.sum(attention.attention(q, q, q, implementation=attn_impl) ** 2)
        return jax.grad(loss, argnums=(0, 1))

    args = (np.ones((4, 8, 8, 32), np.float32), np.full((3, 3, 32, 32), 0.01, np.float32))
    # Groups of 2 of the 16 (batch, head) pairs: the chunked loop runs 8 times.
    with mock.patch.object(chunked_attention, "MAX_STEP_ELEMENTS", 2 * 64 * 64):
        reference = common.xla_flops(step("xla", "xla"), args)
        for impls in (("gemm", "chunked"), ("gemm", "xla"), ("xla", "chunked")):
            assert common.xla_flops(step(*impls), args) == reference, impls
        # Counted as they run, the formulations differ (what the count above avoids).
        raw = lambda impls: common.flops_of(jax.jit(step(*impls)).lower(*args).compile())
        assert raw(("xla", "chunked")) < raw(("xla", "xla")) < raw(("gemm", "xla"))
    # Forward + both gradients of the convolution alone are at least 3 x 2 x 4*8*8*9*32*32.
    assert reference > 3 * 2 * 4 * 8 * 8 * 9 * 32 * 32


def test_a_misspelt_part_or_torch_mode_exits_2_naming_the_flag(capsys):
    import pytest
    assert common.checked_list("--parts", "unet, ae", ("unet", "ae")) == ["unet", "ae"]
    for text in ("bogus", "unet,aee", ","):
        with pytest.raises(SystemExit) as e:
            common.checked_list("--parts", text, ("unet", "ae"))
        assert e.value.code == 2
        assert "--parts" in capsys.readouterr().err
    a = types.SimpleNamespace(torch_modes="eager,compiled", torch_device="cpu", torch_threads="2")
    with pytest.raises(SystemExit):
        list(common.torch_variants(a))
    assert "use some of: eager, eager_cl, compile" in capsys.readouterr().err
