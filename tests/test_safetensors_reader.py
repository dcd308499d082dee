"""sdlite's own .safetensors reader: the same tensors as the reference library, rejection of corrupt
files, and the page release (for .safetensors and zip .ckpt files) that keeps a fp16 -> fp32 load
at about the size of the model."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdlite
from sdlite.checkpoint import _read_safetensors, read_checkpoint, state_dict_of

from factory import TINY_SD1, original_state_dict


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A .safetensors file written by hand, to control offsets and alignment."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reads_the_same_tensors_and_metadata_as_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "i64": torch.arange(77),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "ü"})
    got, metadata, _ = _read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        assert metadata == f.metadata()
        assert set(got) == set(f.keys())
        for k in f.keys():
            ref = f.get_tensor(k)
            assert got[k].dtype == ref.dtype and got[k].shape == ref.shape, k
            assert torch.equal(got[k], ref), k


def test_misaligned_tensor_is_read_correctly(tmp_path):
    # Another writer may put a float32 tensor at an odd byte offset; views need alignment, so it is copied.
    values = torch.tensor([1.5, -2.0, 3.25])
    data = b"\x07" + values.numpy().tobytes()
    header = {"u8": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f32": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    got, _, _ = _read_safetensors(_write_raw(tmp_path / "odd.safetensors", header, data))
    assert got["u8"].tolist() == [7]
    assert torch.equal(got["f32"], values)


@pytest.mark.parametrize("case, match", [
    ("short", "shorter than the 8-byte header length"),
    ("header_too_long", "the header says it is"),
    ("not_json", "header is not a JSON object"),
    ("out_of_range", "lies at bytes"),
    ("wrong_size", "bytes for shape"),
    ("bad_dtype", "unreadable entry"),
    # the rules the safetensors package checks too (each was read, or crashed, before)
    ("overlap", "where the tensors before it end at 8"),  # aliased tensors
    ("hole", "where the tensors before it end at 0"),
    ("trailing", "the tensors end at byte 8 of a 12-byte data section"),
    ("shape_string", "unreadable entry"),  # "12" was read as [1, 2]
    ("shape_bool", "unreadable entry"),
    ("offset_infinite", "unreadable entry"),  # an OverflowError
    ("dim_2_64", "unreadable entry"),  # a TypeError
    ("deep", "header is not a JSON object"),  # a RecursionError
    ("duplicate", "a key appears twice: 'a'"),
    ("utf16", "header is not a JSON object"),
    ("metadata_list", "__metadata__ is not a map of strings"),
])
def test_corrupt_files_are_checkpoint_errors(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{" + bytes(8))
    elif case == "out_of_range":
        _write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
    elif case == "wrong_size":
        _write_raw(path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    elif case == "bad_dtype":
        _write_raw(path, {"a": {**ok["a"], "dtype": "F7"}}, bytes(8))
    elif case == "overlap":
        _write_raw(path, {**ok, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(8))
    elif case == "hole":
        _write_raw(path, {"a": {**ok["a"], "data_offsets": [4, 12]}}, bytes(12))
    elif case == "trailing":
        _write_raw(path, ok, bytes(12))
    elif case == "shape_string":
        _write_raw(path, {"a": {"dtype": "U8", "shape": "12", "data_offsets": [0, 2]}}, bytes(2))
    elif case == "shape_bool":
        _write_raw(path, {"a": {"dtype": "U8", "shape": [True, 2], "data_offsets": [0, 2]}}, bytes(2))
    elif case == "dim_2_64":
        _write_raw(path, {"a": {"dtype": "U8", "shape": [2**64, 0], "data_offsets": [0, 0]}}, b"")
    else:
        header = {"offset_infinite": b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, Infinity]}}',
                  "deep": b"[" * 100_000 + b"]" * 100_000,
                  "duplicate": b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                               b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                  "utf16": '{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'.encode("utf-16"),
                  "metadata_list": b'{"__metadata__": [], "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                  }[case]
        path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(1))
    with pytest.raises(sdlite.CheckpointError, match=match) as e:
        read_checkpoint(path)
    assert path.name in str(e.value)


def _resident_bytes(address: int) -> int:
    """Rss of the mapping that contains ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and first == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("address not in any mapping")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_release_drops_the_pages_of_a_converted_tensor_and_keeps_its_values(tmp_path):
    big = torch.randn(8 * 1024 * 1024, generator=torch.Generator().manual_seed(1)).half()  # 16 MiB
    path = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, str(path))
    tensors, _, release = _read_safetensors(path)
    t = tensors["big"]
    before = _resident_bytes(t.data_ptr())
    as_fp32 = t.float()  # touches every page of the tensor
    touched = _resident_bytes(t.data_ptr())
    assert touched - before >= 15 * 2**20
    release(t)
    assert _resident_bytes(t.data_ptr()) <= before + 2 * 4096  # at most the pages it shares with a neighbour
    assert torch.equal(t.float(), as_fp32)  # reading again re-reads the file
    release(torch.ones(4))  # a tensor that is not from the file: ignored
    assert torch.equal(tensors["small"], torch.ones(3))


