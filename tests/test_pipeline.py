"""The pipeline and the CLI on tiny random models: seeds, determinism, guidance, callbacks, errors,
files that never overwrite and that other tools read back."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite
from sdlite import devices, ops
from sdlite.clip import tokenizer_for
from sdlite.infotext import parse_infotext, read_infotext
from sdlite.pipeline import Pipeline, _open_image
from sdlite.schedulers.registry import SAMPLERS, get_sampler

from factory import TINY_SD1, TINY_SD2, random_networks

ROOT = Path(__file__).resolve().parents[1]


def make_pipe(cfg=TINY_SD1, dtype=torch.float32, seed=0) -> Pipeline:
    nets = random_networks(cfg, seed)
    for m in nets.values():
        m.to(dtype)
    return Pipeline(tokenizer_for(cfg.text), nets["text_encoder"], nets["unet"], nets["vae"], cfg,
                    devices.Precision(torch.device("cpu"), dtype), name="tiny")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return make_pipe()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors"
    return sdlite.save(make_pipe(), path)


# -- conditioning --------------------------------------------------------------------------

def test_plain_prompt_conditioning_equals_the_text_encoder_on_the_tokenizer_ids(pipe):
    prompts = ["a photo of a cat", "astronaut riding a horse on mars"]
    ours = pipe.encode_prompt(prompts)
    direct = pipe.text_encoder(pipe.tokenizer(prompts))
    assert torch.equal(ours, direct)


def test_long_prompt_is_encoded_in_77_token_chunks(pipe):
    long = ", ".join(["a red circle on the left"] * 20)
    assert pipe.encode_prompt([long]).shape == (1, 77 * 2, TINY_SD1.text.width)
    # a short and a long prompt in one batch: the short one is padded with an empty chunk
    assert pipe.encode_prompt(["a cat", long]).shape == (2, 154, TINY_SD1.text.width)


def test_a_long_prompt_is_its_75_token_pieces_in_order_each_encoded_as_a_77_token_chunk(pipe):
    # No commas: A1111 then cuts every 75 tokens. Each piece gets BOS/EOS and padding, is encoded on
    # its own, and the chunks are concatenated in order (weights 1: no rescaling).
    tok = pipe.tokenizer
    long = " ".join(["red circle", "blue square on the left", "green triangle"] * 25)
    ids = tok.encode(long)
    assert 150 < len(ids) <= 225
    pieces = [ids[i:i + 75] for i in range(0, len(ids), 75)]
    rows = torch.tensor([[tok.bos_id, *p, tok.eos_id] + [tok.pad_id] * (75 - len(p)) for p in pieces])
    expected = pipe.text_encoder(rows).reshape(1, 77 * 3, -1)
    torch.testing.assert_close(pipe.encode_prompt([long]), expected, rtol=0, atol=1e-5)


def test_clip_skip_n_takes_the_hidden_state_n_minus_1_layers_before_the_last(pipe):
    ids = pipe.tokenizer(["a photo of a cat"])
    torch.testing.assert_close(pipe.encode_prompt(["a photo of a cat"], clip_skip=2),
                               pipe.text_encoder(ids, skip_last_layers=1), rtol=0, atol=0)
    assert not torch.equal(pipe.encode_prompt(["a photo of a cat"], clip_skip=2), pipe.encode_prompt(["a photo of a cat"]))


def test_guidance_with_prompt_and_negative_of_different_lengths_is_uncond_plus_scale_times_difference(pipe):
    # Different chunk counts cannot share a batch: the UNet runs twice. out = u + s (c - u).
    long = " ".join(["red circle"] * 60)  # 120 tokens: 2 chunks; the negative "" has 1
    cond, uncond = pipe.encode_prompts([[long], [""]])
    assert cond.shape[1] == 154 and uncond.shape[1] == 77
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    guided = pipe._model_fn(cond, uncond, 7.5)(x, t)
    u, c = pipe.unet(x, t, uncond), pipe.unet(x, t, cond)
    torch.testing.assert_close(guided, u + 7.5 * (c - u), rtol=0, atol=1e-5)


def test_prompt_pairs_are_encoded_in_one_text_encoder_call_equal_to_separate_encodes(pipe):
    long = ", ".join(["a (red:1.2) circle on the left"] * 20)
    prompts, negatives = ["a cat", "a cat", long, "a cat"], ["", "blurry", "", ""]
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        cond, uncond = pipe.encode_prompts([prompts, negatives])
    finally:
        handle.remove()
    # one call over the chunks of the distinct prompts: "a cat" 1, long 2, "" 1, "blurry" 1
    assert calls == [5]
    # each row equals the prompt encoded on its own (padded with the empty chunk to the list's length)
    empty = pipe.encode_prompt([""])
    for i, p in enumerate(prompts):
        alone = pipe.encode_prompt([p])
        if alone.shape[1] < cond.shape[1]:
            alone = torch.cat([alone, empty], dim=1)
        torch.testing.assert_close(cond[i:i + 1], alone, rtol=0, atol=1e-5)
    for i, n in enumerate(negatives):
        torch.testing.assert_close(uncond[i:i + 1], pipe.encode_prompt([n]), rtol=0, atol=1e-5)


def test_a1111_syntax_sdlite_does_not_run_is_warned_about_not_silently_read_as_text(pipe):
    with pytest.warns(UserWarning, match=r"prompt editing \[from:to:when\], composable prompts \(AND\)"):
        pipe.encode_prompt(["a [cat:dog:0.5] AND a hat"])
    with pytest.warns(UserWarning, match=r"alternation \[a\|b\]"):
        pipe.encode_prompts([["a cat"], ["[red|blue]"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_prompt(["a (cat:1.2) [dog] \\[x:0.5\\] sand and sea, ANDROID"])


def test_emphasis_changes_the_conditioning(pipe):
    assert not torch.equal(pipe.encode_prompt(["a (cat:1.5)"]), pipe.encode_prompt(["a cat"]))


@pytest.mark.parametrize("prompt, weighted", [("a (cat:1.5)", {2: 1.5}), ("[a] ((cat))", {1: 1 / 1.1, 2: 1.21}),
                                              ("a cat, (a dog:0.5)", {4: 0.5, 5: 0.5})])
def test_emphasis_weights_the_right_tokens_as_a1111_does(pipe, prompt, weighted):
    """The reference, written out here: the text encoder's output for the prompt's tokens (the syntax
    removed), each token's vector times its weight, then the whole chunk rescaled to its original mean
    (A1111's EmphasisOriginal). Positions count the start token: "a cat" is [start, a, cat, end, ...]."""
    plain = prompt.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
    plain = plain.replace(":1.5", "").replace(":0.5", "")
    with torch.no_grad():
        z = pipe.text_encoder(pipe.tokenizer([plain]))
    w = torch.ones(z.shape[:2])
    for position, weight in weighted.items():
        w[0, position] = weight
    expected = z * w[..., None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(pipe.encode_prompt([prompt]), expected, rtol=0, atol=1e-5)


# -- seeds and determinism -----------------------------------------------------------------

def test_same_seed_same_image_and_different_seed_different_image(pipe):
    a = pipe.txt2img("a cat", seed=7, steps=3, output_type="np")
    b = pipe.txt2img("a cat", seed=7, steps=3, output_type="np")
    c = pipe.txt2img("a cat", seed=8, steps=3, output_type="np")
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_initial_noise_is_drawn_on_cpu_from_seed_plus_i(pipe):
    noise = pipe.initial_noise([5, 6], 32, 32)
    assert noise.shape == (2, 4, 16, 16)  # the tiny VAE downsamples by 2
    assert torch.equal(noise[1], torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a", "ddpm", "dpmpp_2m_sde"])
def test_image_i_of_a_batch_equals_a_single_image_with_seed_plus_i(pipe, sampler):
    batch = pipe.txt2img("a cat", seed=10, steps=3, sampler=sampler, batch_size=2, output_type="latent")
    single = pipe.txt2img("a cat", seed=11, steps=3, sampler=sampler, output_type="latent")
    torch.testing.assert_close(batch[1:], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "ddim", "plms", "heun", "lms", "dpmpp_2m", "ddpm"])
def test_latents_argument_equals_the_seeded_noise(pipe, sampler):
    seeded = pipe.txt2img("a cat", seed=3, steps=3, sampler=sampler, output_type="latent")
    noise = pipe.initial_noise([3], 32, 32)
    given = pipe.txt2img("a cat", seed=3, steps=3, sampler=sampler, latents=noise, output_type="latent")
    assert torch.equal(seeded, given)


def test_random_seed_is_reported(pipe):
    images = pipe.txt2img("a cat", seed=-1, steps=1)
    assert 0 <= images.seeds[0] < 2**32
    assert f"Seed: {images.seeds[0]}" in images.infotexts[0]


# -- guidance, callbacks, outputs ------------------------------------------------------------

def test_guidance_scale_one_ignores_the_negative_prompt(pipe):
    a = pipe.txt2img("a cat", negative_prompt="", guidance_scale=1.0, seed=1, steps=2, output_type="latent")
    b = pipe.txt2img("a cat", negative_prompt="a dog", guidance_scale=1.0, seed=1, steps=2, output_type="latent")
    c = pipe.txt2img("a cat", negative_prompt="a dog", guidance_scale=7.5, seed=1, steps=2, output_type="latent")
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_callback_sees_every_step_and_can_stop_the_run(pipe):
    seen = []
    pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] == pytest.approx(999, abs=1e-3) and seen[0][2] == (1, 4, 16, 16)
    stopped = []
    pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", callback=lambda i, t, x: stopped.append(i) or i < 1)
    assert stopped == [0, 1]


def test_a_run_stopped_by_the_callback_returns_the_denoised_estimate_of_that_step(pipe):
    full = pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", output_type="latent")
    # Euler's last step goes to sigma 0, where x equals the denoised estimate: stopping there changes nothing.
    at_last = pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", output_type="latent",
                           callback=lambda i, t, x: i < 3)
    torch.testing.assert_close(at_last, full, rtol=0, atol=1e-5)
    # Stopped after step 1 of 4: the denoised estimate D_1 that Euler's step 1 used. From the unstopped
    # run's x_1, x_2 and x_2 = x_1 + (x_1 - D_1) / sigma_1 * (sigma_2 - sigma_1), D_1 is known exactly.
    xs = []
    pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", output_type="latent",
                 callback=lambda i, t, x: xs.append(x.clone()))
    s = get_sampler("euler").levels(pipe.schedule, 4).double()
    x1, x2 = xs[0].double(), xs[1].double()
    d1 = x1 - s[1] * (x2 - x1) / (s[2] - s[1])
    early = pipe.txt2img("a cat", seed=1, steps=4, sampler="euler", output_type="latent",
                         callback=lambda i, t, x: i < 1)
    torch.testing.assert_close(early.double(), d1, rtol=1e-4, atol=1e-3)
    assert (early - xs[1]).abs().max() > 0.1  # not the latent x_2 the callback saw


