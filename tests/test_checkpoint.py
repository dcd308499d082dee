"""The loader: exact key coverage of real SD1/SD2 layouts, the variants seen in the wild, safety, errors."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdlite
from sdlite import checkpoint
from sdlite.checkpoint import (DDPM_BUFFERS, SD1_POSITION_IDS, detect_config, ema_key, guess_v_prediction,
                               networks_from_state_dict, read_checkpoint, state_dict_of)
from sdlite.config import SD1, SD2

from factory import TINY_SD1, TINY_SD2, original_state_dict, tsv_rows, tsv_state_dict

NOT_WEIGHTS = set(DDPM_BUFFERS) | {SD1_POSITION_IDS}


# -- exact key coverage of the real layouts ---------------------------------------------------

@pytest.mark.parametrize("version, preset", [("sd1", SD1), ("sd2", SD2)])
def test_every_key_of_the_real_layout_is_consumed_with_its_shape(version, preset):
    sd = tsv_state_dict(version)  # meta tensors: every key and shape of the real file, no memory
    cfg, nets = networks_from_state_dict(sd, {}, path=f"{version}.tsv", device="meta", dtype=torch.float32)
    assert cfg.version == version and cfg.unet == preset.unet and cfg.text == preset.text and cfg.vae == preset.vae
    consumed = {k: tuple(v.shape) for k, v in state_dict_of(nets, cfg).items()}
    listed = {k: shape for k, shape, _ in tsv_rows(version) if k not in NOT_WEIGHTS}
    assert consumed == listed
    # the only listed keys not loaded into a network are the schedule buffers and position_ids
    assert {k for k, _, _ in tsv_rows(version)} - set(consumed) <= NOT_WEIGHTS


@pytest.mark.parametrize("in_channels", [4, 5, 8, 9])
def test_unet_input_channels_are_detected_from_the_first_conv(in_channels):
    sd = tsv_state_dict("sd2" if in_channels == 5 else "sd1")
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(w.shape[0], in_channels, 3, 3, device="meta")
    cfg, _ = networks_from_state_dict(sd, {}, path="x", device="meta", dtype=torch.float16)
    assert cfg.in_channels == in_channels


def test_version_comes_from_shapes_not_the_file_name(tmp_path):
    sd = tsv_state_dict("sd2")
    cfg = detect_config(sd, {}, path=tmp_path / "sd-v1-4.ckpt")
    assert cfg.version == "sd2"


# -- the variants, on tiny models with the same key structure ---------------------------------

def _save(sd, path: Path, wrap: int = 0, extras: dict | None = None):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    obj = sd
    for _ in range(wrap):
        obj = {"state_dict": obj}
    if extras:
        obj = {**obj, **extras}
    torch.save(obj, path)
    return path


def _assert_loaded_equals(pipe, sd, dtype=torch.float32):
    got = state_dict_of({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}, pipe.config)
    for k, v in got.items():
        assert v.dtype == dtype
        torch.testing.assert_close(v, sd[k].to(dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("suffix, wrap", [(".safetensors", 0), (".ckpt", 0), (".ckpt", 1), (".ckpt", 2), (".pt", 1)])
def test_flat_and_wrapped_files_load_identically(tmp_path, suffix, wrap):
    sd = original_state_dict(TINY_SD1)
    path = _save(sd, tmp_path / f"model{suffix}", wrap=wrap)
    pipe = sdlite.load(path, device="cpu", config=TINY_SD1)
    _assert_loaded_equals(pipe, sd)


class _FakeModelCheckpoint:  # stands in for pytorch_lightning's class while the file is written
    def __init__(self):
        self.best_model_path = "/somewhere/last.ckpt"


def test_full_lightning_checkpoint_loads_without_pytorch_lightning_installed(tmp_path):
    mod_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(mod_name)
    _FakeModelCheckpoint.__module__, _FakeModelCheckpoint.__qualname__ = mod_name, "ModelCheckpoint"
    fake.ModelCheckpoint = _FakeModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name):
        sys.modules[name] = fake
    try:
        sd = original_state_dict(TINY_SD1)
        extras = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                  "callbacks": {_FakeModelCheckpoint: {"best_model_score": None}}}
        path = _save(sd, tmp_path / "sd-v1-4.ckpt", wrap=1, extras=extras)
    finally:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name):
            del sys.modules[name]
    assert "pytorch_lightning" not in sys.modules
    pipe = sdlite.load(path, device="cpu", config=TINY_SD1)
    _assert_loaded_equals(pipe, sd)
    assert "pytorch_lightning" not in sys.modules  # nothing imported it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("to", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:this CPU has no native bf16")  # the slow-CPU advice (test_devices.py)
def test_fp16_bf16_fp32_files_load_into_the_requested_dtype(tmp_path, dtype, to):
    sd = original_state_dict(TINY_SD1, dtype=dtype)
    path = _save(sd, tmp_path / "model.safetensors")
    pipe = sdlite.load(path, device="cpu", dtype=to, config=TINY_SD1)
    _assert_loaded_equals(pipe, sd, dtype=to)


@pytest.mark.parametrize("position_ids", ["int", "float", None])
@pytest.mark.parametrize("old_clip", [False, True])
def test_clip_variants_load(tmp_path, position_ids, old_clip):
    sd = original_state_dict(TINY_SD1, position_ids=position_ids, old_clip=old_clip)
    path = _save(sd, tmp_path / "model.ckpt", wrap=1)
    pipe = sdlite.load(path, device="cpu", config=TINY_SD1)
    _assert_loaded_equals(pipe, original_state_dict(TINY_SD1))


def test_ema_copies_are_ignored_by_default_and_used_on_request(tmp_path):
    sd = original_state_dict(TINY_SD1, ema=True)
    path = _save(sd, tmp_path / "full-ema.ckpt", wrap=1)
    plain = sdlite.load(path, device="cpu", config=TINY_SD1)
    _assert_loaded_equals(plain, sd)
    ema = sdlite.load(path, device="cpu", config=TINY_SD1, use_ema=True)
    w = "model.diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(ema.unet.state_dict()["input_blocks.0.0.weight"], sd[ema_key(w)], rtol=0, atol=0)
    assert ema_key(w) == "model_ema.diffusion_modelinput_blocks00weight"


def test_use_ema_on_a_file_without_ema_names_the_problem(tmp_path):
    path = _save(original_state_dict(TINY_SD1), tmp_path / "pruned.safetensors")
    with pytest.raises(sdlite.CheckpointError, match="no EMA copy"):
        sdlite.load(path, device="cpu", config=TINY_SD1, use_ema=True)


def test_sd2_layout_loads_and_pads_with_zero(tmp_path):
    sd = original_state_dict(TINY_SD2)
    path = _save(sd, tmp_path / "v2.safetensors")
    pipe = sdlite.load(path, device="cpu", config=TINY_SD2, prediction="v")
    _assert_loaded_equals(pipe, sd)
    assert pipe.config.prediction == "v"
    assert pipe.tokenizer(["a cat"])[0, -1].item() == 0


# -- save --------------------------------------------------------------------------------------

def test_load_save_load_gives_identical_tensors_and_keeps_the_config(tmp_path):
    sd = original_state_dict(TINY_SD1, dtype=torch.float16)
    pipe = sdlite.load(_save(sd, tmp_path / "a.ckpt", wrap=1), device="cpu", config=TINY_SD1)
    out = sdlite.save(pipe, tmp_path / "b.safetensors")
    again = sdlite.load(out, device="cpu")  # no config given: it comes from the file's metadata
    assert again.config == pipe.config
    _assert_loaded_equals(again, sd)
    keys, _ = read_checkpoint(out)
    assert set(keys) == set(k for k in sd if k not in NOT_WEIGHTS)
    # the file gets a new file's usual permissions (safetensors alone would make it 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_loading_with_consume_releases_the_file_tensors(tmp_path):
    # consume=True (what sdlite.load uses) empties the read dict, and nothing else keeps the fp16
    # file tensors alive once the fp32 copies exist.
    import gc
    import weakref

    sd = original_state_dict(TINY_SD1, dtype=torch.float16)
    kept = dict(sd)
    networks_from_state_dict(kept, {}, path="x", device="cpu", dtype=torch.float32, config=TINY_SD1)
    assert kept.keys() == sd.keys()  # the default leaves the caller's dict alone
    raw = dict(sd)
    del sd, kept
    refs = [weakref.ref(v) for v in raw.values()]
    _, nets = networks_from_state_dict(raw, {}, path="x", device="cpu", dtype=torch.float32, config=TINY_SD1,
                                       consume=True)
    gc.collect()
    assert raw == {} and all(r() is None for r in refs)
    assert next(nets["unet"].parameters()).dtype == torch.float32


def test_finish_sees_each_layer_once_right_after_its_own_tensors_are_converted():
    # sdlite.load packs each layer there (ops.Packer), before the next layer's weights are converted.
    sd = original_state_dict(TINY_SD1, dtype=torch.float16)
    seen = []

    def finish(layer):
        own = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        later = [t for m in layer.children() for t in m.parameters()]  # children come after their parent
        seen.append(layer)
        assert all(t.dtype == torch.float32 and not t.requires_grad for t in own if t.is_floating_point())
        assert all(t.dtype == torch.float16 for t in later)

    _, nets = networks_from_state_dict(sd, {}, path="x", device="cpu", dtype=torch.float32, config=TINY_SD1,
                                       finish=finish)
    every = [m for net in nets.values() for m in net.modules()]
    assert len(seen) == len(every) and {id(m) for m in seen} == {id(m) for m in every}


def test_save_refuses_to_overwrite(tmp_path):
    pipe = sdlite.load(_save(original_state_dict(TINY_SD1), tmp_path / "a.safetensors"), device="cpu",
                       config=TINY_SD1)
    target = tmp_path / "b.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(sdlite.CheckpointError, match="refusing to overwrite"):
        sdlite.save(pipe, target)
    assert target.read_bytes() == b"precious"


# -- prediction type ---------------------------------------------------------------------------

def test_prediction_argument_wins_over_yaml(tmp_path):
    path = _save(original_state_dict(TINY_SD2), tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert sdlite.load(path, device="cpu", config=TINY_SD2).config.prediction == "v"
    assert sdlite.load(path, device="cpu", config=TINY_SD2, prediction="eps").config.prediction == "eps"


def test_yaml_without_parameterization_means_eps(tmp_path):
    path = _save(original_state_dict(TINY_SD2), tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert sdlite.load(path, device="cpu", config=TINY_SD2).config.prediction == "eps"


@pytest.mark.parametrize("v_like, prediction, size", [(True, "v", 768), (False, "eps", 512)])
def test_sd2_without_yaml_takes_prediction_and_native_size_from_the_weight_test(tmp_path, monkeypatch, v_like,
                                                                                  prediction, size):
    # As A1111: 768-v-ema answers the weight test as a v model and draws at 768, 512-base at 512.
    path = _save(original_state_dict(TINY_SD2), tmp_path / "m.safetensors")
    seen = []
    monkeypatch.setattr(checkpoint, "guess_v_prediction", lambda unet, cfg: seen.append(cfg) or v_like)
    pipe = sdlite.load(path, device="cpu", config=TINY_SD2)
    assert seen == [TINY_SD2.unet]
    assert (pipe.config.prediction, pipe.config.image_size) == (prediction, size)


def test_sd1_without_yaml_is_eps_and_never_runs_the_weight_test(tmp_path, monkeypatch):
    path = _save(original_state_dict(TINY_SD1), tmp_path / "m.safetensors")
    monkeypatch.setattr(checkpoint, "guess_v_prediction", lambda unet, cfg: pytest.fail("weight test on SD1"))
    assert sdlite.load(path, device="cpu", config=TINY_SD1).config.prediction == "eps"


def test_yaml_with_an_unknown_parameterization_is_a_checkpoint_error_naming_it(tmp_path):
    path = _save(original_state_dict(TINY_SD2), tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "x0"\n')
    with pytest.raises(sdlite.CheckpointError, match="m.yaml: parameterization 'x0'"):
        sdlite.load(path, device="cpu", config=TINY_SD2)


@pytest.mark.parametrize("bias, expected", [(0.0, False), (-3.0, True)])
def test_v_prediction_weight_test_follows_a1111s_rule(bias, expected):
    """A model whose output at t=999 is far below its input (mean(out − x) < −1) is a v model."""
    nets = __import__("factory").random_networks(TINY_SD2)
    unet = nets["unet"]
    sd = unet.state_dict()
    sd["out.2.weight"] = torch.zeros_like(sd["out.2.weight"])
    sd["out.2.bias"] = torch.full_like(sd["out.2.bias"], 0.5 + bias)  # eps-like: out ≈ x (= 0.5)
    unet.load_state_dict(sd)
    assert guess_v_prediction(unet, TINY_SD2.unet) is expected


# -- errors and safety ---------------------------------------------------------------------------

def test_wrong_shape_names_the_key_with_expected_and_found_shapes(tmp_path):
    sd = original_state_dict(TINY_SD1)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    sd[key] = torch.zeros(7, 7, 3, 3)
    path = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(sdlite.CheckpointError) as e:
        sdlite.load(path, device="cpu", config=TINY_SD1)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "expected [32, 32, 3, 3], found [7, 7, 3, 3]" in msg


def test_stray_key_is_rejected_by_name(tmp_path):
    sd = original_state_dict(TINY_SD1)
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    sd["something_else.weight"] = torch.zeros(3)
    with pytest.raises(sdlite.CheckpointError, match="something_else.weight"):
        sdlite.load(_save(sd, tmp_path / "a.safetensors"), device="cpu", config=TINY_SD1)
    del sd["something_else.weight"]
    with pytest.raises(sdlite.CheckpointError, match="unexpected: model.diffusion_model.extra_head.weight"):
        sdlite.load(_save(sd, tmp_path / "b.safetensors"), device="cpu", config=TINY_SD1)


def test_missing_key_is_rejected_by_name(tmp_path):
    sd = original_state_dict(TINY_SD1)
    del sd["first_stage_model.decoder.conv_out.bias"]
    with pytest.raises(sdlite.CheckpointError, match="missing: first_stage_model.decoder.conv_out.bias"):
        sdlite.load(_save(sd, tmp_path / "a.safetensors"), device="cpu", config=TINY_SD1)


def test_full_size_wrong_shape_is_reported_on_the_real_layout():
    sd = tsv_state_dict("sd1")
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    sd[key] = torch.empty(1280, 1280, device="meta")  # an SD2-style linear proj_in in an SD1 file
    with pytest.raises(sdlite.CheckpointError, match=r"expected \[1280, 1280, 1, 1\], found \[1280, 1280\]"):
        networks_from_state_dict(sd, {}, path="merged.safetensors", device="meta", dtype=torch.float32)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_a_checkpoint_error(tmp_path, suffix):
    path = _save(original_state_dict(TINY_SD1), tmp_path / f"m{suffix}", wrap=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(sdlite.CheckpointError, match=str(path.name)) as e:
        sdlite.load(path, device="cpu")
    assert "may try to run code" not in str(e.value)  # damaged, not dangerous


def test_truncated_legacy_pickle_is_called_corrupt_not_dangerous(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save(original_state_dict(TINY_SD1), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(sdlite.CheckpointError, match="truncated or corrupt") as e:
        sdlite.load(path, device="cpu")
    assert "may try to run code" not in str(e.value)


def test_file_that_is_not_stable_diffusion_says_so(tmp_path):
    path = _save({"encoder.weight": torch.zeros(3)}, tmp_path / "lora.safetensors")
    with pytest.raises(sdlite.CheckpointError, match="not a Stable Diffusion checkpoint"):
        sdlite.load(path, device="cpu")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(sdlite.CheckpointError, match="no such checkpoint"):
        sdlite.load(tmp_path / "nope.ckpt")
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(sdlite.CheckpointError, match="folder.ckpt: is a directory, not a checkpoint file"):
        sdlite.load(tmp_path / "folder.ckpt")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(sdlite.CheckpointError, match="unknown checkpoint extension"):
        sdlite.load(tmp_path / "m.gguf")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_does_not_run(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    obj = {"state_dict": original_state_dict(TINY_SD1), "payload": _Evil(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(sdlite.CheckpointError, match="forbidden.*may try to run code"):
        sdlite.load(path, device="cpu", config=TINY_SD1)
    assert not marker.exists()
    # and the payload really works when unpickled unsafely, so the test can fail:
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_plain_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(sdlite.CheckpointError):
        sdlite.load(path, device="cpu")
    assert not marker.exists()


class _Scripted(torch.nn.Module):
    """A TorchScript module whose unpickling writes a file: torch.load hands such a zip to torch.jit.load,
    which runs __setstate__ outside any restricted unpickler."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.zeros(2)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.w, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        touched = torch.from_file(state[1], True, 8, dtype=torch.uint8)
        self.w = state[0] + 0 * touched.fill_(88).sum().float()
        self.marker, self.training = state[1], state[2]