def test_loading_in_the_file_dtype_shares_the_mapping_but_never_writes_the_file(tmp_path):
    sd = original_state_dict(TINY_SD1, dtype=torch.float32)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    before = path.read_bytes()
    pipe = sdlite.load(path, device="cpu", dtype=torch.float32, config=TINY_SD1)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(2)  # copy-on-write: the module's memory changes, the file does not
    assert path.read_bytes() == before
    got = state_dict_of({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}, pipe.config)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[key], 2 * sd[key])


def test_fp16_file_loaded_as_fp32_equals_the_file(tmp_path):
    # The pages of each converted tensor are released during the load; the converted weights stay right.
    sd = original_state_dict(TINY_SD1, dtype=torch.float16)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    pipe = sdlite.load(path, device="cpu", dtype=torch.float32, config=TINY_SD1)
    got = state_dict_of({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}, pipe.config)
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_zip_ckpt_release_drops_pages_of_torch_load_mapping(tmp_path):
    # torch.load(mmap=True) maps a zip .ckpt privately; the loader finds that mapping in
    # /proc/self/maps and releases converted tensors there too.
    from sdlite.checkpoint import _open_checkpoint

    big = torch.randn(8 * 1024 * 1024, generator=torch.Generator().manual_seed(2)).half()  # 16 MiB
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"big": big, "small": torch.ones(3)}}, path)
    tensors, _, release = _open_checkpoint(path)
    t = tensors["big"]
    before = _resident_bytes(t.data_ptr())
    as_fp32 = t.float()
    assert _resident_bytes(t.data_ptr()) - before >= 15 * 2**20
    release(t)
    assert _resident_bytes(t.data_ptr()) <= before + 2 * 4096
    assert torch.equal(t.float(), as_fp32)
    heap = torch.ones(1 << 20)
    release(heap)  # ordinary memory: never touched
    assert torch.equal(heap, torch.ones(1 << 20))


def test_legacy_pickle_has_no_release(tmp_path):
    from sdlite.checkpoint import _no_release, _open_checkpoint

    path = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    tensors, _, release = _open_checkpoint(path)
    assert release is _no_release and torch.equal(tensors["w"], torch.ones(4))


def test_file_system_without_mmap_falls_back_to_reading(tmp_path, monkeypatch):
    import mmap

    from sdlite.checkpoint import _no_release

    tensors = {"a": torch.randn(4, 3), "b": torch.arange(5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap raises on file systems that cannot map

    monkeypatch.setattr(mmap, "mmap", refuse)
    got, _, release = _read_safetensors(path)
    assert release is _no_release
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_ckpt_that_cannot_be_mapped_is_read_instead(tmp_path, monkeypatch):
    from sdlite.checkpoint import _no_release, _open_checkpoint

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, path)
    load = torch.load

    def no_mmap(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("unable to mmap")
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    tensors, _, release = _open_checkpoint(path)
    assert release is _no_release and torch.equal(tensors["w"], torch.arange(6.0))


def test_zip_ckpt_loads_where_the_mapping_cannot_be_found(tmp_path, monkeypatch):
    # Outside Linux there is no /proc/self/maps and (on Windows) no C library for ctypes to open:
    # the load must still work, without page release.
    from sdlite import checkpoint

    def no_libc():
        raise OSError("no C library")

    monkeypatch.setattr(checkpoint, "_mapped_ranges", lambda path: [])
    monkeypatch.setattr(checkpoint, "_libc_dontneed", no_libc)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, path)
    tensors, _, release = checkpoint._open_checkpoint(path)
    assert release is checkpoint._no_release and torch.equal(tensors["w"], torch.arange(6.0))


def test_null_metadata_is_read_as_none(tmp_path):
    """``"__metadata__": null`` is valid (the safetensors package reads it as no metadata)."""
    header = {"__metadata__": None, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    tensors, metadata = read_checkpoint(_write_raw(tmp_path / "null.safetensors", header, b"\x05"))
    assert metadata == {} and tensors["a"].tolist() == [5]