@pytest.mark.parametrize("sampler", sorted(s.id for s in SAMPLERS))
def test_eta_changes_exactly_the_samplers_that_record_it_in_the_infotext(pipe, sampler):
    spec = get_sampler(sampler)
    default = pipe.txt2img("a cat", seed=1, steps=3, sampler=sampler)
    other = pipe.txt2img("a cat", seed=1, steps=3, sampler=sampler, eta=0.5)
    changed = not np.array_equal(np.asarray(default[0]), np.asarray(other[0]))
    assert changed == spec.uses_eta
    # A1111's key: "Eta" for its k samplers, "Eta DDIM" for DDIM and DDIM CFG++ (eta_infotext_field)
    key = "Eta DDIM" if spec.id in ("ddim", "ddim_cfgpp") else "Eta"
    assert spec.eta_key == key and "Eta" not in default.infotexts[0]
    assert (f"{key}: 0.5" in other.infotexts[0]) == spec.uses_eta
    if spec.uses_eta:
        assert parse_infotext(other.infotexts[0])[key] == "0.5"
    # The noise is drawn as A1111's "CPU" source draws it, not its default "GPU" one: said so, as A1111 says it.
    assert ", RNG: CPU," in default.infotexts[0]


def test_starting_noise_is_a1111s_cpu_source_for_each_image_seed():
    """A1111's "CPU" random source (modules/rng.py): torch.manual_seed(seed), then torch.randn on the CPU,
    per image: what "RNG: CPU" in the infotext tells the web UI to use."""
    from sdlite.pipeline import random_streams

    noise, _ = random_streams([42, 43], (4, 8, 8))
    for i, seed in enumerate((42, 43)):
        torch.manual_seed(seed)
        assert torch.equal(noise[i], torch.randn(4, 8, 8))


