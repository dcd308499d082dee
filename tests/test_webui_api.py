"""The web UI's AUTOMATIC1111-compatible HTTP API, driven by the unchanged PyPI client ``webuiapi``.

The server runs in this process on a free port (uvicorn on a background thread) over a folder holding two
tiny random checkpoints; every generation uses a few steps at 32×32 pixels.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import webuiapi  # test-only dependency: a missing package must fail, not skip
from PIL import Image

import sdlite
from sdlite.infotext import parse_infotext
from sdlite.pipeline import Pipeline
from sdlite.webui.server import ETA_OPTIONS, LATENT_RGB, ServerThread, State, create_app, latent_preview, main

from test_pipeline import make_pipe

SIZE = dict(width=32, height=32)

# The keys of A1111's Processed.js() (modules/processing.py), which clients read from json.loads(info).
PROCESSED_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("Stable-diffusion")
    sdlite.save(make_pipe(seed=0), folder / "tiny-a.safetensors")
    sdlite.save(make_pipe(seed=1), folder / "tiny-b.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(ckpt_dir):
    # --ckpt makes tiny-a the starting model even where the bundled model is installed (it is listed too).
    with ServerThread(create_app(ckpt_dir, ckpt=ckpt_dir / "tiny-a.safetensors"), port=free_port()) as s:
        yield s


@pytest.fixture
def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=server.host, port=server.port, sampler="Euler a", steps=2)


def pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


def title_of(api: webuiapi.WebUIApi, stem: str) -> str:
    return next(m["title"] for m in api.get_sd_models() if m["model_name"] == stem)


# -- generation ----------------------------------------------------------------------------------

def test_txt2img_returns_pngs_carrying_the_a1111_infotext_and_processed_info(api):
    import sd_parsers  # test-only dependency: a missing package must fail, not skip

    r = api.txt2img(prompt="a red circle, (left:1.2)", negative_prompt="blurry", seed=42, steps=2,
                    sampler_name="DPM++ 2M", scheduler="exponential", cfg_scale=5, batch_size=2, n_iter=2, **SIZE)
    assert len(r.images) == 4
    assert PROCESSED_KEYS <= set(r.info)
    assert r.info["all_seeds"] == [42, 43, 44, 45] and r.info["seed"] == 42
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["sd_model_name"] == "tiny-a"
    assert r.info["extra_generation_params"] == {"Schedule type": "Exponential"}
    assert r.parameters["prompt"] == "a red circle, (left:1.2)" and r.parameters["n_iter"] == 2
    for i, image in enumerate(r.images):
        assert image.format == "PNG" and image.size == (32, 32)
        text = image.info["parameters"]
        assert text == r.info["infotexts"][i]
        p = parse_infotext(text)
        assert (p["Prompt"], p["Negative prompt"]) == ("a red circle, (left:1.2)", "blurry")
        assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"]) == \
               ("2", "DPM++ 2M", "Exponential", "5", str(42 + i))
        assert (p["Size-1"], p["Size-2"], p["Model"]) == ("32", "32", "tiny-a")
    # the PNG as it came over the wire → a third-party reader that knows A1111 files
    info = sd_parsers.ParserManager().parse(Image.open(io.BytesIO(base64.b64decode(r.json["images"][0]))))
    assert info.generator.name == "AUTOMATIC1111"


def test_the_same_seed_gives_the_same_image_and_another_seed_another_image(api):
    a = api.txt2img(prompt="a cat", seed=7, steps=2, **SIZE)
    b = api.txt2img(prompt="a cat", seed=8, steps=2, **SIZE)
    c = api.txt2img(prompt="a cat", seed=7, steps=2, **SIZE)
    assert pixels(c.images[0]) == pixels(a.images[0])
    assert pixels(b.images[0]) != pixels(a.images[0])


def test_img2img_redraws_the_init_image_with_the_denoising_strength_in_the_infotext(api):
    init = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    r = api.img2img(images=[init], prompt="a green triangle", denoising_strength=0.5, steps=4, seed=3, **SIZE)
    assert len(r.images) == 1 and r.images[0].size == (32, 32)
    assert r.info["denoising_strength"] == 0.5
    assert parse_infotext(r.images[0].info["parameters"])["Denoising strength"] == "0.5"
    assert r.parameters["init_images"] is None  # as A1111, the init images are not echoed back
    other = api.img2img(images=[init.transpose(Image.FLIP_LEFT_RIGHT)], prompt="a green triangle",
                        denoising_strength=0.5, steps=4, seed=3, **SIZE)
    assert pixels(other.images[0]) != pixels(r.images[0])  # the init image matters


def test_png_info_reads_the_parameters_chunk_back(api):
    image = api.txt2img(prompt="a blue square", seed=11, steps=2, **SIZE).images[0]
    r = api.png_info(image)
    assert r.info == image.info["parameters"]
    assert r.json["parameters"]["Seed"] == "11" and r.json["parameters"]["Prompt"] == "a blue square"


# -- lists and options ---------------------------------------------------------------------------

def test_models_samplers_schedulers_and_scripts_have_a1111_shapes(api, ckpt_dir):
    models = api.get_sd_models()
    assert {"tiny-a", "tiny-b"} <= {m["model_name"] for m in models}
    for m in models:
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert str(ckpt_dir / "tiny-b.safetensors") in {m["filename"] for m in models}
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    schedulers = {s["name"]: s for s in api.get_schedulers()}
    assert schedulers["karras"]["label"] == "Karras" and schedulers["karras"]["default_rho"] == 7.0
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


def test_options_switch_the_model_and_an_unknown_model_is_refused(api):
    a, b = title_of(api, "tiny-a"), title_of(api, "tiny-b")
    try:
        api.util_set_model(b, find_closest=False)
        assert api.util_get_current_model().startswith("tiny-b.safetensors [")  # hashed when loaded
        rb = api.txt2img(prompt="a cat", seed=5, steps=2, **SIZE)
        assert rb.info["sd_model_name"] == "tiny-b"
        assert "Model: tiny-b" in rb.images[0].info["parameters"]
        r = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "no-such-model"})
        assert r.status_code == 400 and "not found" in r.json()["errors"]
        assert api.util_get_current_model().startswith("tiny-b")
    finally:
        api.util_set_model(a, find_closest=False)
    ra = api.txt2img(prompt="a cat", seed=5, steps=2, **SIZE)
    assert ra.info["sd_model_name"] == "tiny-a"
    assert pixels(ra.images[0]) != pixels(rb.images[0])
    # a per-request override, restored afterwards
    rb2 = api.txt2img(prompt="a cat", seed=5, steps=2, override_settings={"sd_model_checkpoint": "tiny-b"}, **SIZE)
    assert pixels(rb2.images[0]) == pixels(rb.images[0])
    assert api.util_get_current_model().startswith("tiny-a")


# -- progress and interrupt ----------------------------------------------------------------------

class StepGate:
    """Holds the worker thread inside ``State.step`` at sampling step ``at``, after that step's counter and
    latent are recorded and before the pipeline callback reads the interrupt flag, until ``release`` is set.

    The test then reads ``/progress`` at a known step and can interrupt before the sampler goes on, so nothing
    depends on how fast the machine is. ``steps`` lists every step number the sampler reported."""

    def __init__(self, monkeypatch, at: int):
        self.at, self.steps, self.latent = at, [], None
        self.reached, self.release = threading.Event(), threading.Event()
        original = State.step

        def step(state: State, n: int, latent: torch.Tensor) -> None:
            original(state, n, latent)
            self.steps.append(n)
            if n == self.at and not self.release.is_set():
                self.latent = latent
                self.reached.set()
                self.release.wait()

        monkeypatch.setattr(State, "step", step)


HANG = 120  # seconds; only turns a hang into a failure, no assertion depends on how fast a step is


def test_progress_reports_steps_and_a_latent_preview_and_interrupt_stops_the_generation(api, server, monkeypatch):
    gate = StepGate(monkeypatch, at=3)
    result: dict = {}

    def run():
        client = webuiapi.WebUIApi(host=server.host, port=server.port)
        result["r"] = client.txt2img(prompt="a long one", seed=1, steps=20, **SIZE)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert gate.reached.wait(HANG), "the generation never reached step 3"
        # held at step 3 of 20: /progress reports that step and its latent
        p = api.get_progress()
        assert p["state"]["job_count"] == 1
        assert (p["state"]["sampling_step"], p["state"]["sampling_steps"]) == (3, 20)
        assert p["progress"] == pytest.approx(0.01 + 3 / 20) and p["eta_relative"] > 0
        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.size == (32, 32)  # the 16×16 latent, upscaled by the VAE factor
        assert pixels(preview) == pixels(latent_preview(gate.latent, 2))  # the preview of step 3's latent

        assert api.interrupt() == {}
        assert api.get_progress()["state"]["interrupted"] is True
    finally:
        gate.release.set()
    worker.join(timeout=HANG)
    assert not worker.is_alive(), "the interrupted request never returned"
    assert gate.steps == [1, 2, 3]  # the sampler stopped at the step where it saw the interrupt
    interrupted = result["r"].images
    assert len(interrupted) == 1  # A1111 returns what it had when interrupted: step 3's denoised estimate
    idle = api.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0

    # the next job is not interrupted: all 20 steps, and a different picture from the stopped one
    gate.steps.clear()
    full = api.txt2img(prompt="a long one", seed=1, steps=20, **SIZE).images
    assert gate.steps == list(range(1, 21))
    assert pixels(full[0]) != pixels(interrupted[0])


def test_an_interrupted_job_reports_the_seeds_of_every_image_asked_for_as_a1111(api, monkeypatch):
    original = State.step

    def interrupt_at_once(state, n, latent):
        original(state, n, latent)
        state.interrupted = True

    monkeypatch.setattr(State, "step", interrupt_at_once)
    r = api.txt2img(prompt="x", seed=7, steps=3, n_iter=3, **SIZE)
    assert len(r.images) == 1 and len(r.info["infotexts"]) == 1  # made: the first batch's estimate
    assert r.info["all_seeds"] == [7, 8, 9] and len(r.info["all_prompts"]) == 3  # asked for: A1111's Processed


def queued_jobs(server) -> int:
    """How many jobs wait behind the running one on the server's single worker."""
    return server.server.config.app.state.engine._worker._work_queue.qsize()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_request_queued_after_a_model_switch_runs_on_the_new_model_and_one_queued_before_on_the_old(
        api, server, monkeypatch):
    gate = StepGate(monkeypatch, at=1)
    results: dict = {}
    url = api.baseurl

    def post(key, route, body):
        results[key] = requests.post(f"{url}/{route}", json=body)

    body = {"prompt": "x", "steps": 2, "seed": 5, **SIZE}
    before = threading.Thread(target=post, args=("before", "txt2img", body))
    switch = threading.Thread(target=post, args=("switch", "options", {"sd_model_checkpoint": "tiny-b"}))
    after = threading.Thread(target=post, args=("after", "txt2img", body))
    try:
        before.start()
        assert gate.reached.wait(HANG), "the first generation never started"
        switch.start()
        wait_until(lambda: queued_jobs(server) == 1, "the model switch to queue")
        after.start()
        wait_until(lambda: queued_jobs(server) == 2, "the second generation to queue")
    finally:
        gate.release.set()
        for t in (before, switch, after):
            t.join(HANG)
    try:
        assert [results[k].status_code for k in ("before", "switch", "after")] == [200, 200, 200]
        assert json.loads(results["before"].json()["info"])["sd_model_name"] == "tiny-a"
        assert json.loads(results["after"].json()["info"])["sd_model_name"] == "tiny-b"
    finally:
        api.util_set_model(title_of(api, "tiny-a"), find_closest=False)


