"""The "Beta" schedule type (A1111's ``beta_scheduler``, Lee et al. 2024) and the Beta quantile it needs.

A1111 (``modules/sd_schedulers.py``, 1.10) computes it as::

    t = 1 - np.linspace(0, 1, n)
    sigmas = [sigma_min + stats.beta.ppf(x, alpha, beta) * (sigma_max - sigma_min) for x in t] + [0.0]

with alpha = beta = 0.6 (its options ``beta_dist_alpha`` / ``beta_dist_beta``) and the model's sigma_min /
sigma_max. sdlite writes the quantile itself; the reference here is scipy (a test-only dependency: a missing
scipy must fail, not skip) and the ldm schedule in float64 numpy, independently of sdlite's code.

Tolerances: the quantile and the CDF are compared with scipy at 1e-12 absolute (measured: <= 5e-14, and
<= 1e-15 for the four shapes 0.6/0.6, 0.5/2, 3/0.7, 1/1); the sigmas at 1e-6 relative (float32 output).
sdlite takes the model's sigma range in float64, as for every schedule; A1111 reads it from float32 buffers,
whose rounding of 1 - alphabar_0 moves sigma_min by 1.3e-5 relative (see tests/test_schedulers.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
import torch
from scipy import special, stats  # test-only dependency: a missing package must fail, not skip

import sdlite
from sdlite.cli import txt2img_main
from sdlite.errors import ArgumentError
from sdlite.infotext import parse_infotext, read_infotext
from sdlite.schedulers import SCHEDULES, DiscreteSchedule, get_sampler, get_schedule_name, schedule_label
from sdlite.schedulers.beta_dist import beta_ppf, incomplete_beta
from sdlite.webui.server import ServerThread, create_app

from test_pipeline import make_pipe
from test_webui_api import free_port

SCHED = DiscreteSchedule()
SHAPES = [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0), (0.01, 0.01), (2.0, 2.0)]  # + the slider minimum, a bell
QUANTILES = np.concatenate([np.linspace(0, 1, 1001), [1e-12, 1e-9, 1e-6, 1 - 1e-6, 1 - 1e-9]])

# The model's sigma range: ldm's "linear" schedule written out in float64 numpy.
_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
_ALPHAS_CUMPROD = np.cumprod(1 - _BETAS)
_SIGMAS = np.sqrt((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD)
SIGMA_MIN, SIGMA_MAX = float(_SIGMAS[0]), float(_SIGMAS[-1])


def a1111_beta_sigmas(n: int, alpha: float = 0.6, beta: float = 0.6, lo: float = SIGMA_MIN,
                      hi: float = SIGMA_MAX) -> np.ndarray:
    """A1111's beta_scheduler, written from its definition with scipy's quantile, float32 as it returns it."""
    t = 1 - np.linspace(0, 1, n)
    return np.append(lo + stats.beta.ppf(t, alpha, beta) * (hi - lo), 0.0).astype(np.float32)


# -- the Beta distribution --------------------------------------------------------------------------------

# scipy's own root finder (boost) warns that it gave up iterating at a tail quantile of Beta(0.5, 2); its
# answer there still agrees with ours to 1e-12.
@pytest.mark.filterwarnings("ignore:Error in function boost")
@pytest.mark.parametrize("a, b", SHAPES)
def test_beta_ppf_equals_scipy_beta_ppf_to_1e_12_at_every_quantile(a, b):
    ours = np.array([beta_ppf(q, a, b) for q in QUANTILES])
    np.testing.assert_allclose(ours, stats.beta.ppf(QUANTILES, a, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("a, b", SHAPES)
def test_incomplete_beta_equals_scipy_betainc_to_1e_12(a, b):
    xs = np.concatenate([np.linspace(0, 1, 1001), [1e-300, 1e-12, 1 - 1e-12]])
    ours = np.array([incomplete_beta(x, a, b) for x in xs])
    np.testing.assert_allclose(ours, special.betainc(a, b, xs), rtol=0, atol=1e-12)


def test_beta_ppf_and_cdf_are_exact_at_the_ends_and_for_the_uniform_distribution():
    for a, b in SHAPES:
        assert (beta_ppf(0.0, a, b), beta_ppf(1.0, a, b)) == (0.0, 1.0)
        assert (incomplete_beta(0.0, a, b), incomplete_beta(1.0, a, b)) == (0.0, 1.0)
    for q in (0.1, 0.25, 0.5, 0.9):  # Beta(1, 1) is uniform: I_x = x, ppf(q) = q
        assert beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-15)
        assert incomplete_beta(q, 1.0, 1.0) == pytest.approx(q, abs=1e-15)


@pytest.mark.parametrize("a, b, q", [(0.0, 0.6, 0.5), (0.6, -1.0, 0.5), (math.nan, 0.6, 0.5), (0.6, math.inf, 0.5),
                                     (0.6, 0.6, -0.1), (0.6, 0.6, 1.1), (0.6, 0.6, math.nan)])
def test_beta_ppf_rejects_non_positive_shapes_and_probabilities_outside_0_1(a, b, q):
    with pytest.raises(ArgumentError):
        beta_ppf(q, a, b)
    with pytest.raises(ArgumentError):
        incomplete_beta(q, a, b)


# -- the schedule -----------------------------------------------------------------------------------------

def test_beta_is_a1111s_schedule_type_after_ddim_with_id_beta_and_label_Beta():
    assert [s.id for s in SCHEDULES][-2:] == ["ddim", "beta"]
    assert get_schedule_name("Beta") == get_schedule_name("beta") == "beta"
    assert schedule_label("beta") == "Beta"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 20, 30, 150])
def test_beta_sigmas_equal_a1111s_formula_with_scipy_and_the_model_sigma_range(n):
    ours = SCHED.get_sigmas(n, "Beta")
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
    np.testing.assert_allclose(ours.numpy(), a1111_beta_sigmas(n), rtol=1e-6, atol=0)


def test_beta_sigmas_follow_the_given_alpha_beta_and_sigma_range():
    ours = SCHED.get_sigmas(12, "beta", beta_dist_alpha=0.5, beta_dist_beta=2.0, sigma_min=0.1, sigma_max=10.0)
    np.testing.assert_allclose(ours.numpy(), a1111_beta_sigmas(12, 0.5, 2.0, 0.1, 10.0), rtol=1e-6, atol=0)
    # alpha = beta = 1 is the uniform distribution: sigmas linear from sigma_max to sigma_min.
    linear = SCHED.get_sigmas(5, "beta", beta_dist_alpha=1, beta_dist_beta=1, dtype=torch.float64)[:-1]
    torch.testing.assert_close(linear, torch.linspace(SCHED.sigma_max, SCHED.sigma_min, 5, dtype=torch.float64),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 50, 150])
def test_beta_sigmas_start_at_sigma_max_end_in_sigma_min_then_zero_and_strictly_decrease(n):
    s = SCHED.get_sigmas(n, "beta", dtype=torch.float64)
    assert s[0].item() == SCHED.sigma_max and s[-1].item() == 0.0
    if n > 1:
        assert s[-2].item() == pytest.approx(SCHED.sigma_min, rel=1e-15)
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.6), (0.6, 0.0), (-0.6, 0.6), (0.6, math.nan), (math.inf, 0.6)])
def test_beta_schedule_rejects_alpha_or_beta_that_is_not_positive(alpha, beta):
    with pytest.raises(ArgumentError, match="beta_dist_alpha"):
        SCHED.get_sigmas(10, "beta", beta_dist_alpha=alpha, beta_dist_beta=beta)


def test_img2img_with_beta_keeps_the_last_t_enc_plus_1_steps_of_the_beta_sigmas():
    sigmas = SCHED.get_sigmas(10, "beta")
    levels = get_sampler("euler").levels(SCHED, 10, "Beta", strength=0.5)  # t_enc = 5: sigmas[10 - 5 - 1:]
    torch.testing.assert_close(levels, sigmas[4:], rtol=0, atol=0)


# -- the library, the CLI and the web UI ------------------------------------------------------------------

BETA_INFOTEXT = "Schedule type: Beta, CFG scale: 7.5, Seed: 3, Size: 32x32"
BETA_SHAPES_INFOTEXT = "Beta schedule alpha: 0.6, Beta schedule beta: 0.6"


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_txt2img_with_schedule_beta_runs_at_the_beta_timesteps_and_writes_a1111s_infotext(pipe):
    seen = []
    images = pipe.txt2img("a cat", seed=3, steps=4, sampler="euler", schedule="beta",
                          callback=lambda i, t, x: seen.append(t))
    expected_t = SCHED.sigma_to_t(SCHED.get_sigmas(4, "beta")[:-1])
    np.testing.assert_allclose(seen, expected_t.numpy(), rtol=1e-6)
    text = images.infotexts[0]
    assert BETA_INFOTEXT in text and BETA_SHAPES_INFOTEXT in text
    params = parse_infotext(text)
    assert get_schedule_name(params["Schedule type"]) == "beta"
    assert (params["Beta schedule alpha"], params["Beta schedule beta"]) == ("0.6", "0.6")
    assert "Beta schedule" not in pipe.txt2img("a cat", seed=3, steps=2, schedule="karras").infotexts[0]


def test_img2img_with_schedule_beta_runs_t_enc_plus_1_steps(pipe):
    image = pipe.txt2img("a cat", seed=1, steps=2)[0]
    seen = []
    out = pipe.img2img(image, "a cat", strength=0.5, steps=10, seed=2, sampler="euler", schedule="beta",
                       callback=lambda i, t, x: seen.append(t))
    expected_t = SCHED.sigma_to_t(SCHED.get_sigmas(10, "beta")[4:-1])
    np.testing.assert_allclose(seen, expected_t.numpy(), rtol=1e-6)
    assert "Schedule type: Beta" in out.infotexts[0] and "Denoising strength: 0.5" in out.infotexts[0]


def test_cli_schedule_beta_writes_a_png_whose_infotext_says_beta(pipe, tmp_path):
    ckpt = sdlite.save(pipe, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    code = txt2img_main(["--ckpt", str(ckpt), "--prompt", "a cat", "--seed", "3", "--steps", "2",
                         "--schedule", "beta", "--outdir", str(out), "--quiet"])
    assert code == 0
    (png,) = out.iterdir()
    params = parse_infotext(read_infotext(png))
    assert params["Schedule type"] == "Beta" and params["Beta schedule alpha"] == "0.6"


def test_webui_lists_beta_and_its_txt2img_records_it_as_a1111_does(pipe, tmp_path):
    sdlite.save(pipe, tmp_path / "tiny.safetensors")
    with ServerThread(create_app(tmp_path, ckpt=tmp_path / "tiny.safetensors"), port=free_port()) as server:
        schedulers = requests.get(f"{server.url}/sdapi/v1/schedulers", timeout=30).json()
        assert {"name": "beta", "label": "Beta", "aliases": None, "default_rho": -1.0,
                "need_inner_model": True} in schedulers
        r = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json=dict(
            prompt="a cat", seed=3, steps=2, sampler_name="Euler", scheduler="Beta", width=32, height=32))
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
    assert info["extra_generation_params"] == {"Schedule type": "Beta", "Beta schedule alpha": 0.6,
                                               "Beta schedule beta": 0.6}
    assert BETA_SHAPES_INFOTEXT in info["infotexts"][0]