def test_output_types(pipe):
    pil = pipe.txt2img("a cat", seed=1, steps=1)
    assert pil[0].size == (32, 32) and pil[0].mode == "RGB" and "parameters" in pil[0].info
    arr = pipe.txt2img("a cat", seed=1, steps=1, output_type="np")
    assert arr.shape == (1, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1
    lat = pipe.txt2img("a cat", seed=1, steps=1, output_type="latent", width=48, height=64)
    assert lat.shape == (1, 4, 32, 24)


def test_img2img_runs_the_last_part_of_the_schedule_as_a1111_does(pipe):
    """A1111: t_enc = int(strength·steps), sigmas[steps − t_enc − 1:] → t_enc + 1 k-sampler steps."""
    image = pipe.txt2img("a cat", seed=1, steps=2)[0]
    steps = []
    out = pipe.img2img(image, "a cat", strength=0.5, steps=10, seed=2, sampler="euler",
                       callback=lambda i, t, x: steps.append(i))
    assert len(steps) == 6
    assert out[0].size == image.size
    assert "Denoising strength: 0.5" in out.infotexts[0]


def test_an_sd2_pipeline_follows_its_prediction_type():
    # The v/eps conversion itself is checked against diffusers in test_txt2img_parity.py (slow);
    # here: the pipeline runs an SD2 model either way, and the prediction type is not ignored.
    pipe = make_pipe(TINY_SD2)
    eps = pipe.txt2img("a cat", seed=1, steps=2, sampler="euler", output_type="latent")
    pipe.config = pipe.config.with_(prediction="v")
    v = pipe.txt2img("a cat", seed=1, steps=2, sampler="euler", output_type="latent")
    assert torch.isfinite(v).all() and (v - eps).abs().max() > 1e-2


def test_encode_image_is_the_posterior_mean_times_the_scale_factor(pipe):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = pipe.vae.encode(images * 2 - 1).mean * pipe.scale_factor
    assert pipe.scale_factor != 1.0
    torch.testing.assert_close(pipe.encode_image(images), expected, rtol=0, atol=0)


def test_a_cpu_decode_first_returns_the_heap_memory_freed_by_sampling(pipe, monkeypatch):
    # The UNet's freed activations stay resident in the C heap; the decode's large maps are fresh
    # mappings beside them (a 512x512 SD1.5 decode peaked ~200 MiB higher: sdlite.pipeline).
    calls = []
    monkeypatch.setattr(ops, "release_free_memory", lambda: calls.append("trim"))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = pipe.decode_latents(z)
    assert calls == ["trim"] and image.shape == (1, 3, 8 * pipe.vae_factor, 8 * pipe.vae_factor)


def test_model_hash_is_a1111s_first_10_hex_digits_of_the_files_sha256(tiny_ckpt):
    import hashlib

    pipe = sdlite.load(tiny_ckpt, device="cpu")
    expected = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()[:10]
    assert pipe.model_hash == expected
    assert f"Model hash: {expected}" in pipe.txt2img("a cat", seed=1, steps=1).infotexts[0]


# -- precision -----------------------------------------------------------------------------

# Max |bf16 - fp32| of a 2-step image in [0, 1]: measured 0.011-0.015 over four seeds.
BF16_IMAGE_TOL = 0.05


def test_bf16_weights_run_on_cpu_close_to_fp32():
    out = make_pipe(dtype=torch.bfloat16).txt2img("a cat", seed=1, steps=2, output_type="np")
    ref = make_pipe().txt2img("a cat", seed=1, steps=2, output_type="np")
    assert np.abs(out - ref).max() < BF16_IMAGE_TOL


@pytest.mark.parametrize("vae_dtype, expected", [(torch.bfloat16, False), (torch.float32, True)])
def test_the_vae_runs_under_autocast_only_with_fp32_weights(vae_dtype, expected):
    # Half weights: autocast would only upcast GroupNorm and what follows it (time and memory at full
    # resolution, measured on CUDA in benchmarks/RESULTS-cuda.md); fp32 weights: autocast is the point.
    pipe = make_pipe(dtype=torch.float32)
    pipe.precision = devices.Precision(torch.device("cpu"), torch.float32, torch.bfloat16)
    pipe.vae.to(vae_dtype)
    seen = []
    for net in (pipe.vae.decoder, pipe.vae.encoder):
        net.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    pipe.decode_latents(torch.randn(1, 4, 8, 8))
    pipe.encode_image(torch.rand(1, 3, 64, 64))
    assert seen == [expected, expected]


def test_half_precision_vae_nan_is_retried_in_fp32_with_a_warning(monkeypatch):
    pipe = make_pipe(dtype=torch.bfloat16)
    real_decode = type(pipe.vae).decode

    def flaky(self, z):  # overflows like the SD VAE in fp16, but only in half precision
        out = real_decode(self, z)
        return out * float("nan") if z.dtype != torch.float32 else out

    monkeypatch.setattr(type(pipe.vae), "decode", flaky)
    with pytest.warns(RuntimeWarning, match="retrying in fp32"):
        out = pipe.txt2img("a cat", seed=1, steps=1, output_type="np")
    assert np.isfinite(out).all()
    assert next(pipe.vae.parameters()).dtype == torch.bfloat16  # back to its precision


def test_nan_that_survives_fp32_is_an_error_not_an_image(monkeypatch):
    pipe = make_pipe()
    monkeypatch.setattr(type(pipe.vae), "decode", lambda self, z: torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(sdlite.GenerationError, match="NaN"):
        pipe.txt2img("a cat", seed=1, steps=1)


# -- token merging -------------------------------------------------------------------------

def test_token_merging_changes_the_image_is_seeded_recorded_and_set_for_the_run_only(pipe, monkeypatch):
    seen = []
    real = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: seen.append(pipe.unet.token_merging_ratio) or real(*a, **k))
    kw = dict(seed=3, steps=3, sampler="Euler")
    plain = pipe.txt2img("a cat", **kw)
    merged = pipe.txt2img("a cat", token_merging_ratio=0.5, **kw)
    again = pipe.txt2img("a cat", token_merging_ratio=0.5, **kw)
    assert seen == [0.0] * 3 + [0.5] * 6 and pipe.unet.token_merging_ratio == 0.0
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(merged[0]))
    assert np.array_equal(np.asarray(merged[0]), np.asarray(again[0]))
    assert "Token merging ratio" not in plain.infotexts[0]
    assert "Clip skip" not in merged.infotexts[0]
    assert ", Token merging ratio: 0.5, RNG: CPU, Version: " in merged.infotexts[0]
    assert parse_infotext(merged.infotexts[0])["Token merging ratio"] == "0.5"
    out = pipe.img2img(plain[0], "a dog", strength=0.5, token_merging_ratio=0.25, **kw)
    assert "Token merging ratio: 0.25" in out.infotexts[0] and seen[-1] == 0.25
    assert pipe.unet.token_merging_ratio == 0.0


