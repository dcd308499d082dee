#!/usr/bin/env python
"""sdlite and diffusers side by side on the CPU, with the same weights, in one run.

Both libraries get the SAME tensors: an SD1.5-size model (``--size sd15``) with seeded random
weights in the original CompVis layout, loaded into sdlite's networks and, through diffusers' own
converters of that layout (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), into ``UNet2DConditionModel`` / ``AutoencoderKL`` /
transformers ``CLIPTextModel``. Every row alternates between the two libraries (ABBA order) after a
warm-up, and reports the median and the minimum of each side and the ratio of the medians
(sdlite / diffusers: below 1 means sdlite is faster, or smaller for memory rows).

Rows (``--rows``):

- ``text``     text encoder, batch 2 x 77 tokens;
- ``unet64``   one UNet call at batch 2 (cond + uncond of classifier-free guidance), 64x64 latents;
- ``unet32``   the same at 32x32 latents;
- ``unet32b8`` the same at batch 8 (four images with classifier-free guidance: ``--n_samples 4``);
- ``vae64``    VAE decode of one 64x64 latent (a 512x512 image);
- ``vaeenc``   VAE encode of one 512x512 image into a 64x64 latent (the first step of img2img);
- ``txt2img``  a whole 256x256 generation, 10 Euler steps, CFG 7.5: sdlite ``Pipeline.txt2img`` vs
               diffusers ``StableDiffusionPipeline`` + ``EulerDiscreteScheduler``, same prompt and
               same starting latents;
- ``load``     a ~2 GB fp16 ``.safetensors`` in the original layout, each load in a fresh process
               (time, and peak RSS: ``VmHWM``, i.e. ``ru_maxrss`` of that process alone): ``sdlite.load`` vs
               ``StableDiffusionPipeline.from_single_file`` with a local config directory (offline);
- ``mem512``   peak RSS of a process that loads that file and draws one 512x512 image
               (``--mem-steps`` steps).

Precisions (``--precisions``): ``fp32``; ``bf16`` (bf16 weights); ``autocast`` (fp32 weights under
``torch.autocast("cpu", bfloat16)``). The run measures the machine's matmul peak
(``torch.mm`` of large fp32 and bf16 matrices) at its start and at its end; each network row is also
given as a fraction of the larger of the two, with FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device. On a CPU without native bf16
(no AVX512-BF16/AMX) bf16 convolutions and matmuls are ~100x slower than fp32; there the bf16
precisions run only the rows without convolutions (text encoder; the load in bf16) unless
``--force-bf16`` is given.

Usage (from the repository root; see benchmarks/README.md)::

    python benchmarks/bench.py                       # everything, SD1.5 size, fp32 (+ bf16 where native)
    python benchmarks/bench.py --quick --size tiny   # smoke run: 1 repeat, narrow model, seconds
    python benchmarks/bench.py --rows unet32,text --precisions fp32 --threads 2
    python benchmarks/bench.py --profile --levers    # + a torch.profiler table and backend micro-benchmarks

Not a test: nothing here asserts; the numbers go to ``--out`` (default benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest.mock import patch

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # sdlite, when it is not installed
sys.path.insert(0, str(ROOT / "tests"))  # factory.py: the seeded random weights the parity tests use too

from sdlite.checkpoint import DDPM_BUFFERS, SD1_POSITION_IDS, build_networks, state_dict_of  # noqa: E402
from sdlite.config import SD1, ModelConfig, TextConfig, UNetConfig, VAEConfig  # noqa: E402
import sdlite.ops as ops  # noqa: E402
from sdlite import cpu_kernels  # noqa: E402

from factory import random_state_dict  # noqa: E402

ROWS = ("text", "unet64", "unet32", "unet32b8", "tome64", "vae64", "vaeenc", "txt2img", "load", "mem512", "vae2048", "bundled")
# The UNet rows: name, latent side, batch (2: one image with classifier-free guidance).
UNET_ROWS = (("unet64", 64, 2), ("unet32", 32, 2), ("unet32b8", 32, 8))
FIRST_STEP_LATENT = 64  # the load row's first UNet step after the load (SIZES["tiny"] runs it too)
QUICK_ROWS = ("text", "unet32", "txt2img", "load")
PRECISIONS = ("fp32", "bf16", "autocast")
PROMPT = "a photograph of an astronaut riding a horse"
SIDES = ("sdlite", "diffusers")

# --size: "sd15" is the real thing; "tiny" keeps every block of SD1.5 (same levels, attention
# resolutions, heads, layer counts) at a tenth of the width, so a smoke run goes through every code
# path in seconds. Its numbers say nothing about SD1.5 speed.
SIZES: dict[str, ModelConfig] = {
    "sd15": SD1,
    "tiny": SD1.with_(
        unet=UNetConfig(model_channels=32, context_dim=64),
        vae=VAEConfig(ch=32),
        text=TextConfig(width=64, layers=2, heads=4),
    ),
}


# ---------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------

def cpu_facts() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or "unknown", "logical_cpus": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                info["model"] = value.strip()
            elif key == "cpu cores":
                info["cores_per_socket"] = int(value)
            elif key == "flags":
                flags = set(value.split())
                info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                                             "amx_tile", "avx_vnni") if f in flags]
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def script_head(title: str, machine: str = "", versions: str = "") -> list[str]:
    """The first lines of a small script's markdown report: its title, then the machine (with
    ``machine`` appended), date, commit and torch (with ``versions``), and the command that ran it."""
    cpu = cpu_facts()
    return [f"# {title}", "",
            f"- Machine: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, {torch.get_num_threads()} threads{machine}",
            f"- Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}; "
            f"torch {torch.__version__}{versions}",
            f"- Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`"]


def print_or_write(text: str, out: str | None) -> None:
    """A small script's markdown report: written to ``out`` (and said on stderr), else printed."""
    if out:
        Path(out).write_text(text.rstrip() + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


# A script that measures in a fresh process (this one's load and memory rows, bench_cuda.py's, or a
# script on another OpenMP runtime or with PyTorch held to an instruction set) runs itself again with
# child arguments; the child prints one marked JSON line (report_to_parent), the parent reads it
# (reported; run_again).
_CHILD_RESULT = "RESULT "


def report_to_parent(result: Any) -> None:
    """In a child of :func:`run_again`: hand ``result`` (JSON-able) back to the parent."""
    print(_CHILD_RESULT + json.dumps(result), flush=True)


def reported(stdout: str) -> Any:
    """What a child passed to :func:`report_to_parent`, from its standard output; None if nothing."""
    for line in stdout.splitlines():
        if line.startswith(_CHILD_RESULT):
            return json.loads(line[len(_CHILD_RESULT):])
    return None


def run_spec(script: str, spec: dict[str, Any], env: dict[str, str], timeout: float, cwd: Path | None = None
             ) -> dict[str, Any]:
    """Run ``script --child <spec as JSON>`` in a fresh Python (the fresh-process rows of bench.py and
    bench_cuda.py): what it passed to :func:`report_to_parent`, or ``{"error": its last lines}``, so
    that a failed row is reported in the table instead of stopping the run."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)
    result = reported(proc.stdout)
    if result is not None:
        return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:] or f"exit code {proc.returncode}"}


def run_again(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """Run ``script`` in a fresh Python with ``args`` (and ``env``); what it passed to
    :func:`report_to_parent`. A failing child raises ``CalledProcessError``."""
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, check=True)
    return reported(done.stdout)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "") if head else "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def bf16_conv_gflops() -> float:
    """GFLOP/s of one small bf16 3x3 convolution (320 -> 320 channels on 16x16; ~0.5 GFLOP)."""
    x = torch.randn(1, 320, 16, 16, dtype=torch.bfloat16)
    w = torch.randn(320, 320, 3, 3, dtype=torch.bfloat16)
    torch.nn.functional.conv2d(x, w, padding=1)
    t0 = time.perf_counter()
    torch.nn.functional.conv2d(x, w, padding=1)
    return 2 * 9 * 320 * 320 * 16 * 16 / (time.perf_counter() - t0) / 1e9


def matmul_peak(dtype: torch.dtype, max_n: int, repeats: int = 5, backend: str = "torch.mm") -> tuple[float, int]:
    """Best GFLOP/s of a square ``dtype`` matrix product, growing n up to ``max_n`` while one product
    takes under ~0.5 s (so a slow emulated dtype does not stall the run). ``backend``: ``torch.mm``
    (PyTorch's BLAS: MKL on x86) or ``oneDNN`` (its GEMM, which sdlite's fp32 linear layers and
    small-map convolutions use, ``sdlite.ops``). The run measures both at its start and at its end
    and divides by the largest: a peak measured while the machine was busy, or on the slower
    library, would flatter every "% of peak"."""
    if backend == "oneDNN":
        if dtype not in ops.ONEDNN_GEMM:
            return 0.0, 0
        mm = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731  a @ b.T
    else:
        mm = torch.mm
    best, best_n, n = 0.0, 0, 512
    while n <= max_n:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        mm(a, b)  # first call: kernel selection, page faults
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mm(a, b)
            times.append(time.perf_counter() - t0)
        gflops = 2 * n**3 / min(times) / 1e9
        if gflops > best:
            best, best_n = gflops, n
        if min(times) > 0.5:
            break
        n *= 2
    return best, best_n


PEAK_BACKENDS = ("torch.mm", "oneDNN")


def matmul_peaks(dtype: torch.dtype, max_n: int) -> dict[str, tuple[float, int]]:
    """:func:`matmul_peak` of each of ``PEAK_BACKENDS``."""
    return {b: matmul_peak(dtype, max_n, backend=b) for b in PEAK_BACKENDS}


# ---------------------------------------------------------------------------------------------
# The same random weights in both libraries
# ---------------------------------------------------------------------------------------------

def random_original_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per network, a seeded random fp32 state dict with sdlite's (= the original checkpoint's) names;
    each tensor is cloned into its own memory, as after a real load."""
    out = {}
    for i, (name, module) in enumerate(build_networks(cfg).items()):
        out[name] = {k: v.clone() for k, v in random_state_dict(module, seed + i).items()}
    return out


def sdlite_networks(cfg: ModelConfig, weights: dict[str, dict[str, torch.Tensor]],
                    dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    nets = build_networks(cfg)
    for name, module in nets.items():
        sd = {k: v.to(dtype) for k, v in weights[name].items()}  # no copy when dtype is already right
        module.load_state_dict(sd, strict=True, assign=True)
        ops.pack(module.eval().requires_grad_(False))  # as sdlite.load does (CPU: oneDNN's weight layout)
    return nets


def plain_copies(cfg: ModelConfig, nets: dict, names: Sequence[str]) -> dict[str, torch.nn.Module]:
    """Copies of sdlite networks with plain (unpacked) weights, for the levers that compare kernels
    on plain weights and for ``torch.compile`` (a packed module cannot be deep-copied)."""
    out = {}
    for name in names:
        module = build_networks(cfg)[name]
        module.load_state_dict(nets[name].state_dict(), strict=True, assign=True)  # plain copies of the weights
        out[name] = module.eval().requires_grad_(False)
    return out


def diffusers_unet(cfg: UNetConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """diffusers' ``UNet2DConditionModel`` configured like ``cfg`` (as in tests/test_unet.py, whose
    parity test proves this mapping), holding ``state_dict``'s tensors converted by diffusers' LDM converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    block_out_channels = [cfg.model_channels * m for m in cfg.channel_mult]
    down, up, ds = [], [], 1
    for level in range(len(block_out_channels)):
        down.append("CrossAttnDownBlock2D" if ds in cfg.attention_resolutions else "DownBlock2D")
        ds *= 2 if level < len(block_out_channels) - 1 else 1
    for _ in range(len(block_out_channels)):
        up.append("CrossAttnUpBlock2D" if ds in cfg.attention_resolutions else "UpBlock2D")
        ds //= 2
    heads = [cfg.heads_and_dim(c)[0] for c in block_out_channels]  # diffusers' "attention_head_dim" = heads
    config = dict(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple(down), up_block_types=tuple(up), block_out_channels=tuple(block_out_channels),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=heads if cfg.use_linear_in_transformer else heads[0],
        use_linear_projection=cfg.use_linear_in_transformer, transformer_layers_per_block=cfg.transformer_depth,
    )
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in state_dict.items()}, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


def diffusers_networks(cfg: ModelConfig, nets: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """diffusers / transformers modules holding sdlite's tensors, converted by diffusers' own code."""
    import transformers
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

    unet = diffusers_unet(cfg.unet, nets["unet"].state_dict())

    levels = len(cfg.vae.ch_mult)
    vae_config = dict(
        in_channels=cfg.vae.in_channels, out_channels=cfg.vae.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae.ch * m for m in cfg.vae.ch_mult), layers_per_block=cfg.vae.num_res_blocks,
        latent_channels=cfg.vae.z_channels, norm_num_groups=32, sample_size=cfg.image_size,
        scaling_factor=cfg.scale_factor,
    )
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
    ldm_vae = {"first_stage_model." + k: v for k, v in nets["vae"].state_dict().items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config)), strict=True, assign=True)

    t = cfg.text
    hf_config = transformers.CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_ratio * t.width,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_length,
        hidden_act=t.act, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        projection_dim=t.width,
    )
    text = transformers.CLIPTextModel(hf_config)  # built on the CPU: transformers keeps a position_ids buffer
    ldm_text = {"cond_stage_model.transformer." + k: v for k, v in nets["text_encoder"].state_dict().items()}
    converted = convert_ldm_clip_checkpoint(ldm_text)
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text encoder conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def write_clip_tokenizer(folder: Path) -> Any:
    """A transformers ``CLIPTokenizer`` for diffusers, built from sdlite's shipped CLIP BPE merges (the
    vocabulary is the byte alphabet, the same with ``</w>``, one token per merge, then the two special
    tokens, as OpenAI builds it) and saved to ``folder``. Nothing is downloaded."""
    import gzip

    import transformers

    from sdlite.clip.tokenizer import BPE_PATH, NUM_MERGES, bytes_to_unicode

    with gzip.open(BPE_PATH) as f:
        merges = [tuple(m.split()) for m in f.read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


def euler_scheduler(cfg: ModelConfig) -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start,
                                  beta_end=cfg.linear_end, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="linspace", prediction_type="epsilon")


def diffusers_pipeline(cfg: ModelConfig, dnets: dict[str, torch.nn.Module], tokenizer: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=dnets["vae"], text_encoder=dnets["text_encoder"], tokenizer=tokenizer,
                                   unet=dnets["unet"], scheduler=euler_scheduler(cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdlite_pipeline(cfg: ModelConfig, nets: dict[str, torch.nn.Module], precision: str) -> Any:
    from sdlite.clip import tokenizer_for
    from sdlite.devices import Precision
    from sdlite.pipeline import Pipeline

    weight = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.bfloat16 if precision == "autocast" else None
    return Pipeline(tokenizer_for(cfg.text), nets["text_encoder"], nets["unet"], nets["vae"], cfg,
                    Precision(torch.device("cpu"), weight, autocast), name="bench")


def write_checkpoint(cfg: ModelConfig, weights: dict[str, dict[str, torch.Tensor]], path: Path) -> int:
    """An fp16 ``.safetensors`` in the original layout, as ``v1-5-pruned-emaonly.safetensors`` is:
    the three networks under their prefixes, the DDPM buffers, CLIP ``position_ids``; no sdlite metadata."""
    from safetensors.torch import save_file

    nets = sdlite_networks(cfg, weights, torch.float32)
    tensors = {k: v.to(torch.float16).contiguous() for k, v in state_dict_of(nets, cfg).items()}
    del nets
    for name in DDPM_BUFFERS:
        tensors[name] = torch.linspace(0.0, 1.0, cfg.timesteps).to(torch.float16)
    tensors[SD1_POSITION_IDS] = torch.arange(cfg.text.max_length)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    del tensors
    gc.collect()
    return path.stat().st_size


def write_config_dir(cfg: ModelConfig, dnets: dict[str, torch.nn.Module], folder: Path) -> Any:
    """A diffusers-format folder with configs only (no weights), for ``from_single_file(config=...)``."""
    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    pipe = diffusers_pipeline(cfg, dnets, tokenizer)
    pipe.save_config(str(folder))  # model_index.json
    dnets["unet"].save_config(str(folder / "unet"))
    dnets["vae"].save_config(str(folder / "vae"))
    dnets["text_encoder"].config.save_pretrained(str(folder / "text_encoder"))
    pipe.scheduler.save_config(str(folder / "scheduler"))
    unet_json = folder / "unet" / "config.json"
    unet_config = json.loads(unet_json.read_text())
    unet_config["sample_size"] = cfg.image_size // cfg.vae.downsample_factor
    unet_json.write_text(json.dumps(unet_config, indent=2))
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    unit: str
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    flops: float = 0.0  # FLOPs of one timed call (both sides), for "% of peak" in the report
    peak_dtype: str = ""  # which matmul peak that percentage is of

    def stat(self, side: str, fn: Callable[[list[float]], float]) -> float | None:
        v = self.values.get(side)
        return fn(v) if v else None


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run the sides alternately (ABBA...), ``warmup`` untimed rounds first. Returns the seconds of each
    timed call per side, and each side's last result."""
    sides = list(fns)
    last: dict[str, Any] = {}
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(warmup + repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            last[side] = fns[side]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[side].append(dt)
    return times, last


def rel_diff(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def network_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs of each in-process row, counted on meta copies (nothing is computed). The Upsample convs
    are counted as written in the original code (as diffusers runs them), so both libraries are
    measured against the same work; sdlite's four 2x2 convs do fewer multiply-adds there."""
    nets = build_networks(cfg)
    c = cfg.unet.context_dim
    with torch.device("meta"), patch.object(ops, "UPSAMPLE_BY_PHASES", ()):
        ids = torch.zeros(2, cfg.text.max_length, dtype=torch.long)
        out = {"text": count_flops(lambda: nets["text_encoder"](ids))}
        for name, hw, b in UNET_ROWS:
            x, ctx = torch.zeros(b, cfg.unet.in_channels, hw, hw), torch.zeros(b, cfg.text.max_length, c)
            out[name] = count_flops(lambda: nets["unet"](x, torch.full((b,), 500.0), ctx))
        out["vae64"] = count_flops(lambda: nets["vae"].decode(torch.zeros(1, cfg.vae.embed_dim, 64, 64)))
        out["vae32"] = count_flops(lambda: nets["vae"].decode(torch.zeros(1, cfg.vae.embed_dim, 32, 32)))
        out["vaeenc"] = count_flops(lambda: nets["vae"].encode(torch.zeros(1, 3, 512, 512)).mean)
    out["txt2img"] = 10 * out["unet32"] + out["vae32"] + out["text"]
    return out


def autocast_ctx(precision: str) -> contextlib.AbstractContextManager:
    if precision == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_inprocess_rows(cfg: ModelConfig, precision: str, nets: dict, dnets: dict, tokenizer: Any, rows: list[str],
                       args: argparse.Namespace, flops: dict[str, float]) -> list[Row]:
    wdtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    out: list[Row] = []
    w, r = args.warmup, args.repeats

    def with_flops(row: Row, key: str) -> None:
        row.flops = flops.get(key, 0.0)
        row.peak_dtype = "fp32" if precision == "fp32" else "bf16"

    def compare(label: str, key: str, ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int = r) -> Row:
        """One network row: the two calls alternating, each without autograd and under the precision's
        autocast, their outputs' difference and the row's FLOPs."""
        def run(fn: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                with torch.no_grad(), autocast_ctx(precision):
                    return fn()
            return call

        times, last = alternate({"sdlite": run(ours), "diffusers": run(theirs)}, w, repeats)
        row = Row(label, "s", times)
        row.notes.append(f"max |Δ| / max |ref| = {rel_diff(last['sdlite'], last['diffusers']):.1e}")
        with_flops(row, key)
        out.append(row)
        return row

    if "text" in rows:
        from sdlite.clip import tokenizer_for

        ids = tokenizer_for(cfg.text)([PROMPT, ""])
        te, dte = nets["text_encoder"], dnets["text_encoder"]
        row = compare("text encoder, batch 2 x 77", "text", lambda: te(ids),
                      lambda: dte(input_ids=ids).last_hidden_state, repeats=max(r, 3 * r))
        if tokenizer is not None:
            hf_ids = tokenizer([PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
            row.notes.append("token ids equal" if torch.equal(hf_ids, ids) else "TOKEN IDS DIFFER")

    for key, hw, b in UNET_ROWS:
        if key not in rows:
            continue
        x = torch.randn(b, cfg.unet.in_channels, hw, hw, generator=gen).to(wdtype)
        ctx = torch.randn(b, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(wdtype)
        t = torch.full((b,), 500.0)
        unet, dunet = nets["unet"], dnets["unet"]
        compare(f"UNet step, batch {b}, {hw}x{hw} latent", key, lambda: unet(x, t, ctx),
                lambda: dunet(x, t, encoder_hidden_states=ctx).sample)

    if "tome64" in rows:
        out.append(token_merging_row(nets["unet"], dnets["unet"], cfg, precision, wdtype, w, r))

    vae, dvae = nets["vae"], dnets["vae"]
    if "vae64" in rows:
        z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(wdtype)
        compare("VAE decode, 64x64 latent -> 512x512", "vae64", lambda: vae.decode(z), lambda: dvae.decode(z).sample)

    if "vaeenc" in rows:
        image = (torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1).to(wdtype)  # pixels in [-1, 1]
        compare("VAE encode, 512x512 -> 64x64 latent (posterior mean)", "vaeenc", lambda: vae.encode(image).mean,
                lambda: dvae.encode(image).latent_dist.mean)

    if "txt2img" in rows:
        pipe = sdlite_pipeline(cfg, nets, precision)
        dpipe = diffusers_pipeline(cfg, dnets, tokenizer)
        size = 256
        latents = torch.randn(1, cfg.vae.embed_dim, size // 8, size // 8, generator=gen)
        caught: list[str] = []

        def ours() -> Any:
            with warnings.catch_warnings(record=True) as wlist:
                warnings.simplefilter("always")
                img = pipe.txt2img(PROMPT, negative_prompt="", steps=10, guidance_scale=7.5, width=size,
                                   height=size, sampler="euler", latents=latents, output_type="np")
            caught.extend(str(x.message) for x in wlist)
            return img

        def theirs() -> Any:
            with autocast_ctx(precision):
                return dpipe(PROMPT, negative_prompt="", num_inference_steps=10, guidance_scale=7.5, width=size,
                             height=size, latents=latents.to(wdtype), output_type="np").images

        times, last = alternate({"sdlite": ours, "diffusers": theirs}, w, max(1, min(r, 3)))
        row = Row("txt2img 256x256, 10 Euler steps, CFG 7.5", "s", times)
        diff = (torch.as_tensor(last["sdlite"]) - torch.as_tensor(last["diffusers"])).abs()
        row.notes.append(f"images in [0, 1]: mean |Δ| = {diff.mean():.1e}, max |Δ| = {diff.max():.1e}")
        if caught:
            row.notes.append("sdlite warned: " + "; ".join(sorted(set(caught)))[:200])
        with_flops(row, "txt2img")
        out.append(row)
        del pipe, dpipe
    return out


TOME_RATIO = 0.5


def token_merging_row(unet: torch.nn.Module, dunet: torch.nn.Module, cfg: ModelConfig, precision: str,
                      wdtype: torch.dtype, warmup: int, repeats: int) -> Row:
    """The UNet step at 64x64 with token merging (ratio 0.5): sdlite against diffusers patched by ``tomesd``
    with the A1111 web UI's settings (use_rand=False, self-attention only, top level only), and, alternating
    in the same rounds, sdlite without merging (the speed-up merging gives, in the notes)."""
    import tomesd

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, cfg.unet.in_channels, 64, 64, generator=gen).to(wdtype)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(wdtype)
    t = torch.tensor([500.0, 500.0])

    def ours(ratio: float) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with unet.token_merging(ratio), torch.no_grad(), autocast_ctx(precision):
                return unet(x, t, ctx)
        return call

    def theirs() -> torch.Tensor:
        with torch.no_grad(), autocast_ctx(precision):
            return dunet(x, t, encoder_hidden_states=ctx).sample

    tomesd.apply_patch(dunet, ratio=TOME_RATIO, use_rand=False, merge_attn=True, merge_crossattn=False,
                       merge_mlp=False)
    try:
        times, last = alternate({"sdlite": ours(TOME_RATIO), "diffusers": theirs, "plain": ours(0.0)}, warmup,
                                repeats)
    finally:
        tomesd.remove_patch(dunet)
    plain = times.pop("plain")
    row = Row(f"UNet step, batch 2, 64x64 latent, token merging {TOME_RATIO} (diffusers + tomesd)", "s", times)
    speedup = statistics.median(plain) / statistics.median(times["sdlite"])
    row.notes.append(f"max |Δ| / max |ref| = {rel_diff(last['sdlite'], last['diffusers']):.1e}")
    row.notes.append(f"sdlite without merging {statistics.median(plain):.3f} s (median, same rounds): merging is "
                     f"{speedup:.2f}x as fast; merging moves the output by max |Δ| / max |ref| = "
                     f"{rel_diff(last['sdlite'], last['plain']):.1e}")
    return row


# ---------------------------------------------------------------------------------------------
# Fresh-process rows: checkpoint load and peak memory
# ---------------------------------------------------------------------------------------------

def _status_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    """Peak RSS of this process: ``VmHWM``, the kernel's high-water mark behind ``ru_maxrss``.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used directly because Linux carries it across
    fork + exec: a child started by a parent holding 800 MB reports at least 800 MB. ``VmHWM``
    belongs to the process's own address space, which exec replaces."""
    return _status_mib("VmHWM")


def _reset_peak() -> bool:
    """Start ``VmHWM`` again from the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``), so that a
    later peak is that of what ran since. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _peak_mib() <= _rss_mib() + 1


def child_main(spec: dict[str, Any]) -> None:
    """One load (and optionally one generation) in this fresh process; prints one JSON line."""
    torch.set_num_threads(spec["threads"])
    precision, side = spec["precision"], spec["side"]
    wdtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = ModelConfig.from_json(spec["config"]) if spec.get("config") else None
    if side == "sdlite":
        import sdlite
        from sdlite.devices import Precision
    else:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    res: dict[str, Any] = {"rss_imports": _rss_mib()}
    t0 = time.perf_counter()
    if side == "sdlite":
        pipe = sdlite.load(spec["ckpt"], device="cpu", dtype="bf16" if precision == "bf16" else "fp32", config=cfg)
        if precision == "autocast":
            pipe.precision = Precision(torch.device("cpu"), torch.float32, torch.bfloat16)
        res["method"] = "sdlite.load"
        res["unet_dtype"] = str(next(pipe.unet.parameters()).dtype)
    elif spec["method"] == "from_single_file":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(spec["ckpt"], config=spec["config_dir"], local_files_only=True,
                                                        torch_dtype=wdtype)
        res["method"] = "StableDiffusionPipeline.from_single_file(config=local dir, local_files_only=True)"
    else:
        pipe = _diffusers_manual_load(spec, wdtype)
        res["method"] = "safetensors.load_file + diffusers convert_ldm_* + load_state_dict (manual)"
    res["load_s"] = time.perf_counter() - t0
    res["rss_loaded"] = _rss_mib()
    res["peak_load"] = _peak_mib()
    if side == "diffusers":
        pipe.set_progress_bar_config(disable=True)
        res["unet_dtype"] = str(pipe.unet.dtype)
    res["weights_mib"] = sum(t.numel() * t.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                             for t in list(m.parameters()) + list(m.buffers())) / 2**20
    if spec.get("first_step"):
        # The first 64x64 UNet call after the load: work a loader can leave to it (sdlite lays out each
        # conv's weight at its first call) is timed here, so load + first step compares like with like.
        hw = spec["first_step"]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, hw, hw, generator=gen).to(wdtype)
        ctx_dim = pipe.unet.config.cross_attention_dim if side == "diffusers" else pipe.config.unet.context_dim
        ctx = torch.randn(2, 77, ctx_dim, generator=gen).to(wdtype)
        t = torch.full((2,), 500.0)
        t0 = time.perf_counter()
        with torch.no_grad():
            if side == "sdlite":
                pipe.unet(x, t, ctx)
            else:
                with autocast_ctx(precision):
                    pipe.unet(x, t, encoder_hidden_states=ctx)
        res["first_step_s"] = time.perf_counter() - t0
    if spec.get("generate"):
        size, steps = spec["generate"], spec["steps"]
        # The generation's own peak, apart from the load's (diffusers' loader can peak above anything
        # its generation does): VmHWM restarted at the loaded RSS.
        reset = _reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            if side == "sdlite":
                pipe.txt2img(PROMPT, steps=steps, guidance_scale=7.5, width=size, height=size, sampler="euler",
                             seed=1, output_type="np")
            else:
                with autocast_ctx(precision):
                    pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                         generator=torch.Generator().manual_seed(1), output_type="np")
        res["gen_s"] = time.perf_counter() - t0
        res["peak_gen"] = _peak_mib() if reset else float("nan")
    if spec.get("decode"):  # a tiled VAE decode of a [1, 4, n, n] latent (n = 256: 2048x2048 pixels)
        n = spec["decode"]
        z = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        with torch.no_grad():
            if side == "sdlite":
                res["tile"] = pipe.vae_tile
                img = pipe.decode_latents(z * pipe.scale_factor)  # tiles automatically above 2x native size
            else:
                pipe.vae.enable_tiling()
                res["tile"] = pipe.vae.tile_latent_min_size
                img = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
        res["decode_s"] = time.perf_counter() - t0
        res["decode_shape"] = list(img.shape)
    # The whole process's peak: the load's, or what ran after it (VmHWM restarted for the generation).
    res["peak"] = max(res["peak_load"], _peak_mib())
    report_to_parent(res)


def _diffusers_manual_load(spec: dict[str, Any], dtype: torch.dtype) -> Any:
    """The fallback when ``from_single_file`` cannot run offline: diffusers' converters by hand."""
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file

    folder = Path(spec["config_dir"])
    sd = load_file(spec["ckpt"])
    unet_config = UNet2DConditionModel.load_config(str(folder / "unet"))
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    converted = convert_ldm_clip_checkpoint(sd)
    if not hasattr(text, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    text.load_state_dict(converted, strict=False)
    del sd
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def run_child(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONWARNINGS="ignore")
    return run_spec(str(Path(__file__).resolve()), spec, env, timeout, cwd=ROOT)


def run_process_rows(cfg: ModelConfig, size: str, precisions: list[str], rows: list[str], ckpt: Path,
                     config_dir: Path, args: argparse.Namespace) -> dict[str, list[Row]]:
    base = {"ckpt": str(ckpt), "config_dir": str(config_dir), "threads": args.threads,
            "config": None if size == "sd15" else cfg.to_json()}
    method = {"sdlite": "sdlite", "diffusers": "from_single_file"}
    fallback_note: list[str] = []

    def one(side: str, precision: str, **extra: Any) -> dict[str, Any]:
        res = run_child({**base, **extra, "side": side, "precision": precision, "method": method[side]})
        if "error" in res and side == "diffusers" and method[side] == "from_single_file":
            fallback_note.append(f"diffusers from_single_file failed offline ({res['error'][:300]}); "
                                 "timed the manual path instead")
            method[side] = "manual"
            res = run_child({**base, **extra, "side": side, "precision": precision, "method": "manual"})
        return res

    out: dict[str, list[Row]] = {p: [] for p in precisions}
    for precision in precisions:
        if "load" in rows and precision != "autocast":  # autocast loads fp32 weights: the fp32 row
            for _ in range(args.warmup):  # warm the page cache, and check the path works, untimed
                for side in SIDES:
                    one(side, precision)
            results: dict[str, list[dict]] = {s: [] for s in SIDES}
            n = max(1, min(args.repeats, 3))
            for r in range(n):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    results[side].append(one(side, precision, first_step=FIRST_STEP_LATENT))
            errors = {s: v[-1]["error"] for s, v in results.items() if v and "error" in v[-1]}
            t_row = Row(f"load {ckpt.stat().st_size / 2**30:.2f} GiB fp16 .safetensors (fresh process)", "s")
            m_row = Row("  peak RSS of that load", "MiB")
            for side in SIDES:
                ok = [x for x in results[side] if "error" not in x]
                t_row.values[side] = [x["load_s"] for x in ok]
                m_row.values[side] = [x["peak_load"] for x in ok]
                if ok:
                    x = ok[-1]
                    t_row.notes.append(f"{side}: {x['method']} -> unet {x['unet_dtype']}")
                    m_row.notes.append(f"{side}: RSS after imports {x['rss_imports']:.0f}, after load "
                                       f"{x['rss_loaded']:.0f} MiB; peak = {x['peak_load'] / x['weights_mib']:.2f}x "
                                       f"the loaded weights ({x['weights_mib']:.0f} MiB)")
            f_row = Row(f"  that load + the first {FIRST_STEP_LATENT}x{FIRST_STEP_LATENT} UNet step (batch 2)", "s")
            for side in SIDES:
                f_row.values[side] = [x["load_s"] + x["first_step_s"] for x in results[side]
                                      if "error" not in x and "first_step_s" in x]
            f_row.notes.append("a loader's deferred work (sdlite lays out each conv's weight at its first call) "
                               "counted; the steady step is the unet64 row")
            for side, err in errors.items():
                t_row.notes.append(f"{side} FAILED: {err}")
            out[precision] += [t_row, m_row, f_row]
        if "mem512" in rows:
            results = {s: [] for s in SIDES}
            for side in SIDES:
                results[side].append(one(side, precision, generate=512, steps=args.mem_steps))
            row = Row(f"peak RSS: load + 512x512 txt2img ({args.mem_steps} Euler step(s), CFG)", "MiB")
            g_row = Row("  peak RSS during that txt2img alone (from the loaded RSS)", "MiB")
            for side in SIDES:
                ok = [x for x in results[side] if "error" not in x]
                row.values[side] = [x["peak"] for x in ok]
                g_row.values[side] = [x["peak_gen"] for x in ok if x.get("peak_gen") == x.get("peak_gen")]
                if ok:
                    x = ok[-1]
                    row.notes.append(f"{side}: peak after load {x['peak_load']:.0f} MiB, generation {x['gen_s']:.1f} s")
                    g_row.notes.append(f"{side}: RSS after load {x['rss_loaded']:.0f} MiB")
                else:
                    row.notes.append(f"{side} FAILED: {results[side][-1]['error']}")
            out[precision] += [row, g_row]
        if "vae2048" in rows:
            results = {s: [] for s in SIDES}
            for side in SIDES:
                results[side].append(one(side, precision, decode=256))
            t_row = Row("VAE decode 2048x2048 (256x256 latent), tiled, fresh process", "s")
            m_row = Row("  peak RSS: load + that decode", "MiB")
            for side in SIDES:
                ok = [x for x in results[side] if "error" not in x]
                t_row.values[side] = [x["decode_s"] for x in ok]
                m_row.values[side] = [x["peak"] for x in ok]
                if ok:
                    x = ok[-1]
                    how = "pipe.decode_latents (automatic tiles)" if side == "sdlite" else "vae.enable_tiling()"
                    t_row.notes.append(f"{side}: {how}, {x['tile']}-latent tiles -> {x['decode_shape']}")
                    m_row.notes.append(f"{side}: peak after load {x['peak_load']:.0f} MiB")
                else:
                    t_row.notes.append(f"{side} FAILED: {results[side][-1]['error']}")
            out[precision] += [t_row, m_row]
    if fallback_note:
        for rows_ in out.values():
            if rows_:
                rows_[0].notes.append(fallback_note[0])
                break
    return out


def bundled_rows(args: argparse.Namespace) -> list[Row]:
    """sdlite's own bundled model at its defaults (64x64, Euler a, 20 steps, CFG 7.5); sdlite only:
    diffusers has no loader for this config."""
    import sdlite

    pipe = sdlite.load()
    rows = []
    for n in (1, 8):
        def ours(n: int = n) -> Any:
            return pipe.txt2img("a red circle on the left", seed=0, batch_size=n, output_type="np")

        times, _ = alternate({"sdlite": ours}, args.warmup, args.repeats)
        row = Row(f"bundled model: {n} image(s) 64x64, Euler a, 20 steps, CFG 7.5 (text + sampling + decode)", "s",
                  times)
        row.notes.append("sdlite only (diffusers has no loader for this config)")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Profile (--profile): where one UNet step spends its time, per side
# ---------------------------------------------------------------------------------------------

def profile_unet(cfg: ModelConfig, nets: dict, dnets: dict, hw: int = 32) -> str:
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=gen)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen)
    t = torch.tensor([500.0, 500.0])
    calls = {"sdlite": lambda: nets["unet"](x, t, ctx),
             "diffusers": lambda: dnets["unet"](x, t, encoder_hidden_states=ctx).sample}
    parts = []
    for side, fn in calls.items():
        with torch.no_grad():
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)
        parts.append(f"### {side}: one UNet call, batch 2, {hw}x{hw}, fp32 (top ops by self CPU time)\n\n```\n"
                     f"{table.strip()}\n```\n")
    return "\n".join(parts)


def levers_table(repeats: int) -> str:
    """Micro-benchmarks of backend choices that decide where the UNet/VAE time goes (see the notes).

    Each line times the default call and one alternative on the same tensors, alternately, and gives
    the speed-up of the alternative (above 1: the alternative is faster)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], str]] = []

    def no_mkldnn(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.backends.mkldnn.flags(enabled=False):
                return fn()
        return run

    # 3x3 convolutions at the shapes of the UNet (batch 2) and the VAE decoder (batch 1).
    for b, cin, cout, hw, where in ((2, 1280, 1280, 8, "UNet ds 8 @64 latent"), (2, 2560, 1280, 8, "UNet decoder ds 8"),
                                    (2, 1280, 1280, 16, "UNet ds 4"), (2, 640, 640, 32, "UNet ds 2"),
                                    (2, 320, 320, 64, "UNet ds 1"), (1, 512, 512, 128, "VAE up"),
                                    (1, 256, 256, 256, "VAE up"), (1, 128, 128, 512, "VAE up")):
        x = torch.randn(b, cin, hw, hw, generator=gen)
        w = torch.randn(cout, cin, 3, 3, generator=gen) * (cin * 9) ** -0.5
        bias = torch.zeros(cout)
        conv = lambda x=x, w=w, bias=bias: F.conv2d(x, w, bias, padding=1)  # noqa: E731
        cases.append((f"conv3x3 {cin}->{cout} @{hw}x{hw}, batch {b} ({where})", conv, no_mkldnn(conv),
                      "oneDNN (default) vs im2col + BLAS (torch.backends.mkldnn.flags(enabled=False))"))
        if torch.float32 in ops.ONEDNN_GEMM:
            cases.append((f"conv3x3 {cin}->{cout} @{hw}x{hw}, batch {b}", conv,
                          lambda x=x, w=w, bias=bias: ops._conv_as_gemm(x, w, bias, (1, 1)),
                          "oneDNN conv (default) vs im2col + oneDNN GEMM (sdlite.ops._conv_as_gemm)"))
        if torch.float32 in ops.ONEDNN_GEMM and cpu_kernels.load_winograd() is not None:
            xl = x.contiguous(memory_format=torch.channels_last)  # as the packed networks run
            packed = ops._reorder_conv(w, (1, 1), (1, 1), (1, 1), 1, (b, hw, hw))
            cases.append((f"conv3x3 {cin}->{cout} @{hw}x{hw}, batch {b}",
                          lambda xl=xl, p=packed, bias=bias: torch.ops.mkldnn._convolution_pointwise(
                              xl, p, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
                          lambda xl=xl, w=w, bias=bias: ops.winograd_conv3x3(xl, w, bias),
                          "oneDNN, weight packed for the shape (sdlite's packed conv) vs Winograd, the tile size "
                          f"by sdlite's rule (sdlite.ops.winograd_conv3x3: {winograd_rule()}; the default on AVX2)"))
        xl, wl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        cases.append((f"conv3x3 {cin}->{cout} @{hw}x{hw}, batch {b}", conv,
                      lambda xl=xl, wl=wl, bias=bias: F.conv2d(xl, wl, bias, padding=1), "NCHW vs channels_last"))
    # Attention with the head dimension contiguous (diffusers' layout: the fused CPU flash kernel)
    # vs strided by H*W (sdlite's VAE AttnBlock: reshape(b, 1, c, hw).transpose(2, 3), which makes
    # SDPA fall back to its unfused math path). Independent q, k, v of moderate scale, as with
    # trained weights: q = k = v gives a peaked softmax whose denormals distort the timing (next case).
    for b, heads, length, dim, where in ((1, 1, 4096, 512, "VAE mid @64 latent"), (1, 1, 1024, 512, "VAE mid @32"),
                                         (2, 8, 4096, 40, "UNet ds 1 @64")):
        q, k, v = (0.5 * torch.randn(b, heads, length, dim, generator=gen) for _ in range(3))
        qs, ks, vs = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))  # same values, strided
        cases.append((f"SDPA {b}x{heads}x{length}x{dim} ({where})",
                      lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(qs, ks, vs),
                      lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                      "head dim strided (sdlite VAE layout: math path) vs contiguous (flash kernel)"))
        if torch.float32 in ops.ONEDNN_GEMM:  # every case here is a large map's (>= 1024 keys)
            cases.append((f"SDPA {b}x{heads}x{length}x{dim} ({where})",
                          lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                          lambda q=q, k=k, v=v: ops._attention_by_gemm(q, k, v, None),
                          "SDPA (flash kernel) vs chunked oneDNN GEMMs (sdlite.ops.attention's path with AVX-512)"))
    q = torch.randn(1, 1, 1024, 512, generator=gen)

    def flushed(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_flush_denormal(True)
            try:
                return fn()
            finally:
                torch.set_flush_denormal(False)
        return run

    sdpa_peaked = lambda q=q: F.scaled_dot_product_attention(q, q, q)  # noqa: E731
    cases.append(("SDPA 1x1x1024x512, q = k = v (peaked softmax)", sdpa_peaked, flushed(sdpa_peaked),
                  "default vs torch.set_flush_denormal(True)"))
    # SD1's proj_in/proj_out: a 1x1 conv on NCHW vs a Linear on [B, HW, C].
    for b, c, hw in ((2, 320, 64), (2, 1280, 8)):
        x = torch.randn(b, c, hw, hw, generator=gen)
        w = torch.randn(c, c, 1, 1, generator=gen) * c**-0.5
        xt = x.flatten(2).transpose(1, 2).contiguous()
        bias = torch.zeros(c)
        cases.append((f"1x1 conv {c}->{c} @{hw}x{hw}, batch {b}", lambda x=x, w=w, bias=bias: F.conv2d(x, w, bias),
                      lambda xt=xt, w=w, bias=bias: F.linear(xt, w[:, :, 0, 0], bias), "Conv2d 1x1 vs Linear on [B, HW, C]"))
    # Linear layers of the three networks (rows x in -> out): PyTorch's F.linear (MKL's sgemm on
    # x86) vs oneDNN's GEMM (sdlite.ops.linear in fp32).
    if torch.float32 in ops.ONEDNN_GEMM:
        for m, k, n, where in ((8192, 320, 2560, "UNet GEGLU proj @64 latent"), (8192, 1280, 320, "UNet ff out @64"),
                               (2048, 640, 640, "UNet attention q/k/v/out @64"), (154, 768, 3072, "CLIP mlp fc1"),
                               (128, 1280, 10240, "UNet GEGLU proj @8")):
            x = torch.randn(m, k, generator=gen)
            w = torch.randn(n, k, generator=gen) * k**-0.5
            bias = torch.zeros(n)
            cases.append((f"linear {m}x{k} -> {n} ({where})", lambda x=x, w=w, bias=bias: F.linear(x, w, bias),
                          lambda x=x, w=w, bias=bias: ops._gemm(x, w, bias),
                          "F.linear (PyTorch's BLAS, default) vs oneDNN GEMM (sdlite.ops.linear)"))
    lines = ["| case | comparison | default ms | alternative ms | speed-up |", "|---|---|---:|---:|---:|"]
    with torch.no_grad():
        for name, default, alternative, what in cases:
            times, _ = alternate({"default": default, "alternative": alternative}, 1, max(1, min(repeats, 3)))
            a, b_ = statistics.median(times["default"]), statistics.median(times["alternative"])
            lines.append(f"| {name} | {what} | {a * 1e3:.1f} | {b_ * 1e3:.1f} | {a / b_:.2f} |")
    return "\n".join(lines)


def lever_line(name: str, what: str, first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> str:
    """One line of a levers table: ``first`` and ``second`` alternating (1 warm-up round, then
    ``repeats``), their medians in ms, the speed-up of ``second`` (above 1: faster) and the largest
    difference of their results."""
    with torch.no_grad():
        times, last = alternate({"default": first, "alternative": second}, 1, repeats)
    a, b = statistics.median(times["default"]), statistics.median(times["alternative"])
    d = rel_diff(last["alternative"], last["default"])
    return f"| {name} | {what}; max rel. diff {d:.0e} | {a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.2f} |"


def network_levers(cfg: ModelConfig, nets: dict, repeats: int) -> str:
    """sdlite's own switches, measured on the whole fp32 UNet (batch 2) and VAE decoder: packed weights,
    the conv backend choice and the upsampling formulation of :mod:`sdlite.ops` (Winograd's:
    :func:`winograd_levers`)."""
    gen = torch.Generator().manual_seed(1)
    packed = nets["unet"]
    # The kernel levers below switch sdlite.ops' choices for plain weights; they run on plain copies
    # (switching off oneDNN would unpack the packed networks for good). The first lever of each network
    # compares packed and plain.
    plain = plain_copies(cfg, nets, ("unet", "vae"))
    unet, vae = plain["unet"], plain["vae"]
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen)
    t = torch.tensor([500.0, 500.0])
    fp32_rows = ops.GEMM_CONV_MAX_ROWS.get(torch.float32)
    long_rows, min_k = ops.GEMM_CONV_LARGE_K.get(torch.float32, (0, 0))
    gemm_rule = (f">= {ops.GEMM_CONV_MIN_OUT} output channels and batch*H*W <= {fp32_rows}, or <= {long_rows} "
                 f"with C_in*kh*kw >= {min_k}" if fp32_rows else "none on this CPU")
    Switch = Callable[[], contextlib.AbstractContextManager]

    @contextlib.contextmanager
    def no_gemm_convs() -> Any:
        with patch.object(ops, "GEMM_CONV_MAX_ROWS", {}), patch.object(ops, "GEMM_CONV_LARGE_K", {}):
            yield

    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], str]] = []  # name, default, alternative, what

    def switched(name: str, call: Callable[[], Any], default: Switch, alternative: Switch, what: str) -> None:
        """A case of one call run under two switches of sdlite.ops' choices."""
        def under(switch: Switch) -> Callable[[], Any]:
            def run() -> Any:
                with switch():
                    return call()
            return run
        cases.append((name, under(default), under(alternative), what))

    upsample_cases = (lambda: patch.object(ops, "UPSAMPLE_BY_PHASES", ()),
                      lambda: patch.object(ops, "UPSAMPLE_BY_PHASES", ("cpu",)),
                      "Upsample as written (nearest x2, then 3x3 conv) vs four 2x2 convs on the small map "
                      "(sdlite.ops.upsample_conv, the default)")
    pack_what = ("packed weights (sdlite.ops.pack, what sdlite.load does on the CPU) vs plain weights (oneDNN "
                 "reorders each weight on every call; small-map convs as im2col + GEMM)")
    for hw in (64, 32):
        x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=gen)
        call = lambda x=x: unet(x, t, ctx)  # noqa: E731
        name = f"UNet {hw}x{hw}, batch 2"
        cases.append((name, lambda x=x: packed(x, t, ctx), call, pack_what))
        switched(name, call, lambda: patch.object(ops, "ONEDNN_GEMM", frozenset()), contextlib.nullcontext,
                 "PyTorch's kernels (linear layers on its BLAS, every conv on oneDNN's conv) vs sdlite.ops' "
                 f"default (linear layers and small-map convs on oneDNN's GEMM; small maps here: {gemm_rule})")
        switched(name, call, no_gemm_convs, contextlib.nullcontext,
                 f"the convs alone: every conv on oneDNN's conv vs small maps ({gemm_rule}) as im2col + "
                 "oneDNN GEMM (linear layers on oneDNN's GEMM in both)")
        switched(name, call, lambda: patch.object(ops, "ROW_CHUNK", 10**9), contextlib.nullcontext,
                 "the feed-forward layers over all tokens at once vs 512 tokens at a time (sdlite.ops.rowwise, "
                 "the default)")
        switched(name, call, *upsample_cases)
    z = torch.randn(1, cfg.vae.embed_dim, 32, 32, generator=gen)
    cases.append(("VAE decode 32x32 -> 256x256", lambda: nets["vae"].decode(z), lambda: vae.decode(z), pack_what))
    switched("VAE decode 32x32 -> 256x256", lambda: vae.decode(z), *upsample_cases)
    lines = [lever_line(name, what, default, alternative, repeats) for name, default, alternative, what in cases]
    return "\n".join(lines)


def winograd_rule() -> str:
    """sdlite's rule for Winograd's tile sizes, in words."""
    return " else ".join(f"F({m}x{m},3x3) from {least} tiles" for m, least in ops.WINOGRAD_MIN_TILES.items())


def winograd_levers(cfg: ModelConfig, nets: dict, repeats: int) -> str:
    """Levers-table lines, fp32: the packed UNet (batch 2, 64x64 and 32x32) and VAE decoder with their
    large maps' 3x3 convs by Winograd (sdlite.ops.winograd_conv3x3, the default on AVX2)
    vs a second packed copy of the same weights whose convs all run oneDNN's direct convolution. Two
    copies, because switching one network back and forth would re-lay its weights on every call."""
    if not ops.WINOGRAD_CONV or cpu_kernels.load_winograd() is None:
        why = "off on this CPU (ops.WINOGRAD_CONV)" if not ops.WINOGRAD_CONV else "its kernel cannot be built here"
        return f"| fp32 Winograd convolutions | sdlite.ops.winograd_conv3x3: {why} | | | |"
    direct = plain_copies(cfg, nets, ("unet", "vae"))
    for module in direct.values():
        ops.pack(module)
        for m in module.modules():
            if isinstance(m, ops.Conv2d):
                m._winograd_tile = lambda *a, **k: None  # this copy's convs never take Winograd
    gen = torch.Generator().manual_seed(4)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen)
    t = torch.tensor([500.0, 500.0])
    calls = {}
    for hw in (64, 32):
        x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=gen)
        calls[f"UNet {hw}x{hw}, batch 2"] = {side: (lambda x=x, u=nets_["unet"]: u(x, t, ctx))
                                             for side, nets_ in (("default", nets), ("alternative", direct))}
    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen)
    calls["VAE decode 64x64 -> 512x512"] = {side: (lambda v=nets_["vae"]: v.decode(z))
                                            for side, nets_ in (("default", nets), ("alternative", direct))}
    what = (f"every conv by oneDNN's direct convolution (packed) vs 3x3 convs by Winograd, {winograd_rule()} "
            f"(sdlite.ops.winograd_conv3x3, the default here)")
    return "\n".join(lever_line(name, what, fns["alternative"], fns["default"], repeats) for name, fns in calls.items())


def attention_kernel_levers(cfg: ModelConfig, nets: dict, precision: str, repeats: int) -> str:
    """Levers-table lines, fp32 or bf16 weights: the UNet (batch 2, 64x64 and 32x32) and the VAE
    decoder with attention through sdlite's C++ kernel (sdlite.cpu_kernels, the default where it
    builds) vs the chunked-GEMM path and SDPA it replaced."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if cpu_kernels.load() is None or not cpu_kernels.cpu_supported(dtype):
        return f"| {precision} attention | sdlite's C++ kernel: not available on this machine | | | |"
    gen = torch.Generator().manual_seed(3)
    unet, vae = nets["unet"], nets["vae"]
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(dtype)
    t = torch.tensor([500.0, 500.0])
    calls = {f"UNet {hw}x{hw}, batch 2, {precision}": (lambda x=torch.randn(2, cfg.unet.in_channels, hw, hw, generator=gen)
                                                       .to(dtype): unet(x, t, ctx)) for hw in (64, 32)}
    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(dtype)
    calls[f"VAE decode 64x64 -> 512x512, {precision}"] = lambda: vae.decode(z)
    what = "fp32 scores, softmax, bf16 p·v" if precision == "bf16" else "fp32"
    lines = []
    # Without the kernel: the chunked GEMMs where ops.attention takes them (AVX-512), else SDPA. With
    # it: on every head, even where cpu_kernels.MAX_HEAD_WIDTH keeps it off by default (AVX2).
    without = f"chunked oneDNN GEMMs ({what}) and SDPA" if ops.GEMM_ATTENTION_MIN_KEYS is not None else "SDPA"
    for name, call in calls.items():
        def under(devices: tuple[str, ...], call: Callable[[], Any] = call) -> Callable[[], Any]:
            def run() -> Any:
                with patch.object(ops, "FUSED_ATTENTION", devices), \
                        patch.object(cpu_kernels, "MAX_HEAD_WIDTH", cpu_kernels.MAX_HEAD_WIDTH if not devices else {}):
                    return call()
            return run
        lines.append(lever_line(name, f"attention as {without} vs sdlite's C++ kernel (sdlite.cpu_kernels; the "
                                      f"default where it pays)", under(()), under(("cpu",)), repeats))
    return "\n".join(lines)


def compile_lever(cfg: ModelConfig, nets: dict, precision: str, repeats: int) -> str:
    """One levers-table line: the UNet (fp32 or bf16 weights) at 32x32, batch 2, eager vs
    ``nn.Module.compile`` (what ``Pipeline.compile`` does), with the first call's compile time."""

    gen = torch.Generator().manual_seed(2)
    unet = nets["unet"]
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen)
    t = torch.tensor([500.0, 500.0])
    x = torch.randn(2, cfg.unet.in_channels, 32, 32, generator=gen)
    dtype = next(unet.parameters()).dtype
    ctx, x = ctx.to(dtype), x.to(dtype)
    compiled = plain_copies(cfg, nets, ("unet",))["unet"]  # Pipeline.compile unpacks too
    compiled.compile()
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x, t, ctx)
    first = time.perf_counter() - t0

    def eager() -> Any:
        with torch.no_grad():
            return unet(x, t, ctx)

    def comp() -> Any:
        with torch.no_grad():
            return compiled(x, t, ctx)

    times, last = alternate({"default": eager, "alternative": comp}, 1, repeats)
    a, b = statistics.median(times["default"]), statistics.median(times["alternative"])
    gain = a - b
    breakeven = f"{first / gain:.0f} calls to win the compile time back" if gain > 0 else "never wins it back"
    return (f"| UNet 32x32, batch 2, {precision} | eager vs `pipe.compile()` (torch.compile; first call incl. compiling "
            f"{first:.0f} s: {breakeven}); max rel. diff {rel_diff(last['alternative'], last['default']):.0e} | "
            f"{a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.2f} |")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "MiB":
        return f"{v:,.0f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def flops_note(row: Row, peaks: dict[str, tuple[float, int]]) -> list[str]:
    """``GFLOP; sdlite / diffusers GFLOP/s = % / % of peak`` for a row with counted FLOPs."""
    med, dmed = row.stat("sdlite", statistics.median), row.stat("diffusers", statistics.median)
    peak = peaks.get(row.peak_dtype, (0.0, 0))[0]
    if not (row.flops and med and dmed):
        return []
    fl = row.flops
    if row.unit == "ms":  # a GPU row: report TFLOP/s
        med, dmed = med / 1e3, dmed / 1e3
    scale, rate = (1e12, "TFLOP/s") if row.unit == "ms" else (1e9, "GFLOP/s")
    note = f"{fl / 1e9:.3g} GFLOP; {fl / med / scale:.1f} / {fl / dmed / scale:.1f} {rate}"
    if peak:
        note += f" = {100 * fl / med / 1e9 / peak:.0f}% / {100 * fl / dmed / 1e9 / peak:.0f}% of peak"
    return [note]