def test_a_torchscript_archive_is_refused_before_its_code_runs(tmp_path):
    marker = tmp_path / "victim.bin"
    marker.write_bytes(bytes(8))
    path = tmp_path / "scripted.ckpt"
    torch.jit.save(torch.jit.script(_Scripted(str(marker))), str(path))
    with pytest.raises(sdlite.CheckpointError, match="TorchScript archive.*would run its own code"):
        sdlite.load(path, device="cpu")
    assert marker.read_bytes() == bytes(8)
    torch.jit.load(str(path))  # and the payload really runs when loaded unsafely, so the test can fail
    assert marker.read_bytes() == b"X" * 8


def test_a_state_dict_nested_in_itself_is_refused_not_looped_over(tmp_path):
    d = {"x": torch.zeros(1)}
    d["state_dict"] = d
    path = tmp_path / "loop.ckpt"
    torch.save(d, path)
    with pytest.raises(sdlite.CheckpointError, match="nested more than 8 deep"):
        sdlite.load(path, device="cpu", config=TINY_SD1)


def test_strided_tensors_in_a_pickle_compute_as_their_values(tmp_path):
    """A .ckpt may hold strided views (every other element of a larger storage). oneDNN reads a bias as
    contiguous memory whatever its strides: the text encoder was off by 2.8 on values of ~2.9."""
    sd = original_state_dict(TINY_SD1)
    strided = {k: torch.stack([v, torch.full_like(v, 1e3)], dim=-1)[..., 0] if v.dim() == 1 and v.is_floating_point()
               else v for k, v in sd.items()}
    assert not strided["first_stage_model.decoder.conv_out.bias"].is_contiguous()
    plain = sdlite.load(_save(sd, tmp_path / "plain.ckpt"), device="cpu", config=TINY_SD1)
    odd = sdlite.load(_save(strided, tmp_path / "strided.ckpt"), device="cpu", config=TINY_SD1)
    ids = plain.tokenizer(["a cat"])
    torch.testing.assert_close(odd.text_encoder(ids), plain.text_encoder(ids), rtol=0, atol=1e-6)
    z = torch.randn(1, TINY_SD1.vae.z_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(odd.vae.decode(z), plain.vae.decode(z), rtol=0, atol=1e-6)
    b = torch.stack([torch.randn(8), torch.zeros(8)], dim=-1)[..., 0]  # the layer itself, given a strided bias
    layer = sdlite.ops.Linear(4, 8).requires_grad_(False)
    layer.bias = torch.nn.Parameter(b, requires_grad=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (lambda sd: {"conditioner.embedders.0.transformer.x": torch.zeros(1), **sd}, "an SDXL checkpoint"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, "keys start with 'module.'"),
    (lambda sd: {**sd, checkpoint.UNET_IN: torch.zeros(32)}, "has shape \\[32\\], not 4 dimensions"),
])
def test_files_sdlite_cannot_read_say_why(tmp_path, change, match):
    path = _save(change(original_state_dict(TINY_SD1)), tmp_path / "m.safetensors")
    with pytest.raises(sdlite.CheckpointError, match=match):
        sdlite.load(path, device="cpu")


def test_a_config_in_the_metadata_that_cannot_build_the_networks_is_a_checkpoint_error(tmp_path):
    import json

    cfg = json.loads(TINY_SD1.to_json())
    cfg["unet"]["num_heads"] = 0  # a division by zero when the attention layers are built
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in original_state_dict(TINY_SD1).items()}, str(path),
              metadata={checkpoint.METADATA_KEY: json.dumps(cfg)})
    with pytest.raises(sdlite.CheckpointError, match="cannot build the networks.*pass config="):
        sdlite.load(path, device="cpu")


def test_save_refuses_a_directory_and_reports_an_unwritable_place_leaving_nothing_behind(tmp_path):
    pipe = sdlite.load(_save(original_state_dict(TINY_SD1), tmp_path / "m.safetensors"), device="cpu",
                       config=TINY_SD1)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(sdlite.CheckpointError, match="is a directory"):
        sdlite.save(pipe, tmp_path / "dir.safetensors", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(sdlite.CheckpointError, match="cannot write it"):
        sdlite.save(pipe, tmp_path / "file" / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "file", "m.safetensors"]