@pytest.mark.parametrize("ratio", [-0.5, 0.76, "half", None])
def test_a_bad_token_merging_ratio_is_refused_before_any_work(pipe, monkeypatch, ratio):
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(sdlite.ArgumentError, match=r"token_merging_ratio must be a number in \[0, 0.75\]"):
        pipe.txt2img("a cat", seed=1, steps=1, token_merging_ratio=ratio)


# -- sampler settings ----------------------------------------------------------------------

def test_sampler_settings_reach_unipc_and_the_beta_schedule_and_the_beta_ones_the_infotext(pipe):
    from sdlite.schedulers import DiscreteSchedule

    kw = dict(seed=1, steps=6, output_type="np")
    default = pipe.txt2img("a cat", sampler="unipc", **kw)
    defaults = {"uni_pc_order": 3, "uni_pc_variant": "bh1", "uni_pc_lower_order_final": True,
                "uni_pc_skip_type": "time_uniform"}
    explicit = pipe.txt2img("a cat", sampler="unipc", sampler_settings=defaults, **kw)
    np.testing.assert_array_equal(explicit, default)  # A1111's defaults are sdlite's
    for settings in ({"uni_pc_order": 2}, {"uni_pc_variant": "bh2"}, {"uni_pc_variant": "vary_coeff"},
                     {"uni_pc_lower_order_final": False},
                     {"uni_pc_skip_type": "time_quadratic"}, {"uni_pc_skip_type": "logSNR"}):
        assert not np.array_equal(pipe.txt2img("a cat", sampler="unipc", sampler_settings=settings, **kw), default)
    assert np.array_equal(pipe.txt2img("a cat", sampler="unipc", sampler_settings={"beta_dist_alpha": 0.3}, **kw),
                          default)  # a Beta setting leaves UniPC alone
    settings = {"beta_dist_alpha": 0.3, "beta_dist_beta": 0.8}
    levels = get_sampler("euler").levels(DiscreteSchedule(), 5, "beta", settings=settings)
    torch.testing.assert_close(levels, DiscreteSchedule().get_sigmas(5, "beta", beta_dist_alpha=0.3,
                                                                     beta_dist_beta=0.8))
    image = pipe.txt2img("a cat", seed=1, steps=2, sampler="euler", schedule="beta", sampler_settings=settings)
    assert "Beta schedule alpha: 0.3, Beta schedule beta: 0.8" in image.infotexts[0]


