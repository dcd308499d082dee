"""Architecture tests of the two CLIP text encoders.

Tiny configs for shapes, dtypes, causality and meta-device loading; the full-size SD1/SD2 models
(built on the meta device) for checkpoint key/shape equality; and full-size fp32 numerical parity
with independent implementations fed the same random weights: Hugging Face ``CLIPTextModel``
(SD1) and open_clip's ViT-H-14 text tower driven as ``FrozenOpenCLIPEmbedder`` does (SD2).
Parity tolerance: max |ours - reference| <= 1e-4 * max |reference|.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

from sdlite import ops
from sdlite.clip import CLIPTextModel, OpenCLIPTextModel, build_text_encoder, tokenizer_for
from sdlite.config import SD1_TEXT, SD2_TEXT, TextConfig

from factory import tsv_shapes

PROMPTS = ["a photograph of an astronaut riding a horse", "(masterpiece:1.2), best quality, café “quotes”"]
TINY_CLIP = TextConfig(vocab_size=64, width=32, layers=3, heads=4, max_length=16)
TINY_OPENCLIP = TextConfig(
    kind="openclip", vocab_size=64, width=32, layers=3, heads=4, max_length=16, act="gelu",
    skip_last_layers=1, pad_id=0, projection_dim=24,
)
TINY = [TINY_CLIP, TINY_OPENCLIP]


def _max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _random_ids(cfg: TextConfig, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- tiny configs


@pytest.mark.parametrize("cfg", TINY, ids=lambda c: c.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_batch_by_tokens_by_width_in_parameter_dtype(cfg: TextConfig, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = build_text_encoder(cfg).to(dtype)
    with torch.no_grad():
        for n in (cfg.max_length, 5):
            out = model(_random_ids(cfg, 2, n))
            assert out.shape == (2, n, cfg.width) and out.dtype == dtype
            assert torch.isfinite(out).all()


def test_build_text_encoder_picks_the_class_by_kind() -> None:
    assert type(build_text_encoder(TINY_CLIP)) is CLIPTextModel
    assert type(build_text_encoder(TINY_OPENCLIP)) is OpenCLIPTextModel
    assert tokenizer_for(SD1_TEXT).pad_id == 49407 and tokenizer_for(SD2_TEXT).pad_id == 0


@pytest.mark.parametrize("cfg", TINY, ids=lambda c: c.kind)
def test_token_outputs_do_not_depend_on_later_tokens(cfg: TextConfig) -> None:
    torch.manual_seed(0)
    model = build_text_encoder(cfg)
    ids = _random_ids(cfg, 1, cfg.max_length)
    changed = ids.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("cfg", TINY, ids=lambda c: c.kind)
def test_skip_last_layers_stops_early_and_rejects_out_of_range(cfg: TextConfig) -> None:
    torch.manual_seed(0)
    model = build_text_encoder(cfg)
    ids = _random_ids(cfg, 2, 8)
    with torch.no_grad():
        default, last, penultimate = model(ids), model(ids, 0), model(ids, 1)
    torch.testing.assert_close(default, penultimate if cfg.skip_last_layers == 1 else last, rtol=0, atol=0)
    assert not torch.allclose(last, penultimate)
    for bad in (-1, cfg.layers):
        with pytest.raises(ValueError, match="skip_last_layers"):
            model(ids, bad)
    with pytest.raises(ValueError, match="tokens"):
        model(_random_ids(cfg, 1, cfg.max_length + 1))


@pytest.mark.parametrize("cfg", TINY, ids=lambda c: c.kind)
def test_meta_construction_then_assign_load_reproduces_the_model(cfg: TextConfig) -> None:
    torch.manual_seed(0)
    model = build_text_encoder(cfg)
    assert list(model.buffers()) == []  # nothing outside the state dict's parameters
    with torch.device("meta"):
        loaded = build_text_encoder(cfg)
    loaded.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    ids = _random_ids(cfg, 2, cfg.max_length)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_forward_leaves_the_input_ids_unchanged() -> None:
    model = build_text_encoder(TINY_CLIP)
    ids = _random_ids(TINY_CLIP, 2, 8)
    before = ids.clone()
    with torch.no_grad():
        model(ids)
    assert torch.equal(ids, before)


# ---------------------------------------------------------------- full size: checkpoint layout


def test_sd1_state_dict_equals_checkpoint_keys_and_shapes() -> None:
    expected = tsv_shapes("sd1.tsv", "cond_stage_model.transformer.")
    # position_ids is a buffer in the HF model; the loader drops it.
    del expected["text_model.embeddings.position_ids"]
    with torch.device("meta"):
        model = build_text_encoder(SD1_TEXT)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_sd2_state_dict_equals_checkpoint_keys_and_shapes() -> None:
    expected = tsv_shapes("sd2.tsv", "cond_stage_model.model.")
    with torch.device("meta"):
        model = build_text_encoder(SD2_TEXT)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


# ---------------------------------------------------------------- full size: numerical parity


def test_sd1_matches_transformers_clip_text_model_within_1e_4_relative() -> None:
    import transformers  # noqa: F401  (a missing reference must fail, not skip)
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,  # EOS only matters for pooling
    )
    hf_cfg._attn_implementation = "eager"  # the plain softmax(QK^T) path, not SDPA like ours
    reference = transformers.CLIPTextModel(hf_cfg).eval()

    # transformers 5 drops the "text_model." level that SD1 checkpoints (and our names) keep.
    sd = {k: v for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    with torch.device("meta"):
        ours = CLIPTextModel(SD1_TEXT)
    ours.load_state_dict(sd, strict=True, assign=True)  # shares the reference's tensors
    ops.pack(ours.requires_grad_(False))  # as sdlite.load runs it on the CPU (packed copies)
    assert ours.text_model.encoder.layers[0].mlp.fc1.weight.is_mkldnn == (torch.float32 in ops.ONEDNN_GEMM)

    ids = tokenizer_for(SD1_TEXT)(PROMPTS)
    with torch.no_grad():
        out = reference(input_ids=ids, output_hidden_states=True)
        ref_last = out.last_hidden_state
        ref_skip1 = getattr(reference, "text_model", reference).final_layer_norm(out.hidden_states[-2])
        diff_last, diff_skip1 = _max_rel_diff(ours(ids), ref_last), _max_rel_diff(ours(ids, 1), ref_skip1)
    assert diff_last <= 1e-4 and diff_skip1 <= 1e-4, (diff_last, diff_skip1)
    del reference, ours, sd, out
    gc.collect()


def _import_open_clip() -> types.ModuleType:
    """Import open_clip with throwaway stubs for the modules this venv lacks.

    open_clip needs torchvision only for image transforms, and ftfy needs wcwidth only for
    terminal display; neither is used by the text tower.
    """
    if importlib.util.find_spec("transformers") is not None:
        # open_clip imports transformers, whose availability probes must not see the stubs.
        importlib.import_module("transformers")
    missing = [name for name in ("torchvision", "wcwidth") if importlib.util.find_spec(name) is None]
    if "torchvision" in missing:
        missing += ["torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
                    "torchvision.ops.misc"]

    class _AnyAttribute(type):  # placeholder class whose attributes are placeholders too
        def __getattr__(cls, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return _AnyAttribute(name, (), {})

    class _Stub(types.ModuleType):
        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return _AnyAttribute(name, (), {})

    for name in missing:
        sys.modules[name] = _Stub(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        return importlib.import_module("open_clip")
    except ImportError as exc:
        raise RuntimeError(f"open_clip (the SD2 reference) is not importable: {exc}") from exc
    finally:
        for name in missing:  # so other code does not mistake the stubs for the real modules
            sys.modules.pop(name, None)


def test_sd2_matches_open_clip_vit_h_14_penultimate_layer_within_1e_4_relative() -> None:
    open_clip = _import_open_clip()
    from open_clip.model import _build_text_tower

    torch.manual_seed(0)
    model_cfg = open_clip.get_model_config("ViT-H-14")
    tower = _build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"]).eval()  # text side only

    sd = dict(tower.state_dict())
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # lives on the full CLIP model, not the tower
    with torch.device("meta"):
        ours = OpenCLIPTextModel(SD2_TEXT)
    ours.load_state_dict(sd, strict=True, assign=True)  # shares the tower's tensors
    ops.pack(ours.requires_grad_(False))  # as sdlite.load runs it on the CPU (packed copies)
    assert ours.transformer.resblocks[0].mlp.c_fc.weight.is_mkldnn == (torch.float32 in ops.ONEDNN_GEMM)

    ids = tokenizer_for(SD2_TEXT)(PROMPTS)
    assert ids[0, -1] == 0  # SD2 pads with 0
    with torch.no_grad():
        # FrozenOpenCLIPEmbedder.encode_with_transformer(layer="penultimate"). open_clip 3.x blocks
        # are batch-first, so the original's NLD <-> LND permutes are not needed.
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[: len(tower.transformer.resblocks) - 1]:
            x = block(x, attn_mask=tower.attn_mask)
        reference = tower.ln_final(x)
        diff = _max_rel_diff(ours(ids), reference)
    assert diff <= 1e-4, diff
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, nn.GELU)
    del tower, ours, sd, x, reference
    gc.collect()