def paired_note(row: Row) -> list[str]:
    """The spread of the ratio: each timed round ran both sides back to back, so round i's
    sdlite / diffusers is one paired measurement; a wide range means a noisy machine."""
    s, d = row.values.get("sdlite", []), row.values.get("diffusers", [])
    if row.unit != "s" or len(s) < 3 or len(s) != len(d):
        return []
    ratios = sorted(a / b for a, b in zip(s, d))
    return [f"per-round ratios {ratios[0]:.2f}–{ratios[-1]:.2f} (median {statistics.median(ratios):.2f})"]


def table(rows: list[Row], peaks: dict[str, tuple[float, int]] | None = None) -> str:
    lines = ["| row | unit | sdlite median | sdlite min | diffusers median | diffusers min | sdlite / diffusers | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        s_med, s_min = row.stat("sdlite", statistics.median), row.stat("sdlite", min)
        d_med, d_min = row.stat("diffusers", statistics.median), row.stat("diffusers", min)
        ratio = f"{s_med / d_med:.2f}" if s_med and d_med else "—"
        n = max(len(row.values.get(s, [])) for s in SIDES) if row.values else 0
        extra = flops_note(row, peaks or {}) + paired_note(row) + ([f"n={n}"] if n else [])
        notes = "; ".join(row.notes + extra)
        lines.append(f"| {row.name} | {row.unit} | {fmt(s_med, row.unit)} | {fmt(s_min, row.unit)} | "
                     f"{fmt(d_med, row.unit)} | {fmt(d_min, row.unit)} | {ratio} | {notes} |")
    return "\n".join(lines)


def report_head(title: str, banner: str) -> list[str]:
    """The title and the bold banner line of a report (shared with bench_cuda.py)."""
    return [f"# {title}", ""] + ([f"> **{banner}**", ""] if banner else [])


def versions_line(commit: str) -> str:
    import diffusers
    import transformers

    import sdlite

    return (f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}, sdlite {sdlite.__version__} "
            f"(commit {commit})")