def test_ddim_cfgpp_divides_the_guidance_scale_by_12_5_and_with_the_prompt_as_negative_is_ddim(pipe, monkeypatch):
    # A1111's "DDIM CFG++": CFG scales map onto CFG++'s lambda = scale / 12.5; with cond = uncond the
    # guided and unconditional predictions agree, and the step is DDIM's.
    kw = dict(negative_prompt="a cat", seed=1, steps=4, output_type="np")
    np.testing.assert_array_equal(pipe.txt2img("a cat", sampler="ddim_cfgpp", **kw),
                                  pipe.txt2img("a cat", sampler="ddim", **kw))
    scales = []
    model_fn = Pipeline._model_fn
    monkeypatch.setattr(Pipeline, "_model_fn",
                        lambda self, c, u, scale: scales.append(scale) or model_fn(self, c, u, scale))
    image = pipe.txt2img("a cat", seed=1, steps=2, sampler="DDIM CFG++", guidance_scale=1.0)
    assert scales == [1.0 / 12.5]  # and the negative prompt's prediction is there even at scale 1
    assert "Sampler: DDIM CFG++, CFG scale: 1," in image.infotexts[0]


# -- torch.compile -------------------------------------------------------------------------

def test_compile_traces_the_unet_as_one_graph_and_draws_the_eager_image():
    """``pipe.compile``: the compiler's tracer (dynamo) takes each UNet call whole (``fullgraph``: no
    graph break anywhere in sdlite's network), the module keeps its state-dict names, and the image
    is the eager one. The ``eager`` backend runs the traced graph without generating code, so this
    takes seconds; tests/test_cuda.py runs the real compiler (inductor) on a GPU."""
    eager, compiled = make_pipe(), make_pipe()
    names = list(compiled.unet.state_dict())
    ref = eager.txt2img("a cat", seed=3, steps=3, output_type="np")
    compiled.compile(backend="eager", fullgraph=True)
    image = compiled.txt2img("a cat", seed=3, steps=3, output_type="np")
    assert list(compiled.unet.state_dict()) == names
    assert compiled.unet._compiled_call_impl is not None and not compiled.cuda_graphs
    np.testing.assert_allclose(image, ref, rtol=0, atol=1e-5)