# -- robustness ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("tiling", True), ("restore_faces", True)])
def test_a1111_features_sdlite_lacks_are_refused_not_ignored(api, field, value):
    r = requests.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 1, **SIZE, field: value})
    assert r.status_code == 400 and field in r.json()["detail"] and "not supported" in r.json()["detail"]
    assert api.get_progress()["state"]["job_count"] == 0


def test_subseeds_are_fixed_and_counted_per_image_as_a1111_reports_them(api):
    """(With subseed_strength 0 they shape nothing; A1111 still fixes -1 and counts them.)"""
    r = api.txt2img(prompt="x", seed=10, subseed=99, steps=1, batch_size=2, **SIZE)
    assert r.info["subseed"] == 99 and r.info["all_subseeds"] == [99, 100] and r.info["all_seeds"] == [10, 11]
    r = api.txt2img(prompt="x", seed=10, subseed=-1, steps=1, batch_size=2, **SIZE)
    s = r.info["subseed"]
    assert s >= 0 and r.info["all_subseeds"] == [s, s + 1]


def test_variation_seeds_keep_the_seed_and_count_the_subseed_across_batches_as_a1111(api, ckpt_dir):
    r = api.txt2img(prompt="x", seed=10, subseed=99, subseed_strength=0.3, steps=1, batch_size=2, n_iter=2,
                    seed_resize_from_w=48, seed_resize_from_h=40, **SIZE)
    info = r.info
    assert info["all_seeds"] == [10] * 4 and info["all_subseeds"] == [99, 100, 101, 102]
    assert (info["subseed_strength"], info["seed_resize_from_w"], info["seed_resize_from_h"]) == (0.3, 48, 40)
    p = parse_infotext(info["infotexts"][3])
    assert (p["Seed"], p["Variation seed"], p["Variation seed strength"]) == ("10", "102", "0.3")
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == ("48", "40")
    # The fourth image is the pipeline's own: the second batch's (variation seeds 101, 102) second image.
    pipe = sdlite.load(ckpt_dir / "tiny-a.safetensors")
    own = pipe.txt2img("x", seed=10, variation_seed=101, variation_strength=0.3, seed_resize_from=(48, 40),
                       steps=1, sampler="euler_a", guidance_scale=info["cfg_scale"], batch_size=2, **SIZE)
    assert pixels(r.images[3]) == pixels(own[1])