# Environment variables that restrict PyTorch, oneDNN and MKL to fewer instructions than the CPU has,
# with the values of a run as on an AVX2 CPU; the report's machine line names those set.
AVX2_LIMITS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ISA_LIMITS = tuple(AVX2_LIMITS)


def write_report(path: Path, ctx: dict[str, Any], sections: dict[str, list[Row]], skipped: dict[str, str],
                 notes: list[str], profile_text: str, levers_text: str = "") -> None:
    cpu = ctx["cpu"]
    out = report_head("sdlite vs diffusers: CPU benchmark", ctx["banner"])
    out += [
        f"- Date: {ctx['date']} (run took {ctx['elapsed'] / 60:.1f} min)",
        f"- Command: `{ctx['command']}`",
        f"- Machine: {cpu['model']}, {cpu['logical_cpus']} logical CPUs"
        + (f" ({cpu['cores_per_socket']} cores per socket)" if "cores_per_socket" in cpu else "")
        + f", {cpu.get('mem_gib', '?')} GiB RAM; ISA: {', '.join(cpu['flags']) or 'n/a'}; "
          f"mkldnn bf16: {ctx['mkldnn_bf16']}; PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()}"
        + "".join(f"; {k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)),
        f"- Threads: torch.get_num_threads() = {torch.get_num_threads()}; load average at start {ctx['load_start']},"
        f" at end {load_average()}",
        versions_line(ctx["commit"]),
        f"- Model: `--size {ctx['size']}` — {ctx['size_desc']}; seeded random weights in the original layout, "
        "the same tensors in both libraries (diffusers' own converters of the original layout).",
        f"- Method: each row alternates sdlite and diffusers (ABBA), {ctx['warmup']} warm-up round(s), then "
        f"{ctx['repeats']} timed repeat(s) (text encoder: 3x as many; txt2img and load: at most 3; "
        "peak memory: 1 process per side). Times are wall-clock seconds; *sdlite / diffusers* is the ratio "
        "of the medians (below 1: sdlite faster or smaller).",
        "",
        "## Matmul peak (measured in this run)",
        "",
        "Square matrix products, best of n = 512, 1024, ..., through `torch.mm` (PyTorch's BLAS: MKL on x86) and "
        "through oneDNN's GEMM (`torch.ops.mkldnn._linear_pointwise`, what sdlite's fp32 linear layers and small-map "
        "convolutions use), at the start and at the end of the run; every \"% of peak\" divides by the largest.",
        "",
        "| dtype | backend | start: GFLOP/s (n) | end: GFLOP/s (n) |",
        "|---|---|---:|---:|",
    ]
    for name, (gf, _) in ctx["peaks"].items():
        start, end = ctx["peak_runs"][name]
        for backend in PEAK_BACKENDS:
            g0, n0 = start.get(backend, (0.0, 0))
            g1, n1 = end.get(backend, (0.0, 0))
            out.append(f"| {name} | {backend} | {f'{g0:.1f} ({n0})' if n0 else '—'} | {f'{g1:.1f} ({n1})' if n1 else '—'} |")
        out.append(f"| {name} | **used** | | **{gf:.1f}** |")
    out.append("")
    for precision in ctx["precisions"]:
        title = {"fp32": "fp32", "bf16": "bf16 weights", "autocast": "fp32 weights + bf16 autocast"}[precision]
        out += [f"## {title}", ""]
        if not sections.get(precision):
            out += [f"Skipped: {skipped.get(precision, 'no rows ran')}", ""]
            continue
        if precision in skipped:
            out += [f"Partly skipped: {skipped[precision]}", ""]
        out += [table(sections.get(precision, []), ctx["peaks"]), ""]
    if sections.get("bundled"):
        out += ["## The bundled model (sdlite only, fp32)", "", table(sections["bundled"]), ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if levers_text:
        out += ["## Levers (micro-benchmarks in fp32 unless a row says otherwise; same tensors, alternating)", "", levers_text, ""]
    if profile_text:
        out += ["## Profile", "", profile_text]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run: 1 repeat, no warm-up, rows {','.join(QUICK_ROWS)} "
                   "unless --rows is given, 1 generation step for mem512")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    p.add_argument("--precisions", default="fp32,bf16,autocast", help="comma-separated subset of fp32,bf16,autocast")
    p.add_argument("--force-bf16", action="store_true", help="run bf16/autocast even where the CPU has no native bf16")
    p.add_argument("--size", choices=sorted(SIZES), default="sd15", help="sd15 (default) or tiny (smoke runs only)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per row (default 1; --quick 0)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5; --quick 1)")
    p.add_argument("--mem-steps", type=int, default=None, help="sampling steps of the 512x512 memory row (default 2)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of one 32x32 UNet call per side")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile of the UNet at 32x32, fp32 and bf16 (levers-table lines)")
    p.add_argument("--levers", action="store_true", help="add micro-benchmarks of backend choices (fp32: oneDNN vs im2col convs, "
                   "channels_last, attention layout, 1x1 conv vs linear; bf16: the CPU attention kernel on and off)")
    p.add_argument("--workdir", default=None, help="where the checkpoint and config folder go (default: a temp dir)")
    p.add_argument("--note", default="", help="a line printed in bold at the top of the report")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="report path")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.mem_steps is None:
        args.mem_steps = 1 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    started = time.time()
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else list(QUICK_ROWS if args.quick else ROWS)
    precisions = [p.strip() for p in args.precisions.split(",")]
    for name, allowed in ((rows, ROWS), (precisions, PRECISIONS)):
        bad = [x for x in name if x not in allowed]
        if bad:
            sys.exit(f"unknown {bad}; choose from {', '.join(allowed)}")
    cfg = SIZES[args.size]
    log = lambda msg: print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)  # noqa: E731

    ctx: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_facts(), "load_start": load_average(), "commit": git_commit(), "size": args.size,
        "warmup": args.warmup, "repeats": args.repeats, "precisions": precisions,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    banner = []
    if args.quick:
        banner.append("Smoke run (--quick): 1 repeat, no warm-up — proves the script runs, do not quote")
    if args.size != "sd15":
        banner.append(f"--size {args.size}: not SD1.5 dimensions")
    if args.note:
        banner.append(args.note)
    ctx["banner"] = ". ".join(banner)
    n_params = {k: sum(v.numel() for v in m.parameters()) for k, m in build_networks(cfg).items()}
    ctx["size_desc"] = ", ".join(f"{k} {v / 1e6:.0f}M params" for k, v in n_params.items())

    log("matmul peak")
    max_n = 1024 if args.quick else 4096
    start_peaks = {"fp32": matmul_peaks(torch.float32, max_n), "bf16": matmul_peaks(torch.bfloat16, max_n)}
    peaks = {name: max(by.values()) for name, by in start_peaks.items()}
    ctx["peaks"] = peaks  # updated in place with the largest of the start and end measurements
    ctx["peak_runs"] = {}
    notes: list[str] = []
    skipped: dict[str, str] = {}  # precision -> why it has no rows, or why it has only some
    flops = network_flops(cfg)
    slow_bf16 = start_peaks["bf16"]["torch.mm"][0] < 0.25 * start_peaks["fp32"]["torch.mm"][0]
    prec_rows = {p: list(rows) for p in precisions}
    if slow_bf16:
        conv = bf16_conv_gflops()
        est = flops["unet64"] / (conv * 1e9) / 60
        msg = (f"this CPU has no native bf16 (mkldnn bf16 supported: {ctx['mkldnn_bf16']}; ISA without "
               f"avx512_bf16/amx_bf16): in bf16 torch.mm reaches {start_peaks['bf16']['torch.mm'][0]:.1f} GFLOP/s and a 3x3 "
               f"convolution {conv:.1f}, against {start_peaks['fp32']['torch.mm'][0]:.1f} for torch.mm in fp32, so one 64x64 UNet "
               f"call would take ~{est:.0f} min")
        notes.append("bf16 on this CPU: " + msg + ".")
        if not args.force_bf16:
            # Rows without convolutions stay affordable: the text encoder (linear layers reach
            # ~10x torch.mm's bf16 speed through oneDNN) and the load, which computes nothing.
            feasible = {"bf16": ("text", "load"), "autocast": ("text",)}
            for p in ("bf16", "autocast"):
                if p in precisions:
                    prec_rows[p] = [r for r in rows if r in feasible[p]]
                    why = (f"no native bf16 on this CPU (see the notes: a bf16 convolution runs at {conv:.1f} "
                           "GFLOP/s)")
                    skipped[p] = (f"{why}, so only the rows without convolutions ran; pass --force-bf16 to run "
                                  "them all." if prec_rows[p] else f"{why}; pass --force-bf16 to run it anyway.")
                    skipped[p] += (" sdlite computes bf16 weights in fp32 on such a CPU (sdlite/ops.py); "
                                   "benchmarks/bf16_cpu.py measures that against diffusers.")
    run_precisions = [p for p in precisions if prec_rows[p]]

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sdlite-bench-"))
    ckpt, config_dir = workdir / f"{args.size}-original-fp16.safetensors", workdir / f"{args.size}-diffusers-config"
    # diffusers' tokenizer (text, txt2img) and from_single_file (load, mem512) need the config folder.
    need_config = any(r in rows for r in ("text", "txt2img", "load", "mem512", "vae2048"))

    try:
        log(f"random weights ({ctx['size_desc']})")
        weights = random_original_weights(cfg)
        if any(r in rows for r in ("load", "mem512", "vae2048")):
            log(f"writing {ckpt}")
            write_checkpoint(cfg, weights, ckpt)

        sections: dict[str, list[Row]] = {p: [] for p in precisions}
        tokenizer = None
        profile_text = network_lever_text = compile_text = ""
        for precision in run_precisions:
            inproc = [r for r in prec_rows[precision] if r not in ("load", "mem512", "vae2048", "bundled")]
            extras = ((precision == "fp32" and args.profile) or (precision in ("fp32", "bf16") and args.levers)
                      or (args.compile and precision in ("fp32", "bf16")))
            if not (inproc or extras or (need_config and tokenizer is None)):
                continue
            wdtype = torch.bfloat16 if precision == "bf16" else torch.float32
            log(f"{precision}: building both libraries' networks")
            nets = sdlite_networks(cfg, weights, wdtype)
            dnets = diffusers_networks(cfg, nets)
            if tokenizer is None and need_config:
                tokenizer = write_config_dir(cfg, dnets, config_dir)
            if inproc:
                log(f"{precision}: rows {','.join(inproc)}")
                sections[precision] += run_inprocess_rows(cfg, precision, nets, dnets, tokenizer, inproc, args, flops)
            if args.profile and precision == "fp32":
                log("profile")
                profile_text = profile_unet(cfg, nets, dnets)
            if args.levers and precision == "fp32":
                log("network levers")
                network_lever_text += network_levers(cfg, nets, max(1, min(args.repeats, 3))) + "\n"
                log("fp32: Winograd levers")
                network_lever_text += winograd_levers(cfg, nets, max(1, min(args.repeats, 3))) + "\n"
            if args.levers and precision in ("fp32", "bf16"):
                log(f"{precision}: attention kernel levers")
                network_lever_text += attention_kernel_levers(cfg, nets, precision, max(1, min(args.repeats, 3))) + "\n"
            if args.compile and precision in ("fp32", "bf16"):
                log(f"{precision}: torch.compile")
                compile_text += compile_lever(cfg, nets, precision, max(1, min(args.repeats, 3))) + "\n"
            del nets, dnets
            gc.collect()
        del weights
        gc.collect()

        for precision in run_precisions:
            proc_rows = [r for r in prec_rows[precision] if r in ("load", "mem512", "vae2048")]
            if proc_rows:
                log(f"{precision}: fresh-process rows {','.join(proc_rows)}")
                sections[precision] += run_process_rows(cfg, args.size, [precision], proc_rows, ckpt, config_dir,
                                                        args)[precision]

        if "bundled" in rows:
            log("bundled model")
            sections.setdefault("bundled", []).extend(bundled_rows(args))

        levers_text = ""
        if args.levers:
            log("levers")
            levers_text = levers_table(args.repeats)
            if network_lever_text:
                levers_text = levers_text + "\n" + network_lever_text.rstrip("\n")
        if compile_text:
            header = "| case | comparison | default ms | alternative ms | speed-up |\n|---|---|---:|---:|---:|"
            levers_text = (levers_text or header) + "\n" + compile_text.rstrip("\n")

        import importlib.util

        if importlib.util.find_spec("accelerate") is None and any(r in rows for r in ("load", "mem512")):
            notes.append("`accelerate` is not installed, so diffusers' from_single_file builds each network with a "
                         "random initialisation before loading (its documented slow path); with accelerate it builds on "
                         "the meta device like sdlite.")
        notes.append("txt2img: both libraries tokenize the same prompt themselves and start from the same unit-variance "
                     "latents; diffusers' EulerDiscreteScheduler uses timestep_spacing='linspace'; the VAE decode, the "
                     "text encoder (prompt + empty negative) and image post-processing are included.")
        notes.append("% of peak: the row's FLOPs (FlopCounterMode on the meta device, identical for both libraries: "
                     "the Upsample convs counted as written, upsampling first, though sdlite's four 2x2 convs do 2.25x "
                     "fewer multiply-adds there, so its percentage counts that saving as speed) divided by the median "
                     "time and by the matmul peak of the row's compute dtype (where bf16 is not native, the bf16 rows "
                     "give GFLOP/s only: torch.mm is not the fastest bf16 path there).")
    finally:
        if args.workdir is None:  # the 2 GB checkpoint goes even when the run fails
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    log("matmul peak, again")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        end_peaks = matmul_peaks(dtype, max_n) if not (name == "bf16" and slow_bf16) else {}
        ctx["peak_runs"][name] = (start_peaks[name], end_peaks)
        peaks[name] = max([*start_peaks[name].values(), *end_peaks.values()])
    if slow_bf16:  # torch.mm is not bf16's fastest path here (linear layers go through oneDNN): no "% of peak"
        for row in sections.get("bf16", []) + sections.get("autocast", []):
            row.peak_dtype = ""
    ctx["elapsed"] = time.time() - started
    write_report(Path(args.out), ctx, sections, skipped, notes, profile_text, levers_text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