def test_the_loop_copies_a_compiled_unets_output_that_its_next_call_would_overwrite():
    """What compile's CUDA graphs do to an output, on the CPU: each call writes into one buffer and
    returns it. PLMS keeps earlier noise predictions, which at guidance 1 in fp32 are those outputs,
    so the loop must copy them; it does for a UNet compiled on CUDA (tests/test_cuda.py runs the
    real thing, and benchmarks/RESULTS-cuda.md the control without the copy)."""
    pipe = make_pipe()
    kwargs = dict(seed=3, steps=4, guidance_scale=1.0, sampler="plms", output_type="np")
    ref = pipe.txt2img("a cat", **kwargs)
    unet, buffer = pipe.unet, {}

    def graph_like(*args):
        out = unet(*args)
        return buffer.setdefault(out.shape, torch.empty_like(out)).copy_(out)

    pipe.unet = graph_like
    assert abs(pipe.txt2img("a cat", **kwargs) - ref).max() > 1e-3  # overwritten history: a wrong image
    pipe._compiled_graphs = True  # as Pipeline.compile sets it on CUDA
    np.testing.assert_array_equal(pipe.txt2img("a cat", **kwargs), ref)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(width=30), "multiples of 8"),
    (dict(height=0), "multiples of 8"),
    (dict(steps=0), "steps must be"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(batch_size=0), "batch_size"),
    (dict(prompt=["a cat", "a dog"], batch_size=3), "batch_size=3 but 2 prompts"),
    (dict(prompt=[]), "at least one prompt"),
    (dict(eta=-1.0), "eta must be"),
    (dict(eta=float("nan")), "eta must be"),
    (dict(eta=1.5, sampler="DDIM"), "eta must be ≥ 0 and ≤ 1 for DDIM"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),  # no DDIM step there (NaN in A1111)
    (dict(clip_skip=0), r"clip_skip must be in \[1, 2\]"),
    (dict(clip_skip=3), r"clip_skip must be in \[1, 2\]"),
    (dict(seed=-(2**63) - 1), "seed must be"),
    (dict(seed=2**64), "seed must be"),
    (dict(seed=2**64 - 1, batch_size=2), "seed must be"),
    (dict(prompt=["a cat", "a dog"], negative_prompt=["blurry"]), "2 prompts but 1 negative"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents must have shape"),
    (dict(sampler_settings={"uni_pc_ordre": 2}), "unknown sampler setting 'uni_pc_ordre'"),
    (dict(sampler_settings={"uni_pc_order": 0}), "integer >= 1"),
    (dict(sampler_settings={"uni_pc_order": True}), "integer >= 1"),
    (dict(sampler_settings={"uni_pc_variant": "bh3"}), "bh1, bh2, vary_coeff, got 'bh3'"),
    (dict(sampler_settings={"uni_pc_lower_order_final": "no"}), "true or false"),
    (dict(sampler_settings={"uni_pc_skip_type": "karras"}), "uni_pc_skip_type must be one of"),
    (dict(sampler_settings={"beta_dist_beta": float("nan")}), "positive number"),
    # wrong types and fractions: named, never a torch traceback or a silent cut (seed 3.7 is not seed 3)
    (dict(seed=3.7), "seed must be a whole number, got 3.7"),
    (dict(steps=2.9), "steps must be a whole number"),
    (dict(batch_size=2.5), "batch_size must be a whole number"),
    (dict(width=65.5), "width must be a whole number"),
    (dict(seed=True), "seed must be a whole number"),
    (dict(steps=None), "steps must be a whole number"),
    (dict(clip_skip=1.5), "clip_skip must be a whole number"),
    (dict(seed=torch.Generator()), "seed must be a whole number"),
    (dict(guidance_scale=None), "guidance_scale must be a number"),
    (dict(guidance_scale="high"), "guidance_scale must be a number"),
    (dict(prompt=None), "prompt must be a string or a list of strings"),
    (dict(prompt=["a cat", 3]), "prompt must be a string or a list of strings"),
    (dict(negative_prompt=5), "negative_prompt must be a string"),
    (dict(callback=5), "callback must be a function"),
    (dict(sampler_settings="uni_pc_order=2"), "sampler_settings must be a dict"),
    (dict(latents=[[1.0]]), "latents must be a torch.Tensor"),
    # img2img (the rows with an image)
    (dict(image=torch.zeros(1, 3, 40, 20), strength=None), "strength must be a number"),
    (dict(image=np.full((32, 32, 3), 128.0), strength=0.5), r"float init image must hold values in \[0, 1\]"),
    (dict(image=torch.full((3, 32, 32), -0.5)), r"got \[-0.5, -0.5\].*\(x \+ 1\) / 2"),
    (dict(image=torch.zeros(1, 3, 40, 20), resize_mode=4), "resize_mode must be one of: 0 ="),
    (dict(image=torch.zeros(1, 3, 40, 20), resize_mode="stretch"), "resize_mode must be one of: 0 ="),
    (dict(image=torch.zeros(1, 3, 40, 20), resize_mode="latent", width=30), "multiples of 8"),
    (dict(image=torch.zeros(1, 3, 40, 20), resize_mode="latent", steps=0), "steps must be"),
])
def test_bad_arguments_raise_argument_error_before_any_network_runs(pipe, monkeypatch, kwargs, match):
    def no_network(*args, **kwargs):
        raise AssertionError("a network ran before the arguments were checked")

    for net in (pipe.text_encoder, pipe.unet, pipe.vae):
        monkeypatch.setattr(net, "forward", no_network)
    for method in ("encode", "decode"):  # the VAE runs through these, not forward
        monkeypatch.setattr(pipe.vae, method, no_network)
    kwargs = {"prompt": "a cat", **kwargs}
    generate = pipe.img2img if "image" in kwargs else pipe.txt2img
    with pytest.raises(sdlite.ArgumentError, match=match):
        generate(**kwargs)


def test_whole_numbers_in_other_types_and_a_none_negative_prompt_are_taken_as_they_mean(pipe):
    """As a parsed infotext gives them (strings), as numpy or torch give them, or as diffusers' default
    (negative_prompt=None): each is the same run as with plain ints."""
    plain = pipe.txt2img("a cat", seed=3, steps=2, clip_skip=2, output_type="latent")
    for kwargs in (dict(seed="3", steps="2", clip_skip="2"), dict(seed=3.0, steps=np.int64(2), clip_skip=2.0),
                   dict(seed=torch.tensor(3), steps=2, clip_skip=2, negative_prompt=None)):
        assert torch.equal(pipe.txt2img("a cat", output_type="latent", **kwargs), plain), kwargs


def test_the_largest_seed_a_generator_takes_is_accepted(pipe):
    images = pipe.txt2img("a cat", seed=2**64 - 2, batch_size=2, steps=1)
    assert images.seeds == [2**64 - 2, 2**64 - 1]


def test_a_negative_seed_is_the_seed_two_to_the_64_plus_it_as_in_torch_and_a1111(pipe):
    # The A1111 web UI passes any seed but -1 to torch, which takes a negative s as 2**64 + s. The
    # infotext keeps the seed as given; -1 inside a batch (seed -2, image 1) is a seed, not "random".
    images = pipe.txt2img("a cat", seed=-2, batch_size=2, steps=1, output_type="latent")
    same = pipe.txt2img("a cat", seed=2**64 - 2, batch_size=2, steps=1, output_type="latent")
    assert torch.equal(images, same)
    pil = pipe.txt2img("a cat", seed=-2, batch_size=2, steps=1)
    assert pil.seeds == [-2, -1] and "Seed: -2," in pil.infotexts[0] and "Seed: -1," in pil.infotexts[1]
    smallest = pipe.txt2img("a cat", seed=-(2**63), steps=1)
    assert smallest.seeds == [-(2**63)]