def test_the_eta_noise_seed_delta_option_reseeds_the_ancestral_samplers_noise_as_a1111(api):
    body = dict(prompt="x", seed=3, steps=2, sampler_name="Euler a", **SIZE)
    r = api.txt2img(**body, override_settings={"eta_noise_seed_delta": 31337})
    assert "ENSD: 31337" in r.info["infotexts"][0]
    assert api.get_options()["eta_noise_seed_delta"] == 0  # an override, not kept
    plain = api.txt2img(**body)
    assert "ENSD" not in plain.info["infotexts"][0] and pixels(plain.image) != pixels(r.image)
    r = requests.post(f"{api.baseurl}/options", json={"eta_noise_seed_delta": "lots"})
    assert r.status_code == 400 and "eta_noise_seed_delta" in r.json()["detail"]


def test_seed_resize_needs_both_sides_and_a_variation_subseed_must_fit(api):
    r = api.txt2img(prompt="x", seed=10, steps=1, seed_resize_from_w=48, seed_resize_from_h=-1, **SIZE)
    assert "Seed resize from" not in r.info["infotexts"][0]  # one side unset: off, as in A1111
    body = {"prompt": "x", "steps": 1, **SIZE}
    r = requests.post(f"{api.baseurl}/txt2img", json={**body, "seed_resize_from_w": 4, "seed_resize_from_h": 4})
    assert r.status_code == 400 and "at least 8" in r.json()["detail"]
    r = requests.post(f"{api.baseurl}/txt2img", json={**body, "subseed": 2**64 - 1, "subseed_strength": 0.5,
                                                        "batch_size": 2})
    assert r.status_code == 400 and "subseed" in r.json()["detail"]


