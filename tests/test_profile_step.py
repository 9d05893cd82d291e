"""bench/profile_step.py's trace reading: the CPU thunks of a real trace, and the device
timeline of a GPU trace (synthetic events in the format XLA:GPU's profiler writes: kernels on
the '/device:GPU:0' process, each naming its HLO instruction in args['hlo_op'])."""

import jax
import jax.numpy as jnp
import numpy as np

from bench import profile_step


def test_cpu_trace_classes_a_convolution_and_a_matmul():
    def f(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y.reshape(-1, 16) @ m)

    args = (np.ones((2, 16, 16, 8), np.float32), np.ones((3, 3, 8, 16), np.float32),
            np.ones((16, 16), np.float32))
    compiled = jax.jit(f).lower(*args).compile()
    events = profile_step.trace_events(lambda: jax.block_until_ready(compiled(*args)), 2)
    index = profile_step._hlo_index(compiled.as_text())
    ops, on_device = profile_step.op_events(events, index)
    assert not on_device and ops
    kinds = {profile_step._kind(op, *index[op]) for op, _ in ops}
    assert "conv forward" in kinds and "dot (matmul) forward" in kinds, kinds


GPU_HLO = """HloModule jit_step

ENTRY %main (p0: bf16[8,64,64,32], p1: bf16[3,3,32,32]) -> bf16[8,64,64,32] {
  %p0 = bf16[8,64,64,32]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,32,32]{3,2,1,0} parameter(1)
  %custom-call.3 = (bf16[8,64,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/input_blocks_1_0/conv_general_dilated"}
  %custom-call.4 = (bf16[3,3,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p0), custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(input_blocks_1_0))/conv_general_dilated"}
  %custom-call.5 = (bf16[512,512]{1,0}, s8[4194304]{0}) custom-call(%p1, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/middle_block_1/dot_general"}
  ROOT %gte = bf16[8,64,64,32]{3,2,1,0} get-tuple-element(%custom-call.3), index=0
}
"""


def test_gpu_trace_reads_the_device_timeline_only():
    index = profile_step._hlo_index(GPU_HLO)
    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid,
                              "args": {"name": name}}
    kernel = lambda pid, name, op, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name,
                                         "ts": 0, "dur": dur, "args": {"hlo_op": op}}
    events = [
        meta(1, "/device:GPU:0"), meta(701, "/host:CPU"),
        # the host's launch of the same instructions: not device time
        kernel(701, "custom-call.3", "custom-call.3", 900.0),
        kernel(701, "custom-call.4", "custom-call.4", 900.0),
        # a cuDNN convolution running two kernels, its weight gradient, a cuBLAS GEMM
        kernel(1, "sm90_xmma_fprop_implicit_gemm_bf16", "custom-call.3", 100.0),
        kernel(1, "cudnn::reduce_kernel", "custom-call.3", 20.0),
        kernel(1, "sm90_xmma_wgrad_implicit_gemm_bf16", "custom-call.4", 300.0),
        kernel(1, "sm90_xmma_gemm_bf16bf16", "custom-call.5", 50.0),
        kernel(1, "some_other_program_kernel", "fusion.999", 7.0),  # not this step's
    ]
    ops, on_device = profile_step.op_events(events, index)
    assert on_device
    per_kind = {}
    for op, dur in ops:
        kind = profile_step._kind(op, *index[op])
        per_kind[kind] = per_kind.get(kind, 0.0) + dur
    assert per_kind == {"conv forward": 120.0, "conv weight gradient": 300.0,
                        "dot (matmul) forward": 50.0}
    assert profile_step._BLOCK.search(index["custom-call.5"][0]).group(1) == "middle_block_1"