@pytest.mark.parametrize("kwargs", [dict(device="quantum"), dict(prediction="x0"), dict(device="meta"),
                                    dict(dtype=torch.int8), dict(dtype=torch.float64)])
def test_load_rejects_a_bad_device_or_prediction_before_reading_the_file(tmp_path, kwargs):
    # The file does not exist: an ArgumentError (not a CheckpointError) shows the check came first.
    with pytest.raises(sdlite.ArgumentError):
        sdlite.load(tmp_path / "missing.safetensors", **kwargs)


def test_unknown_sampler_lists_the_valid_ones(pipe):
    with pytest.raises(sdlite.SamplerError, match="euler_a"):
        pipe.txt2img("a cat", sampler="warp drive")


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_img2img_strength_outside_0_1_is_rejected(pipe, strength):
    with pytest.raises(sdlite.ArgumentError, match="strength"):
        pipe.img2img(torch.zeros(1, 3, 32, 32), "a cat", strength=strength)


def test_init_images_of_every_kind_become_8_bit_rgb_with_their_brightness(tmp_path):
    grey16 = Image.fromarray(np.full((8, 8), 28000, dtype=np.uint16))  # a 16-bit PNG opens as I;16 / I
    grey16.save(tmp_path / "g16.png")
    assert np.asarray(_open_image(tmp_path / "g16.png")).tolist() == np.full((8, 8, 3), 109).tolist()  # 28000/257
    assert np.asarray(_open_image(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)))).max() == 128  # "F"
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # a transparent sketch background is white, as in A1111
    assert np.asarray(_open_image(clear)).min() == 255
    assert np.asarray(_open_image(np.zeros((8, 9, 3), dtype=np.uint8))).shape == (8, 9, 3)
    assert np.asarray(_open_image(np.ones((9, 8), dtype=np.float32))).min() == 255
    assert np.asarray(_open_image(torch.zeros(1, 3, 8, 8))).max() == 0
    assert np.asarray(_open_image(torch.ones(3, 8, 9))).shape == (8, 9, 3)
    assert np.asarray(_open_image(np.full((8, 8, 3), 28000, dtype=np.uint16))).max() == 109  # as the 16-bit PNG


@pytest.mark.parametrize("image, match", [
    (Image.new("RGB", (5, 5)), "at least 8x8"),
    (np.zeros((8, 8, 2), dtype=np.uint8), r"\[H, W, 3\|4\]"),
    (np.zeros((8, 8), dtype=np.int64), "uint8, uint16 or float"),
    (torch.zeros(8, 8, 3), r"must be \[3, H, W\] or \[1, 3, H, W\] \(channels first\).*got \[8, 8, 3\]"),
    (torch.zeros(2, 3, 8, 8), r"got \[2, 3, 8, 8\]"),
    (b"not an image", "PIL image, a file path"),
])
def test_unusable_init_images_are_rejected_with_what_is_wrong(image, match):
    with pytest.raises(sdlite.ArgumentError, match=match):
        _open_image(image)


def test_img2img_init_image_that_is_a_folder_or_not_an_image_is_rejected(tmp_path):
    with pytest.raises(sdlite.ArgumentError, match="is not a file"):
        _open_image(tmp_path)
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(sdlite.ArgumentError, match="cannot read init image"):
        _open_image(tmp_path / "notes.png")


def test_img2img_missing_init_image_is_rejected(pipe, tmp_path):
    with pytest.raises(sdlite.ArgumentError, match="does not exist"):
        pipe.img2img(tmp_path / "nope.png", "a cat")


# -- the CLI -------------------------------------------------------------------------------

