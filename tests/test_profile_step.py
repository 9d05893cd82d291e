"""bench/profile_step.py's trace reading: the CPU thunks of a real trace, and the device
timeline of a GPU trace (synthetic events in the format XLA:GPU's profiler writes: kernels on
the '/device:GPU:0' process, each naming its HLO instruction in args['hlo_op'])."""

import argparse
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, profile_step


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

%fused_reduce (param_0: bf16[8,64,64,32]) -> bf16[8,64,64,32] {
  %param_0 = bf16[8,64,64,32]{3,2,1,0} parameter(0)
  %c = f32[] constant(0)
  %r = f32[8]{0} reduce(%param_0, %c), dimensions={1,2,3}, to_apply=%add
  ROOT %b = bf16[8,64,64,32]{3,2,1,0} broadcast(%r), dimensions={0}
}

ENTRY %main (p0: bf16[8,64,64,32], p1: bf16[3,3,32,32]) -> bf16[8,64,64,32] {
  %p0 = bf16[8,64,64,32]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,32,32]{3,2,1,0} parameter(1)
  %custom-call.3 = (bf16[8,64,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/input_blocks_1_0/conv_general_dilated"}
  %custom-call.4 = (bf16[3,3,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p0), custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(input_blocks_1_0))/conv_general_dilated"}
  %custom-call.5 = (bf16[512,512]{1,0}, s8[4194304]{0}) custom-call(%p1, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/middle_block_1/dot_general"}
  %fusion.12 = bf16[8,64,64,32]{3,2,1,0} fusion(%p0), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(step)/jvp(output_blocks_2_0)/reduce_sum"}
  ROOT %gte = bf16[8,64,64,32]{3,2,1,0} get-tuple-element(%custom-call.3), index=0
}
"""


def _gpu_events():
    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid,
                              "args": {"name": name}}
    kernel = lambda pid, name, op, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name,
                                         "ts": 0, "dur": dur, "args": {"hlo_op": op}}
    return [
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
        # kernels of a CUDA graph: hlo_op names the command buffer; a fusion's kernel is named
        # after its instruction, library kernels are classed by name
        kernel(1, "fusion_12", "command_buffer_7", 40.0),
        kernel(1, "nvjet_sm90_tss_64x512_64x2_2x1_v_bz_coopB_NNT", "command_buffer_7", 30.0),
        kernel(1, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "command_buffer_7",
               25.0),
        kernel(1, "memcpy128", "command_buffer_7", 5.0),
    ]


def test_gpu_trace_reads_the_device_timeline_only():
    index = profile_step._hlo_index(GPU_HLO)
    events = _gpu_events()
    ops, on_device = profile_step.op_events(events, index)
    assert on_device
    per_kind = {}
    for op, dur in ops:
        kind = profile_step._kind(op, *index[op]) if op in index else op
        per_kind[kind] = per_kind.get(kind, 0.0) + dur
    assert per_kind == {"conv forward": 120.0, "conv weight gradient": 300.0,
                        "dot (matmul) forward": 50.0,
                        "reduction fusion (norms, softmax sums)": 40.0,
                        "dot (cuBLAS GEMM inside a CUDA graph)": 30.0,
                        "attention (cuDNN fused)": 25.0,
                        "other kernels (memcpy, memset, ...)": 5.0}
    assert profile_step._BLOCK.search(index["custom-call.5"][0]).group(1) == "middle_block_1"


def test_a_saved_trace_gives_the_tables_again(tmp_path, capsys):
    # --save_trace on the GPU machine, --from_trace here: the file carries all report() needs.
    saved = {"events": _gpu_events(), "hlo": GPU_HLO, "step_ms": 0.95, "page_faults": 0,
             "conv": "xla", "machine": common.machine_info(None),
             "args": {"config": "configs/f4_celebahq.py", "width": 224, "batch": 48,
                      "size": 64, "channels": 3, "dtype": "bfloat16", "steps": 2}}
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(saved, f)
    args = argparse.Namespace(from_trace=str(path), ops="ALL", top=10, json=str(tmp_path / "o.json"))
    with gzip.open(args.from_trace, "rt") as f:
        loaded = json.load(f)
    for k, v in loaded["args"].items():
        setattr(args, k, v)
    profile_step.report(args, loaded)
    out = capsys.readouterr().out
    # 570 us of this step's kernels over 2 steps = 0.285 ms per step, 30 % of the 0.95 ms step
    assert "device kernels: 0.3 ms per step, 30 % of the untraced step" in out
    result = json.loads((tmp_path / "o.json").read_text())
    assert {r["kind"]: round(r["ms"], 4) for r in result["by_kind"]} == {
        "conv weight gradient": 0.15, "conv forward": 0.06, "dot (matmul) forward": 0.025,
        "reduction fusion (norms, softmax sums)": 0.02,
        "dot (cuBLAS GEMM inside a CUDA graph)": 0.015, "attention (cuDNN fused)": 0.0125,
        "other kernels (memcpy, memset, ...)": 0.0025}
    blocks = {r["block"]: round(r["ms"], 4) for r in result["by_block"]}
    assert blocks["output_blocks_2_0"] == 0.02
    assert blocks["(in a CUDA graph, unattributed)"] == 0.03
    assert result["on_device"] and result["args"]["width"] == 224


def test_a_bad_trace_file_exits_2_with_one_line(tmp_path, capsys):
    import pytest
    not_gzip = tmp_path / "plain.txt"
    not_gzip.write_text("hi")
    no_keys = tmp_path / "empty.json.gz"
    with gzip.open(no_keys, "wt") as f:
        json.dump({}, f)
    for path in (tmp_path / "missing.json.gz", not_gzip, no_keys):
        with pytest.raises(SystemExit) as e:
            profile_step.load_trace(str(path))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"--from_trace {path}: not a trace written by --save_trace")
        assert err.count("\n") == 1