def test_bad_json_wrong_types_and_bad_values_give_4xx_and_the_server_keeps_serving(api):
    url = api.baseurl
    r = requests.post(f"{url}/txt2img", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = requests.post(f"{url}/txt2img", json={"prompt": ["not", "a", "string"], "steps": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 2, "width": 36, "height": 32})
    assert r.status_code == 400 and "multiple of 8" in r.json()["detail"]
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 2, "sampler_name": "Nope"})
    assert r.status_code == 400 and "unknown sampler" in r.json()["detail"] and "Euler a" in r.json()["detail"]
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 2, "scheduler": "wobbly"})
    assert r.status_code == 400 and "unknown schedule" in r.json()["detail"]
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "steps": 2})
    assert r.status_code == 400 and "init_images" in r.json()["detail"]
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "steps": 2, "init_images": ["%%%"]})
    assert r.status_code == 400
    r = requests.post(f"{url}/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert r.status_code == 400
    # unknown fields are ignored
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1, "no_such_field": [1, 2], **SIZE})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert api.get_progress()["state"]["job_count"] == 0


def test_a_broken_checkpoint_fails_its_request_with_500_and_the_server_keeps_serving(api, ckpt_dir):
    (ckpt_dir / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    try:
        r = requests.post(f"{api.baseurl}/txt2img", json={
            "prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": "broken"}, **SIZE})
        assert r.status_code == 500
        assert r.json()["error"] == "CheckpointError" and "broken.safetensors" in r.json()["detail"]
    finally:
        (ckpt_dir / "broken.safetensors").unlink()
    assert api.get_progress()["state"]["job_count"] == 0
    r = api.txt2img(prompt="still here", seed=2, steps=1, **SIZE)
    assert r.info["sd_model_name"] == "tiny-a" and len(r.images) == 1


def test_twenty_concurrent_requests_all_complete_with_distinct_seeds_and_images(server):
    def one(i: int):
        client = webuiapi.WebUIApi(host=server.host, port=server.port)
        return client.txt2img(prompt=f"request {i}", seed=-1, steps=1, **SIZE)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert all(len(r.images) == 1 for r in results)
    assert [r.info["prompt"] for r in results] == [f"request {i}" for i in range(20)]  # nothing lost or swapped
    seeds = [r.info["seed"] for r in results]
    assert len(set(seeds)) == 20 and all(0 <= s < 2**32 for s in seeds)
    assert all(f"Seed: {r.info['seed']}," in r.images[0].info["parameters"] for r in results)
    assert len({pixels(r.images[0]) for r in results}) == 20


def test_basic_auth_rejects_requests_without_the_credentials(ckpt_dir):
    app = create_app(ckpt_dir, ckpt=ckpt_dir / "tiny-a.safetensors", api_auth="alice:s3cret,bob:pw")
    with ServerThread(app, port=free_port()) as s:
        url = f"{s.url}/sdapi/v1"
        r = requests.get(f"{url}/sd-models")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
        assert requests.get(f"{url}/sd-models", auth=("alice", "wrong")).status_code == 401
        assert requests.get(f"{s.url}/", auth=("mallory", "s3cret")).status_code == 401
        assert requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1}).status_code == 401
        client = webuiapi.WebUIApi(host=s.host, port=s.port, username="bob", password="pw")
        assert {"tiny-a", "tiny-b"} <= {m["model_name"] for m in client.get_sd_models()}
        assert requests.get(f"{s.url}/", auth=("alice", "s3cret")).status_code == 200


# -- pieces --------------------------------------------------------------------------------------

def test_latent_preview_is_the_fixed_linear_map_of_the_four_channels_upscaled():
    latent = torch.zeros(4, 2, 3)
    latent[0, 1, 2] = 1.0
    image = latent_preview(latent, scale=4)
    assert image.size == (12, 8)
    arr = np.asarray(image)
    assert tuple(arr[0, 0]) == (128, 128, 128)  # a zero latent is mid grey
    expected = np.round((LATENT_RGB[0].numpy() + 1) * 127.5).astype(np.uint8)
    assert tuple(arr[4, 8]) == tuple(expected)  # channel 0 alone gives the first row of the map


def test_main_refuses_a_malformed_api_auth(tmp_path, capsys):
    assert main(["--ckpt-dir", str(tmp_path), "--api-auth", "no-colon"]) == 2
    assert "user:password" in capsys.readouterr().err