def _cli(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_numbered_pngs_never_overwrites_and_is_deterministic(tiny_ckpt, tmp_path):
    args = ["--ckpt", tiny_ckpt, "--prompt", "a red circle, on the left", "--negative-prompt", "blurry",
            "--seed", 42, "--steps", 3, "--sampler", "DPM++ 2M", "--schedule", "karras", "--quiet"]
    first = _cli("txt2img.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = _cli("txt2img.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    out = tmp_path / "outputs" / "txt2img-samples"
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]
    assert (out / "00000.png").read_bytes() == (out / "00001.png").read_bytes()  # same seed → same bytes
    third = _cli("txt2img.py", *args[:-7], "--seed", 43, "--steps", 3, "--quiet", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert (out / "00002.png").read_bytes() != (out / "00000.png").read_bytes()

    params = parse_infotext(read_infotext(out / "00000.png"))
    assert params["Prompt"] == "a red circle, on the left" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "42" and params["Steps"] == "3" and params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras" and params["Size-1"] == "32" and params["Model"] == "tiny-sd1"


def test_sd_parsers_reads_our_png_back(tiny_ckpt, tmp_path):
    import sd_parsers

    res = _cli("txt2img.py", "--ckpt", tiny_ckpt, "--prompt", "a blue square at the top", "--seed", 5,
               "--steps", 2, "--n_samples", 2, "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = sd_parsers.ParserManager().parse(str(tmp_path / "outputs/txt2img-samples/00001.png"))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == ["a blue square at the top"]
    (sampler,) = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters["seed"] == "6"  # image 1 of the batch: seed + 1
    assert sampler.parameters["steps"] == "2"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert info.metadata["Size"] == "32x32"
    assert sampler.model.name == "tiny-sd1"


@pytest.mark.parametrize("args, match", [
    (["--sampler", "nope"], "unknown sampler"),
    (["--H", "30"], "multiple of 8"),
    (["--steps", "0"], "steps"),
    (["--ckpt", "missing.ckpt"], "no such checkpoint"),
])
def test_cli_rejects_bad_input_with_a_clear_message_and_writes_nothing(tmp_path, args, match):
    res = _cli("txt2img.py", "--prompt", "a cat", *args, cwd=tmp_path)
    assert res.returncode == 2
    assert match in res.stderr.lower() or match in res.stderr
    assert not (tmp_path / "outputs").exists()


def test_img2img_cli_rejects_missing_image_and_bad_strength(tiny_ckpt, tmp_path):
    res = _cli("img2img.py", "--ckpt", tiny_ckpt, "--prompt", "a cat", "--init-img", "nope.png", cwd=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "in.png").write_bytes(b"")
    res = _cli("img2img.py", "--ckpt", tiny_ckpt, "--prompt", "a cat", "--init-img", "in.png", "--strength", "0",
               cwd=tmp_path)
    assert res.returncode == 2 and "strength" in res.stderr


def _load_kwargs_of_cli(monkeypatch, tmp_path, argv):
    """The keyword arguments the CLI gives sdlite.load for ``argv`` (stopped before generating)."""
    from sdlite import cli
    from sdlite.errors import ArgumentError

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise ArgumentError("stop before generating")

    monkeypatch.setattr(sdlite, "load", fake_load)
    monkeypatch.chdir(tmp_path)
    assert cli.run(["--prompt", "a cat", *argv], img2img=False) == 2
    return seen


@pytest.mark.parametrize("flag, expected", [([], None), (["--no-cuda-graphs"], False)])
def test_cli_passes_the_cuda_graphs_choice_to_load(monkeypatch, tmp_path, flag, expected):
    # None: load's default (on for CUDA)
    assert _load_kwargs_of_cli(monkeypatch, tmp_path, flag)["cuda_graphs"] is expected


@pytest.mark.parametrize("flag, off", [([], False), (["--no-fused-kernels"], True)])
def test_cli_turns_sdlites_own_kernels_off_on_request(monkeypatch, tmp_path, flag, off):
    from sdlite import ops

    monkeypatch.setattr(ops, "FUSED_GROUP_NORM", ("cuda",))  # restored after the test
    monkeypatch.setattr(ops, "FUSED_GELU", ("cuda",))
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ("cpu",))
    _load_kwargs_of_cli(monkeypatch, tmp_path, flag)
    assert ops.FUSED_GROUP_NORM == ops.FUSED_GELU == (() if off else ("cuda",))
    assert ops.FUSED_ATTENTION == (() if off else ("cpu",))


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_shows_the_librarys_notes_unless_quiet(monkeypatch, tmp_path, capsys, quiet):
    # Such as the one-time build of the CUDA kernels (sdlite.ops), which would otherwise leave the first
    # step waiting without a word; only while the command runs.
    import logging

    from sdlite import cli

    def load(*args, **kwargs):
        logging.getLogger("sdlite").info("building the kernels")
        raise sdlite.ArgumentError("stop before generating")

    monkeypatch.setattr(sdlite, "load", load)
    monkeypatch.chdir(tmp_path)
    assert cli.run(["--prompt", "a cat", *(["--quiet"] if quiet else [])], img2img=False) == 2
    assert ("building the kernels" in capsys.readouterr().err) is not quiet
    assert not logging.getLogger("sdlite").handlers  # removed again


@pytest.mark.parametrize("flag, expected", [([], None), (["--precision", "full"], "fp32"),
                                            (["--precision", "autocast"], "autocast"),
                                            (["--precision", "bf16"], "bf16")])
def test_cli_passes_the_precision_to_load(monkeypatch, tmp_path, flag, expected):
    # "autocast" is its own precision (fp32 weights under autocast), not a name for the default.
    assert _load_kwargs_of_cli(monkeypatch, tmp_path, flag)["dtype"] == expected


def test_cli_passes_sampler_settings_to_the_pipeline_and_refuses_bad_ones_before_loading(monkeypatch, tmp_path,
                                                                                          capsys):
    from sdlite import cli

    seen = {}

    class Recorder:
        def txt2img(self, prompt, **kwargs):
            seen.update(kwargs)
            raise sdlite.ArgumentError("stop before generating")

    monkeypatch.setattr(sdlite, "load", lambda *args, **kwargs: Recorder())
    monkeypatch.chdir(tmp_path)
    argv = ["--prompt", "a cat", "--sampler", "unipc", "--sampler-setting", "uni_pc_order=2",
            "--sampler-setting", "uni_pc_lower_order_final=False", "--sampler-setting", "beta_dist_alpha=0.5"]
    assert cli.run(argv, img2img=False) == 2
    assert seen["sampler_settings"] == {"uni_pc_order": 2, "uni_pc_lower_order_final": False, "beta_dist_alpha": 0.5}
    monkeypatch.setattr(sdlite, "load", lambda *args, **kwargs: pytest.fail("loaded before checking"))
    for bad, message in (("uni_pc_order=two", "uni_pc_order takes an integer"), ("order=2", "give NAME=VALUE"),
                         ("uni_pc_variant=bh3", "bh1, bh2, vary_coeff")):
        assert cli.run(["--prompt", "a cat", "--sampler-setting", bad], img2img=False) == 2
        assert message in capsys.readouterr().err
