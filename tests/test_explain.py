"""Study mode (sdlite.explain, scripts/explain.py, docs/how-it-works.md) on a tiny random pipeline:
the numbers behind the figures are right, every function writes its files and nothing else, and
every python block of the document runs.

The document's blocks call ``sdlite.load(device="cpu")`` (the bundled model). Here ``sdlite.load`` is
monkeypatched to return the tiny random pipeline of tests/test_pipeline.py, so the blocks run — and
their asserts are checked — without any weights on disk.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import sdlite
from sdlite import explain
from sdlite.errors import ArgumentError
from sdlite.schedulers import SAMPLERS, get_sampler

from test_pipeline import make_pipe

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "how-it-works.md"


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


# -- the numbers behind the figures ------------------------------------------------------------------

def test_forward_process_latents_have_variance_abar_var_x0_plus_one_minus_abar(pipe, tmp_path):
    # A 64x64 image gives a 4x32x32 latent with the tiny VAE (factor 2): 4,096 values per t, so a sample
    # variance has a relative standard error of about sqrt(2/4096) = 2.2%; the tolerance is 10% relative
    # (the pixels: 3x64x64 = 12,288 values, 1.3%, tolerance 6%). One seeded draw: the test is deterministic.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = torch.stack([xx, yy, (xx + yy) / 2])[None]
    r = explain.forward_process(pipe, image, tmp_path, seed=3)
    x0, noise, latents = r["x0"], r["noise"], r["latents"]
    assert latents.shape == (len(explain.FORWARD_TIMESTEPS), 4, 32, 32)
    var_x0, var_px = float(x0.var()), float((image * 2 - 1).var())
    for k, t in enumerate(r["t"]):
        abar = float(pipe.schedule.alphas_cumprod[t])
        assert r["alphas_cumprod"][k] == pytest.approx(abar, rel=1e-12)
        assert r["snr"][k] == pytest.approx(abar / (1 - abar), rel=1e-9)
        # closed form, exact up to float32 rounding: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        expected = abar**0.5 * x0[0] + (1 - abar) ** 0.5 * noise[0]
        assert torch.allclose(latents[k], expected, atol=1e-5 * float(expected.abs().max()))
        # the statistical fact
        assert float(latents[k].var()) == pytest.approx(abar * var_x0 + (1 - abar), rel=0.10)
        assert float(r["pixels"][k].var()) == pytest.approx(abar * var_px + (1 - abar), rel=0.06)
    assert r["decoded"].shape == r["pixels"].shape == (len(r["t"]), 3, 64, 64)


def test_reverse_process_last_predicted_x0_is_the_output_latent(pipe, tmp_path):
    prompt, seed, steps = "a blue square at the top", 5, 3
    for sampler in ("euler", "dpmpp_2m"):
        r = explain.reverse_process(pipe, prompt, seed, sampler, steps, tmp_path)
        out = pipe.txt2img(prompt, seed=seed, steps=steps, sampler=sampler, output_type="latent")
        assert r["pred_x0"].shape[0] == steps and r["x_t"].shape[0] == steps
        assert r["t"] == sorted(r["t"], reverse=True)
        # Euler's last step x + (0 - sigma)(x - D)/sigma equals D up to rounding; DPM++ 2M returns D itself.
        assert torch.allclose(r["pred_x0"][-1:], out, atol=1e-5 * float(out.abs().max()))
        assert torch.equal(r["final"], out)
    # DPM++ 2M's last step is `x = denoised`: bit for bit
    assert torch.equal(r["pred_x0"][-1:], r["final"])


def test_reverse_process_shows_the_vp_latent_the_unet_sees(pipe, tmp_path):
    # k-samplers start at x = sigma_max * noise; the UNet gets x / sqrt(1 + sigma^2) (variance ≈ 1).
    r = explain.reverse_process(pipe, "a cat", 2, "euler", 2, tmp_path)
    noise = pipe.initial_noise([2], 32, 32)
    s = r["sigma"][0]
    assert s == pytest.approx(pipe.schedule.sigma_max, rel=1e-6)
    assert torch.allclose(r["x_t"][0:1], noise * s / (1 + s * s) ** 0.5, atol=1e-6)
    # DDIM works on x_t directly: its first input is the unit noise itself
    r = explain.reverse_process(pipe, "a cat", 2, "ddim", 2, tmp_path)
    assert torch.equal(r["x_t"][0:1], noise)


def test_schedules_snr_decreases_and_karras_runs_from_sigma_max_to_sigma_min_then_zero(pipe, tmp_path):
    steps = 10
    r = explain.schedules(pipe, steps, tmp_path)
    snr = torch.tensor(r["snr"], dtype=torch.float64)
    assert len(snr) == 1000 and bool((snr[1:] < snr[:-1]).all())
    assert torch.allclose(torch.tensor(r["sigma"], dtype=torch.float64), 1 / snr.sqrt(), rtol=1e-12, atol=0)
    k = r["karras_sigmas"]
    assert len(k) == steps + 1 and k[-1] == 0.0
    assert k[0] == pytest.approx(pipe.schedule.sigma_max, rel=1e-12)
    assert k[-2] == pytest.approx(pipe.schedule.sigma_min, rel=1e-12)
    assert r["karras_t"][0] == pytest.approx(999, abs=1e-6) and r["karras_t"][-1] == pytest.approx(0, abs=1e-6)
    # Karras spends more steps at low noise than the model's uniform-in-t levels do
    uniform_t = pipe.schedule.sigma_to_t(torch.tensor(r["uniform_sigmas"][:-1], dtype=torch.float64)).tolist()
    assert sum(t < 200 for t in r["karras_t"]) > sum(t < 200 for t in uniform_t)
    # The timesteps each sampler's steps start from, as its callback reports them: one per step, where the
    # sampler takes `steps` steps; DPM fast takes floor(n / 3) + 1; DPM adaptive its own (a rejected step is
    # retried from the same level).
    assert set(r["visits"]) == {s.id for s in SAMPLERS}
    for spec in SAMPLERS:
        ts = r["visits"][spec.id]
        expected = spec.steps_fn(steps) if spec.steps_fn else steps
        assert len(ts) == expected if expected is not None else len(ts) >= 1, spec.id
        assert all(0 <= t <= 999.0001 for t in ts) and all(a >= b for a, b in zip(ts, ts[1:])), spec.id
    assert len(r["visits"]["dpm_fast"]) == 4
    # From 20 steps A1111's Restart climbs back to a higher noise level once, and descends again.
    ts = explain._visited_timesteps(get_sampler("restart"), pipe.schedule, 20)
    assert len(ts) == 20 and sum(b > a for a, b in zip(ts, ts[1:])) == 1


def test_guided_predicted_x0_is_the_same_extrapolation_of_cond_and_uncond(pipe, tmp_path):
    scales = (1.0, 4.0)
    r = explain.guidance(pipe, "a green triangle in the center", 4, scales, tmp_path, steps=4)
    x0_c, x0_u = r["pred_x0_cond"], r["pred_x0_uncond"]
    assert not torch.allclose(x0_c, x0_u)  # the text changes the prediction, so the check below can fail
    for k, s in enumerate(scales):
        expected = x0_u + s * (x0_c - x0_u)
        # the guided x0 comes from Pipeline._model_fn (cond and uncond batched): 1e-4 of the max value
        assert torch.allclose(r["pred_x0_guided"][k:k + 1], expected, atol=1e-4 * float(expected.abs().max()))
    assert r["step"] == 1 and r["final_latents"].shape[0] == len(scales)


# -- files ---------------------------------------------------------------------------------------------

def test_explain_all_writes_every_figure_and_nothing_else(pipe, tmp_path):
    steps = 2
    results = explain.explain_all(pipe, tmp_path, steps=steps)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(explain.figure_names())
    files = [f for r in results.values() for rr in (r.values() if "files" not in r else [r]) for f in rr["files"]]
    assert sorted(f.name for f in files) == written
    for f in files:
        with Image.open(f) as im:
            im.verify()
    with Image.open(tmp_path / "reverse_process_euler.gif") as gif:
        assert gif.n_frames == steps + 1  # every step, then the output
    # running again replaces its own figures
    explain.schedules(pipe, steps, tmp_path)


def test_refuses_to_write_through_a_link_and_writes_nothing(pipe, tmp_path):
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"keep me")
    outdir = tmp_path / "figs"
    outdir.mkdir()
    (outdir / "schedules.png").symlink_to(outside)
    with pytest.raises(ArgumentError, match="link"):
        explain.explain_all(pipe, outdir, steps=1)
    assert outside.read_bytes() == b"keep me"
    assert sorted(p.name for p in outdir.iterdir()) == ["schedules.png"]


def test_script_main_draws_all_figures_and_rejects_a_file_as_outdir(pipe, tmp_path, capsys):
    ckpt = sdlite.save(pipe, tmp_path / "tiny.safetensors")
    out = tmp_path / "figs"
    assert explain.main(["--ckpt", str(ckpt), "--outdir", str(out), "--steps", "1", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(explain.figure_names())
    assert explain.main(["--ckpt", str(ckpt), "--outdir", str(ckpt), "--steps", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err


# -- the document --------------------------------------------------------------------------------------

def test_every_python_block_in_how_it_works_runs(pipe, tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert len(blocks) >= 8
    # sdlite.load() would read the bundled model; the blocks get the tiny pipeline instead.
    monkeypatch.setattr(sdlite, "load", lambda *args, **kwargs: pipe)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "how_it_works"}
    for k, block in enumerate(blocks):
        try:
            exec(compile(block, f"how-it-works.md block {k}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"python block {k} of {DOC.name} fails: {e!r}\n{block}") from e
    assert list(tmp_path.iterdir()) == []  # the blocks write no files


def test_how_it_works_links_only_figures_that_explain_writes():
    text = DOC.read_text(encoding="utf-8")
    links = re.findall(r"\]\((figures/[^)]+)\)", text)
    names = set(explain.figure_names())
    assert {Path(link).name for link in links} == names  # every figure shown, none missing
    assert "python scripts/explain.py\n" in text          # the command that regenerates them
    for url in re.findall(r"arxiv\.org/abs/([0-9.]+)", text):
        assert url in {"2006.11239", "2010.02502", "2112.10752", "2206.00364", "2211.01095", "2207.12598",
                       "2202.00512"}