def test_symlinked_checkpoints_and_folders_are_listed_by_their_link_names_and_usable(ckpt_dir, tmp_path):
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    (outside / "more" / "deep.safetensors").symlink_to(ckpt_dir / "tiny-b.safetensors")
    folder = tmp_path / "Stable-diffusion"
    (folder / "real").mkdir(parents=True)
    (folder / "link.safetensors").symlink_to(ckpt_dir / "tiny-b.safetensors")  # a linked file
    (folder / "linked-dir").symlink_to(outside / "more")  # a linked folder
    (folder / "real" / "loop").symlink_to(folder)  # a loop back to the top: walked once, not forever
    with ServerThread(create_app(folder, ckpt=ckpt_dir / "tiny-a.safetensors"), port=free_port()) as s:
        url = f"{s.url}/sdapi/v1"
        r = requests.get(f"{url}/sd-models")
        assert r.status_code == 200
        names = {m["title"] for m in r.json()}
        assert {"link.safetensors", "linked-dir/deep.safetensors"} <= names
        assert not any("loop" in n for n in names)
        assert str(folder / "link.safetensors") in {m["filename"] for m in r.json()}  # the link, not its target
        assert requests.get(f"{url}/options").status_code == 200
        r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1, "seed": 5, **SIZE,
                                                  "override_settings": {"sd_model_checkpoint": "linked-dir/deep.safetensors"}})
        assert r.status_code == 200 and "Model: deep" in json.loads(r.json()["info"])["infotexts"][0]
        # a lookup takes only a listed name: a path reaching outside the folder is not a model
        r = requests.post(f"{url}/options", json={"sd_model_checkpoint": "real/loop/../../outside/more/deep.safetensors"})
        assert r.status_code == 400 and "not found" in r.json()["detail"]


@pytest.mark.parametrize("field, value", [
    ("width", 2056), ("height", 65536), ("steps", 151), ("steps", 10**9), ("batch_size", 65), ("batch_size", 100000),
    ("n_iter", 101), ("cfg_scale", "nan"), ("cfg_scale", "inf"), ("cfg_scale", "-inf"),
])
def test_out_of_range_sizes_steps_and_counts_and_a_non_finite_cfg_scale_give_422_naming_the_field(api, field, value):
    r = requests.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 1, **SIZE, field: value})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]
    assert api.get_progress()["state"]["job_count"] == 0  # refused before anything ran


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_raw_json_non_finite_cfg_scale_gives_422_naming_the_field_not_500(api, value):
    """Python's JSON parser reads these (a client that writes them, such as JavaScript's for 1e999, sends them);
    the 422 echoes the input as a string, where FastAPI's own handler could not write it."""
    body = '{"prompt": "x", "steps": 1, "width": 64, "height": 64, "cfg_scale": %s}' % value
    r = requests.post(f"{api.baseurl}/txt2img", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "cfg_scale"]
    assert api.get_progress()["state"]["job_count"] == 0


def test_the_largest_accepted_values_are_a1111s_ui_maxima_and_the_stated_batch_limits():
    from sdlite.webui.server import Img2ImgRequest, Txt2ImgRequest

    req = Txt2ImgRequest(width=2048, height=2048, steps=150, batch_size=64, n_iter=100, cfg_scale=30)
    assert (req.width, req.height, req.steps, req.batch_size, req.n_iter) == (2048, 2048, 150, 64, 100)
    with pytest.raises(ValueError, match="finite"):
        Img2ImgRequest(denoising_strength=float("nan"))


def test_a_seed_range_that_overflows_on_a_later_batch_is_refused_before_any_batch_runs(api, monkeypatch):
    steps = []
    original = State.step
    monkeypatch.setattr(State, "step", lambda state, n, latent: (steps.append(n), original(state, n, latent)))
    top = sdlite.seeds.SEED_MAX
    body = {"prompt": "x", "steps": 1, "n_iter": 3, **SIZE}
    r = requests.post(f"{api.baseurl}/txt2img", json={**body, "seed": top - 1})  # the 3rd image would need 2**64
    assert r.status_code == 400 and str(top - 2) in r.json()["detail"]  # the message names the largest valid seed
    r = requests.post(f"{api.baseurl}/txt2img", json={**body, "seed": -2**63 - 1})
    assert r.status_code == 400 and "seed must be -1 (random)" in r.json()["detail"]
    assert steps == []  # nothing was sampled
    r = requests.post(f"{api.baseurl}/txt2img", json={**body, "seed": top - 2})
    assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [top - 2, top - 1, top]
    assert steps == [1, 1, 1]


