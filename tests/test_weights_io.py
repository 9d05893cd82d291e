"""Tests for ldm_jax.storage.weights_io: torch zip checkpoints, the restricted unpickler, safetensors."""

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from conftest import require
from ldm_jax.storage import weights_io as W


# ----------------------------------------------------------------------------- helpers


def _write_torch_zip(path, pkl_bytes, storages=None, byteorder="little"):
    """A torch-style zip checkpoint written without torch (for torch-free tests)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl_bytes)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")


def _tensor_pickle(storage_type, numel, offset, size, stride):
    """Hand-assembled pickle equivalent to what torch writes for one tensor (storage key '0')."""
    tup = lambda xs: b"(" + b"".join(b"I%d\n" % v for v in xs) + b"t"  # noqa: E731
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(Vstorage\nctorch\n" + storage_type.encode() + b"\nV0\nVcpu\nI%d\ntQ" % numel
            + b"I%d\n" % offset + tup(size) + tup(stride)
            + b"I00\nccollections\nOrderedDict\n)RtR.")


def _legacy_tensor_pickle(style, numel, offset, size, stride):
    """Pre-1.6 pickles: 6-field persistent ids; ``_rebuild_tensor`` (torch 0.2/0.3) or the
    ``torch.FloatTensor`` + BUILD form of torch 0.1.x."""
    tup = lambda xs: b"(" + b"".join(b"I%d\n" % v for v in xs) + b"t"  # noqa: E731
    pid = b"(Vstorage\nctorch\nFloatStorage\nV0\nVcuda:0\nI%d\nNtQ" % numel
    args = pid + b"I%d\n" % offset + tup(size) + tup(stride)
    if style == "rebuild":
        return b"\x80\x02ctorch._utils\n_rebuild_tensor\n(" + args + b"tR."
    return b"\x80\x02ctorch\nFloatTensor\n)R(" + args + b"tb."


def _write_legacy(path, main_pickle, storages):
    """Header pickles, main pickle, key list, then per storage int64 count + raw bytes."""
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                    "little_endian": True}):
            f.write(pickle.dumps(obj, protocol=2))
        f.write(main_pickle)
        f.write(pickle.dumps(list(storages), protocol=2))
        for arr in storages.values():
            f.write(struct.pack("<q", arr.size) + arr.tobytes())


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _bits(arr):
    """Bit pattern view so comparisons are exact for every dtype (bfloat16, NaNs, ...)."""
    arr = np.ascontiguousarray(arr)
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}")) if arr.dtype.itemsize in (1, 2, 4, 8) \
        else arr


def _torch_to_numpy(t):
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------- torch-free


def test_missing_file_raises_file_not_found(tmp_path):
    for fn in (W.load_torch_state_dict, W.load_safetensors, W.load_weights, W.load_npz):
        with pytest.raises(FileNotFoundError, match="not found"):
            fn(tmp_path / "nope.pth")


def test_forbidden_global_raises_and_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _write_torch_zip(path, pickle.dumps({"w": _Evil(f"touch {marker}")}, protocol=2))
    with pytest.raises(W.UnsafeCheckpointError, match=f"{os.system.__module__}.system"):
        W.load_torch_checkpoint(path)
    with pytest.raises(W.UnsafeCheckpointError):
        W.load_torch_state_dict(path)
    assert not marker.exists()
    # Stub mode: an inert placeholder, still nothing executed.
    obj = W.load_torch_checkpoint(path, unknown_globals="stub")
    assert isinstance(obj["w"], W.OpaqueObject)
    assert obj["w"].global_name == f"{os.system.__module__}.system"
    assert obj["w"].args == (f"touch {marker}",)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02cbuiltins\neval\n(V1+1\ntR.",
    b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\nobject\nV__class__\ntR.",
    b"\x80\x02c__builtin__\nexec\n(Vx=1\ntR.",
    b"\x80\x02csubprocess\nPopen\n(Vtrue\ntR.",
])
def test_other_dangerous_globals_rejected(tmp_path, payload):
    path = tmp_path / "evil.pt"
    _write_torch_zip(path, payload)
    with pytest.raises(W.UnsafeCheckpointError, match="non-allowlisted global"):
        W.load_torch_checkpoint(path)


def test_handcrafted_tensor_and_bounds_check(tmp_path):
    data = np.arange(4, dtype=np.float32)
    ok = tmp_path / "ok.pt"
    _write_torch_zip(ok, _tensor_pickle("FloatStorage", 4, 1, (3,), (1,)), {"0": data.tobytes()})
    np.testing.assert_array_equal(W.load_torch_checkpoint(ok), data[1:])
    # A view reaching past its storage must be refused (as_strided would read foreign memory).
    bad = tmp_path / "bad.pt"
    _write_torch_zip(bad, _tensor_pickle("FloatStorage", 4, 2, (2, 2), (2, 1)),
                     {"0": data.tobytes()})
    with pytest.raises(W.UnsupportedCheckpointError, match="exceeds its storage"):
        W.load_torch_checkpoint(bad)


@pytest.mark.parametrize("storage,dtype", [("FloatStorage", np.float32),
                                           ("BFloat16Storage", ml_dtypes.bfloat16),
                                           ("LongStorage", np.int64)])
def test_big_endian_byteorder_record(tmp_path, storage, dtype):
    values = np.array([1.5, -2.25, 3.0, 4.0]).astype(dtype)
    swapped = values.view(np.uint8).reshape(4, -1)[:, ::-1].tobytes()
    path = tmp_path / "be.pt"
    _write_torch_zip(path, _tensor_pickle(storage, 4, 0, (2, 2), (1, 2)), {"0": swapped},
                     byteorder="big")
    out = W.load_torch_checkpoint(path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(_bits(out), _bits(values.reshape(2, 2).T))


@pytest.mark.parametrize("style", ["rebuild", "setstate"])
def test_handcrafted_legacy_file(tmp_path, style):
    data = np.arange(12, dtype=np.float32)
    path = tmp_path / "legacy.pth"
    _write_legacy(path, _legacy_tensor_pickle(style, 12, 2, (2, 3), (1, 2)), {"0": data})
    np.testing.assert_array_equal(W.load_torch_checkpoint(path),
                                  np.lib.stride_tricks.as_strided(data[2:], (2, 3), (4, 8)))
    _write_legacy(path, _legacy_tensor_pickle(style, 12, 2, (4, 4), (4, 1)), {"0": data})
    with pytest.raises(W.UnsupportedCheckpointError, match="exceeds its storage"):
        W.load_torch_checkpoint(path)


def test_non_checkpoint_files(tmp_path):
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(W.UnsupportedCheckpointError, match="not a PyTorch checkpoint"):
        W.load_torch_state_dict(plain)
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as zf:
        zf.writestr("m/constants.pkl", b"")
    with pytest.raises(W.UnsupportedCheckpointError, match="TorchScript"):
        W.load_torch_checkpoint(script)


def test_find_and_flatten_state_dict():
    a, b = np.ones(2), np.zeros(3)
    ckpt = {"state_dict": {"enc": {"w": a}, "dec.b": b}, "global_step": 3, "optimizer_states": []}
    assert W.find_state_dict(ckpt) is ckpt["state_dict"]
    assert W.flatten_state_dict(ckpt["state_dict"]) == {"enc.w": a, "dec.b": b}
    assert W.find_state_dict({"x": a}) == {"x": a}
    assert W.find_state_dict({"ema": {"m": {"x": a}}}, key="ema/m") == {"x": a}
    with pytest.raises(KeyError, match="available"):
        W.find_state_dict(ckpt, key="nope")
    with pytest.raises(ValueError, match="could not locate"):
        W.find_state_dict({"global_step": 3})


# ----------------------------------------------------------------------------- safetensors / npz


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-9, 9, (4,)),
        "u8": rng.integers(0, 255, (7,)).astype(np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "f8": np.array([1.0, -0.5], ml_dtypes.float8_e4m3fn),
    }
    path = tmp_path / "t.safetensors"
    W.save_safetensors(tensors, path, metadata={"note": "x"})
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    out = W.load_safetensors(path)
    assert list(out) == list(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        np.testing.assert_array_equal(_bits(out[k]), _bits(v))
    assert W.load_weights(path).keys() == tensors.keys()


def test_safetensors_reader_on_handwritten_file(tmp_path):
    w = np.arange(4, dtype="<f4").reshape(2, 2)
    b = np.array([1.0, 2.0, -3.0], ml_dtypes.bfloat16)
    header = {"__metadata__": {"k": "v"},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + w.tobytes() + b.tobytes())
    out = W.load_safetensors(path)
    np.testing.assert_array_equal(out["w"], w)
    np.testing.assert_array_equal(_bits(out["b"]), _bits(b))
    header["w"]["data_offsets"] = [0, 12]  # inconsistent with shape -> clear error
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + w.tobytes() + b.tobytes())
    with pytest.raises(W.UnsupportedCheckpointError, match="inconsistent offsets"):
        W.load_safetensors(path)


def test_safetensors_interop_with_reference_package(tmp_path):
    st = require("safetensors.numpy")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
    st.save_file(tensors, str(tmp_path / "ref.safetensors"))
    out = W.load_safetensors(tmp_path / "ref.safetensors")
    W.save_safetensors(tensors, tmp_path / "ours.safetensors")
    back = st.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], v)
        np.testing.assert_array_equal(back[k], v)


def test_load_weights_dispatch(tmp_path):
    arrays = {"x": np.arange(3, dtype=np.float32)}
    np.savez(tmp_path / "w.npz", **arrays)
    np.testing.assert_array_equal(W.load_weights(tmp_path / "w.npz")["x"], arrays["x"])
    (tmp_path / "w.npz").rename(tmp_path / "w.weights")  # unknown suffix: sniffed
    np.testing.assert_array_equal(W.load_weights(tmp_path / "w.weights")["x"], arrays["x"])
    W.save_safetensors(arrays, tmp_path / "s.data")
    np.testing.assert_array_equal(W.load_weights(tmp_path / "s.data")["x"], arrays["x"])
    (tmp_path / "junk.xyz").write_bytes(b"hello world")
    with pytest.raises(W.UnsupportedCheckpointError, match="cannot tell"):
        W.load_weights(tmp_path / "junk.xyz")


# ----------------------------------------------------------------------------- with torch


def test_torch_round_trip_dtypes_and_views(tmp_path):
    torch = require("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(),
        f64=torch.randn(2, generator=g).double(),
        i64=torch.randint(-100, 100, (4, 2), generator=g),
        i32=torch.randint(-100, 100, (3,), generator=g).int(),
        u8=torch.randint(0, 255, (5,), generator=g).to(torch.uint8),
        boolean=torch.rand(4, generator=g) > 0.5,
        f8=torch.randn(4, generator=g).to(torch.float8_e4m3fn),  # raw-bytes storage path
        transposed=base.t(),                   # non-contiguous
        offset_view=base[2:5, 3:7],            # storage offset + row stride 8
        strided=base[::2, ::3],                # step slicing
        expanded=torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        scalar=torch.tensor(7.5),
        empty=torch.zeros(0, 5),
    )
    sd["shared"] = base  # shares its storage with the views above
    tagged = torch.arange(3.0)
    tagged.note = "python attribute"  # pickled via _rebuild_from_type_v2
    sd["tagged"] = tagged
    path = tmp_path / "sd.pth"
    torch.save(sd, path)
    out = W.load_torch_state_dict(path)
    assert list(out) == list(sd)
    for k, t in sd.items():
        ref = _torch_to_numpy(t) if t.dtype != torch.float8_e4m3fn \
            else t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        assert out[k].dtype == ref.dtype and out[k].shape == ref.shape, k
        np.testing.assert_array_equal(_bits(out[k]), _bits(ref), err_msg=k)
        assert out[k].flags.c_contiguous and out[k].flags.writeable
    # Results are independent copies, not aliases of a shared storage buffer.
    out["offset_view"][0, 0] = 123.0
    assert out["shared"][2, 3] != 123.0


def test_torch_lightning_style_nested_checkpoint(tmp_path):
    torch = require("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 5, 5)).sum().backward()
    opt.step()
    ckpt = {"state_dict": model.state_dict(), "global_step": 12, "epoch": 1,
            "optimizer_states": [opt.state_dict()], "hyper_parameters": {"lr": 1e-4},
            "pytorch-lightning_version": "1.4.2", "params": [torch.nn.Parameter(torch.ones(2))]}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    raw = W.load_torch_checkpoint(path)
    assert raw["global_step"] == 12 and raw["hyper_parameters"] == {"lr": 1e-4}
    np.testing.assert_array_equal(raw["params"][0], np.ones(2, np.float32))  # nn.Parameter
    exp_avg = raw["optimizer_states"][0]["state"][0]["exp_avg"]
    np.testing.assert_array_equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"].numpy())
    sd = W.load_torch_state_dict(path)
    assert set(sd) == set(model.state_dict())
    for k, t in model.state_dict().items():
        np.testing.assert_array_equal(sd[k], t.numpy(), err_msg=k)
    assert sd["1.num_batches_tracked"].dtype == np.int64
    # Explicit key and the generic dispatcher agree.
    assert W.load_torch_state_dict(path, key="state_dict").keys() == sd.keys()
    assert W.load_weights(path).keys() == sd.keys()
    # Plain (unwrapped) state dict and keep_vars=True Parameters.
    torch.save(model.state_dict(keep_vars=True), tmp_path / "plain.bin")
    plain = W.load_weights(tmp_path / "plain.bin")
    np.testing.assert_array_equal(plain["0.weight"], model[0].weight.detach().numpy())


def test_torch_saved_evil_object_is_refused(tmp_path):
    torch = require("torch")
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": _Evil(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(W.UnsafeCheckpointError):
        W.load_torch_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    # Stub mode loads the tensors and keeps the evil object inert.
    sd = W.load_torch_state_dict(tmp_path / "evil.pt", unknown_globals="stub")
    np.testing.assert_array_equal(sd["w"], np.ones(2, np.float32))
    assert not marker.exists()


def test_torch_legacy_format_round_trip(tmp_path):
    """The public torchvision / lpips weight files predate the zip format."""
    torch = require("torch")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 6, generator=g)
    sd = OrderedDict(w=torch.randn(4, 3, 3, 3, generator=g),
                     half=torch.randn(3, generator=g).half(),
                     bf16=torch.randn(3, generator=g).bfloat16(), long=torch.arange(5),
                     view=base[1:4, ::2], t=base.t(), base=base,
                     p=torch.nn.Parameter(torch.ones(2)), scalar=torch.tensor(2.0))
    marker = tmp_path / "pwned"
    torch.save({"state_dict": sd, "epoch": 3, "nested": [(base[0],)]}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    raw = W.load_torch_checkpoint(tmp_path / "old.pth")
    assert raw["epoch"] == 3
    np.testing.assert_array_equal(raw["nested"][0][0], base[0].numpy())
    out = W.load_torch_state_dict(tmp_path / "old.pth")
    assert list(out) == list(sd)
    for k, t in sd.items():
        np.testing.assert_array_equal(_bits(out[k]), _bits(_torch_to_numpy(t)), err_msg=k)
    torch.save({"w": torch.ones(1), "evil": _Evil(f"touch {marker}")}, tmp_path / "evil.pth",
               _use_new_zipfile_serialization=False)
    with pytest.raises(W.UnsafeCheckpointError):
        W.load_torch_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