def test_options_refuse_a_clip_skip_the_model_lacks_and_a_format_other_than_png_and_keep_the_old_values(api):
    url = api.baseurl
    r = requests.post(f"{url}/options", json={"CLIP_stop_at_last_layers": 50})
    assert r.status_code == 400 and "CLIP_stop_at_last_layers must be in [1, " in r.json()["detail"]
    r = requests.post(f"{url}/options", json={"samples_format": "jpg"})
    assert r.status_code == 400 and "only png" in r.json()["detail"]
    r = requests.post(f"{url}/options", json={"enable_pnginfo": "no"})
    assert r.status_code == 400 and "true or false" in r.json()["detail"]
    options = api.get_options()
    assert (options["CLIP_stop_at_last_layers"], options["samples_format"], options["enable_pnginfo"]) == (1, "png", True)
    try:
        assert requests.post(f"{url}/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        r = api.txt2img(prompt="x", seed=1, steps=1, **SIZE)  # the accepted value works for generation
        assert r.info["clip_skip"] == 2 and "Clip skip: 2" in r.images[0].info["parameters"]
    finally:
        requests.post(f"{url}/options", json={"CLIP_stop_at_last_layers": 1})


def sampling_argument(monkeypatch, name: str) -> list:
    """The values of ``Pipeline.sample``'s keyword ``name``, one per call from here on (the call still runs)."""
    seen = []
    sample = Pipeline.sample
    monkeypatch.setattr(Pipeline, "sample", lambda self, *a, **kw: seen.append(kw[name]) or sample(self, *a, **kw))
    return seen


def test_sampler_settings_as_options_and_override_settings_reach_the_sampler_and_the_infotext(api, monkeypatch):
    # A1111's Settings → Sampler parameters: UniPC's options and the Beta schedule's alpha and beta.
    # (tests/test_pipeline.py proves that the settings the pipeline gets change the sampling.)
    seen = sampling_argument(monkeypatch, "sampler_settings")
    url = api.baseurl
    assert api.get_options()["uni_pc_order"] == 3 and api.get_options()["beta_dist_alpha"] == 0.6
    r = requests.post(f"{url}/options", json={"uni_pc_variant": "bh3"})
    assert r.status_code == 400 and "bh1, bh2, vary_coeff" in r.json()["detail"]
    body = dict(prompt="x", seed=1, steps=2, **SIZE)
    api.txt2img(sampler_name="UniPC", override_settings={"uni_pc_order": 2}, **body)
    assert seen[-1]["uni_pc_order"] == 2 and seen[-1]["uni_pc_variant"] == "bh1"
    assert api.get_options()["uni_pc_order"] == 3  # the override is restored afterwards
    try:
        assert requests.post(f"{url}/options", json={"uni_pc_lower_order_final": False}).status_code == 200
        api.txt2img(sampler_name="UniPC", **body)
        assert seen[-1]["uni_pc_lower_order_final"] is False
    finally:
        requests.post(f"{url}/options", json={"uni_pc_lower_order_final": True})
    beta = api.txt2img(sampler_name="Euler", scheduler="Beta", override_settings={"beta_dist_alpha": 0.5}, **body)
    assert "Beta schedule alpha: 0.5, Beta schedule beta: 0.6" in beta.images[0].info["parameters"]


def test_token_merging_options_follow_a1111s_txt2img_and_img2img_rule(api, monkeypatch):
    # A1111's Settings → Optimizations: token_merging_ratio for txt2img; img2img takes
    # token_merging_ratio_img2img unless it is 0 or the request overrides token_merging_ratio.
    seen = sampling_argument(monkeypatch, "token_merging_ratio")
    url = api.baseurl
    options = api.get_options()
    assert [options[k] for k in ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")] == [0, 0, 0]
    r = requests.post(f"{url}/options", json={"token_merging_ratio_img2img": 0.9})
    assert r.status_code == 400 and "token_merging_ratio_img2img must be a number in [0, 0.75]" in r.json()["detail"]
    body = dict(prompt="x", seed=1, steps=1, **SIZE)
    init = Image.new("RGB", (SIZE["width"], SIZE["height"]), (200, 30, 30))
    plain = api.txt2img(**body)
    assert seen[-1] == 0.0 and "Token merging" not in plain.images[0].info["parameters"]
    merged = api.txt2img(override_settings={"token_merging_ratio": 0.5}, **body)
    assert seen[-1] == 0.5 and "Token merging ratio: 0.5" in merged.images[0].info["parameters"]
    assert api.get_options()["token_merging_ratio"] == 0  # the override is restored afterwards
    try:
        assert requests.post(f"{url}/options", json={"token_merging_ratio": 0.5}).status_code == 200
        api.img2img(images=[init], **body)
        assert seen[-1] == 0.5  # token_merging_ratio_img2img is 0: txt2img's
        assert requests.post(f"{url}/options", json={"token_merging_ratio_img2img": 0.25}).status_code == 200
        api.img2img(images=[init], **body)
        assert seen[-1] == 0.25
        api.img2img(images=[init], override_settings={"token_merging_ratio": 0.375}, **body)
        assert seen[-1] == 0.375  # overridden in the request: that one
        api.txt2img(**body)
        assert seen[-1] == 0.5
    finally:
        requests.post(f"{url}/options", json={"token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0})


def test_enable_pnginfo_false_leaves_the_infotext_out_of_the_returned_png(api):
    try:
        assert requests.post(f"{api.baseurl}/options", json={"enable_pnginfo": False}).status_code == 200
        r = api.txt2img(prompt="a secret prompt", seed=1, steps=1, **SIZE)
        assert "parameters" not in r.images[0].info
        assert "a secret prompt" not in base64.b64decode(r.json["images"][0]).decode("latin-1")
    finally:
        requests.post(f"{api.baseurl}/options", json={"enable_pnginfo": True})
    r = api.txt2img(prompt="a secret prompt", seed=1, steps=1, **SIZE)
    assert r.images[0].info["parameters"].startswith("a secret prompt\n")


def test_live_previews_enable_false_stops_the_preview_in_progress(api, server, monkeypatch):
    gate = StepGate(monkeypatch, at=1)
    client = webuiapi.WebUIApi(host=server.host, port=server.port)
    worker = threading.Thread(target=lambda: client.txt2img(prompt="x", seed=1, steps=2, **SIZE))
    try:
        assert requests.post(f"{api.baseurl}/options", json={"live_previews_enable": False}).status_code == 200
        worker.start()
        assert gate.reached.wait(HANG), "the generation never reached step 1"
        p = api.get_progress()
        assert p["state"]["sampling_step"] == 1 and p["current_image"] is None
        assert p["progress"] > 0  # the same job reports its progress, only the picture is left out
    finally:
        gate.release.set()
        worker.join(HANG)
        requests.post(f"{api.baseurl}/options", json={"live_previews_enable": True})


def test_save_images_saves_numbered_pngs_under_outputs_without_overwriting(api, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the server runs in this process: outputs/ goes under its working directory
    outdir = tmp_path / "outputs" / "txt2img-images"
    outdir.mkdir(parents=True)
    (outdir / "00000.png").write_bytes(b"someone else's file")
    r = api.txt2img(prompt="kept", seed=9, steps=1, batch_size=2, save_images=True, **SIZE)
    assert (outdir / "00000.png").read_bytes() == b"someone else's file"
    saved = sorted(p.name for p in outdir.iterdir())
    assert saved == ["00000.png", "00001.png", "00002.png"]
    for name, text in zip(saved[1:], r.info["infotexts"]):
        with Image.open(outdir / name) as image:
            assert image.info["parameters"] == text
    api.txt2img(prompt="not kept", seed=9, steps=1, **SIZE)  # save_images defaults to false
    assert len(list(outdir.iterdir())) == 3
    init = Image.new("RGB", (32, 32), (200, 10, 10))
    api.img2img(images=[init], prompt="kept too", seed=1, steps=2, save_images=True, **SIZE)
    assert [p.name for p in (tmp_path / "outputs" / "img2img-images").iterdir()] == ["00000.png"]


def test_img2img_refuses_a_resize_mode_outside_a1111s_four_and_more_than_one_init_image(api):
    init = "data:image/png;base64," + base64.b64encode(
        (lambda b: (Image.new("RGB", (32, 32)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())).decode()
    body = {"prompt": "x", "steps": 1, **SIZE}
    for mode in (4, -1):
        r = requests.post(f"{api.baseurl}/img2img", json={**body, "init_images": [init], "resize_mode": mode})
        assert r.status_code == 400 and r.json()["detail"].startswith("resize_mode must be one of: 0 =")
    r = requests.post(f"{api.baseurl}/img2img", json={**body, "init_images": [init, init], "batch_size": 2})
    assert r.status_code == 400 and "one init image" in r.json()["detail"]
    r = requests.post(f"{api.baseurl}/img2img", json={**body, "init_images": [init], "resize_mode": 0})
    assert r.status_code == 200


def test_img2img_passes_each_of_a1111s_resize_modes_to_the_pipeline(api, monkeypatch):
    seen = []
    img2img = sdlite.Pipeline.img2img

    def recording(self, *args, resize_mode=0, **kwargs):
        seen.append(resize_mode)
        return img2img(self, *args, resize_mode=resize_mode, **kwargs)

    monkeypatch.setattr(sdlite.Pipeline, "img2img", recording)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 41, 3), dtype=np.uint8))
    for mode in (0, 1, 2, 3):
        r = api.img2img(images=[init], prompt="x", steps=1, seed=1, resize_mode=mode, **SIZE)
        assert r.images[0].size == (32, 32) and r.parameters["resize_mode"] == mode
    assert seen == [0, 1, 2, 3]


def test_the_lists_of_features_sdlite_lacks_answer_with_a1111s_empty_shapes_for_webuiapi(api):
    for get in (api.get_sd_vae, api.get_upscalers, api.get_latent_upscale_modes, api.get_prompt_styles,
                api.get_loras, api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models):
        assert get() == [], get.__name__
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_cmd_flags() == {}
    memory = api.get_memory()
    assert set(memory) == {"ram", "cuda"} and memory["ram"]["total"] > 0


def test_a_loaded_model_reports_its_sha256_in_sd_models_and_options(api, ckpt_dir):
    import hashlib

    api.txt2img(prompt="x", seed=1, steps=1, **SIZE)  # tiny-a is loaded, hence hashed
    sha = hashlib.sha256((ckpt_dir / "tiny-a.safetensors").read_bytes()).hexdigest()
    model = next(m for m in api.get_sd_models() if m["model_name"] == "tiny-a")
    assert (model["sha256"], model["hash"], model["title"]) == (sha, sha[:10], f"tiny-a.safetensors [{sha[:10]}]")
    options = api.get_options()
    assert options["sd_checkpoint_hash"] == sha and options["sd_model_checkpoint"] == model["title"]


def test_extra_generation_params_carry_eta_exactly_when_the_infotext_does(api):
    r = api.txt2img(prompt="x", seed=1, steps=1, sampler_name="Euler a", eta=0.5, **SIZE)
    assert "Eta: 0.5" in r.info["infotexts"][0] and r.info["extra_generation_params"]["Eta"] == 0.5
    r = api.txt2img(prompt="x", seed=1, steps=1, sampler_name="Euler a", **SIZE)
    assert "Eta" not in r.info["infotexts"][0] and "Eta" not in r.info["extra_generation_params"]


@pytest.mark.parametrize("sampler, option, key", [("Euler a", "eta_ancestral", "Eta"),
                                                 ("DDIM", "eta_ddim", "Eta DDIM")])
def test_a_request_without_eta_takes_a1111s_eta_option_of_its_sampler_kind(api, sampler, option, key):
    url, body = api.baseurl, {"prompt": "x", "seed": 1, "steps": 2, "sampler_name": sampler, **SIZE}
    explicit = requests.post(f"{url}/txt2img", json={**body, "eta": 0.3}).json()
    try:
        assert requests.post(f"{url}/options", json={option: 0.3}).status_code == 200
        from_option = requests.post(f"{url}/txt2img", json=body).json()
    finally:
        requests.post(f"{url}/options", json=ETA_OPTIONS)
    assert from_option["images"] == explicit["images"]
    assert f"{key}: 0.3" in json.loads(from_option["info"])["infotexts"][0]
    assert requests.post(f"{url}/options", json={option: -1}).status_code == 400
    r = requests.post(f"{url}/txt2img", json={**body, "eta": 1.5})
    assert (r.status_code == 400 and "≤ 1" in r.json()["detail"]) if sampler == "DDIM" else r.status_code == 200


def test_an_undecodable_image_is_named_by_its_field_not_by_a_python_object(api):
    junk = base64.b64encode(b"not an image at all").decode()
    r = requests.post(f"{api.baseurl}/png-info", json={"image": junk})
    assert r.status_code == 400 and r.json()["detail"].startswith("image: not a base64-encoded image")
    r = requests.post(f"{api.baseurl}/img2img", json={"prompt": "x", "steps": 1, "init_images": [junk]})
    assert r.status_code == 400 and r.json()["detail"].startswith("init_images[0]: not a base64-encoded image")
    assert "object at 0x" not in r.json()["detail"]


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_hostile_images_and_numbers_are_400s_or_422s_and_the_server_keeps_serving(api):
    url = api.baseurl
    bomb = _png_b64(Image.new("1", (20000, 20000)))  # 400 M pixels in a few kB
    for path, body in (("png-info", {"image": bomb}), ("img2img", {"prompt": "x", "steps": 1, "init_images": [bomb]})):
        r = requests.post(f"{url}/{path}", json=body)
        assert r.status_code == 400 and "too large to decode" in r.json()["detail"], r.text
    damaged = ("iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAFklEQVR4nGNkYPjPQApgIkn1qIZhowEAMSQBH0s6QvAAAAAA"
               "SUVORK5CYII=")  # a PNG whose data PIL rejects with a SyntaxError
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "steps": 1, "init_images": [damaged]})
    assert r.status_code == 400 and "not a base64-encoded image" in r.json()["detail"], r.text
    wide = _png_b64(Image.new("RGB", (2560, 32)))  # no width/height: the output would be 2560 wide
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "steps": 1, "init_images": [wide]})
    assert r.status_code == 400 and "at most 2048" in r.json()["detail"]
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1, **SIZE, "seed_resize_from_w": 10**9,
                                              "seed_resize_from_h": 10**9})
    assert r.status_code == 422
    for body in ({"eta_ddim": 10**400}, {"beta_dist_alpha": 10**400}, {"eta_noise_seed_delta": 1e300}):
        r = requests.post(f"{url}/options", json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
    r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1, **SIZE,
                                              "override_settings": {"token_merging_ratio": 10**400}})
    assert r.status_code == 400
    for field, value in (("script_name", "x/y/z plot"), ("alwayson_scripts", {"controlnet": {"args": []}}),
                         ("refiner_checkpoint", "tiny-b")):
        r = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1, **SIZE, field: value})
        assert r.status_code == 400 and field in r.json()["detail"]
    assert api.txt2img(prompt="x", steps=1, **SIZE).image.size == (32, 32)  # still serving


def test_ctrl_c_interrupts_the_running_generation_and_drops_the_queued_ones(ckpt_dir, monkeypatch):
    import signal

    gate = StepGate(monkeypatch, at=1)
    results: dict = {}
    with ServerThread(create_app(ckpt_dir, ckpt=ckpt_dir / "tiny-a.safetensors"), port=free_port()) as s:
        def post(key):
            results[key] = requests.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": key, "steps": 20, **SIZE})

        running, queued = threading.Thread(target=post, args=("running",)), threading.Thread(target=post, args=("queued",))
        try:
            running.start()
            assert gate.reached.wait(HANG), "the generation never started"
            queued.start()
            wait_until(lambda: queued_jobs(s) == 1, "the second request to queue")
            s.server.handle_exit(signal.SIGINT, None)  # what uvicorn's signal handler calls on Ctrl-C
        finally:
            gate.release.set()
            running.join(HANG)
            queued.join(HANG)
    assert gate.steps == [1]  # stopped at the step where it was held, not run to step 20
    assert results["running"].status_code == 200 and len(results["running"].json()["images"]) == 1
    assert results["queued"].status_code == 503 and "shutting down" in results["queued"].json()["detail"]


def test_main_refuses_threads_below_one_before_starting(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["--ckpt-dir", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be ≥ 1" in capsys.readouterr().err
    assert torch.get_num_threads() == threads


def test_main_refuses_an_unknown_precision_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdlite.webui.server._server", lambda *a, **k: pytest.fail("the server started"))
    assert main(["--ckpt-dir", str(tmp_path), "--precision", "fp8"]) == 2
    assert "unknown precision 'fp8'" in capsys.readouterr().err
