"""The web UI page in a real headless Chromium (Playwright driving Debian's ``/usr/bin/chromium``).

A missing Chromium or Playwright FAILS this test (CI installs both); it never skips.

``SDLITE_UPDATE_SCREENSHOT=1`` also writes ``docs/webui.png`` (so ordinary test runs leave the repository
clean), drawn with ``SDLITE_SCREENSHOT_CKPT`` if set, else the bundled model when it is installed, else the
tiny random checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import threading
from pathlib import Path

import pytest
import requests

import sdlite
from sdlite.pipeline import BUNDLED_MODEL
from sdlite.webui.server import ServerThread, State, create_app

from test_pipeline import make_pipe

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = os.environ.get("SDLITE_UPDATE_SCREENSHOT") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Stable-diffusion")
    tiny = sdlite.save(make_pipe(), folder / "tiny.safetensors")
    start = tiny
    if SCREENSHOT:
        start = Path(os.environ.get("SDLITE_SCREENSHOT_CKPT") or (BUNDLED_MODEL if BUNDLED_MODEL.is_file() else tiny))
    with ServerThread(create_app(folder, ckpt=start), port=free_port()) as s:
        s.start_model = start
        yield s


class StepGate:
    """Holds the worker thread inside ``State.step`` at sampling step ``at`` (after that step's counter and
    latent are recorded) until ``release`` is set, so the page's progress polls see a known step however fast
    or slow the machine is. ``steps`` lists every step number the sampler reported."""

    def __init__(self, monkeypatch, at: int):
        self.at, self.steps = at, []
        self.reached, self.release = threading.Event(), threading.Event()
        original = State.step

        def step(state: State, n: int, latent) -> None:
            original(state, n, latent)
            self.steps.append(n)
            if n == self.at and not self.release.is_set():
                self.reached.set()
                self.release.wait()

        monkeypatch.setattr(State, "step", step)


HANG = 120  # seconds; only turns a hang into a failure, no assertion depends on how fast a step is


@contextlib.contextmanager
def ready_page(server):
    """The page in headless Chromium, loaded and ready; yields (page, the JavaScript errors it raised)."""
    assert CHROMIUM.is_file(), "Chromium is missing: apt-get install -y chromium (the browser test needs it)"
    from playwright.sync_api import sync_playwright  # test-only dependency: missing must fail

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            yield page, errors
        finally:
            browser.close()


def test_page_generates_with_live_progress_and_reads_the_png_info_back(server, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    prompt = "a red circle on the left"
    batch = 4 if SCREENSHOT else 1
    steps = 20
    gate = StepGate(monkeypatch, at=5)  # the run waits at step 5 until the page has shown it
    with ready_page(server) as (page, errors):
        assert "Euler a" in page.locator("#sampler option").all_text_contents()
        assert page.input_value("#model") == server.start_model.name

        # Generate: the progress line counts steps, the viewer shows the latent preview, then the image.
        page.fill("#prompt", prompt)
        page.fill("#negative_prompt", "blurry")
        page.fill("#steps", str(steps))
        page.fill("#seed", "1234")
        page.fill("#batch_size", str(batch))
        page.click("#generate")
        try:
            assert gate.reached.wait(HANG), "the generation never reached step 5"
            # Held at step 5: the page's next poll must show that step and that step's latent preview.
            preview = requests.get(f"{server.url}/sdapi/v1/progress").json()["current_image"]
            assert preview
            page.wait_for_function(
                """([steps, src]) => new RegExp(`^Step 5/${steps}( |$)`).test(document.getElementById('progress-text').textContent)
                && document.querySelector('.viewer.live #viewer')?.src === src""",
                arg=[steps, "data:image/png;base64," + preview], timeout=HANG * 1000)
            expect(page.locator("#gallery img")).to_have_count(0)  # still running: no result yet
        finally:
            gate.release.set()
        expect(page.locator("#gallery img")).to_have_count(batch, timeout=HANG * 1000)
        assert gate.steps == list(range(1, steps + 1))  # the held run went on to the end
        expect(page.locator("#progress-text")).to_have_text(re.compile(f"^Done: {batch} image"))
        infotext = page.text_content("#infotext")
        assert infotext.startswith(f"{prompt}\nNegative prompt: blurry\nSteps: {steps}, Sampler: Euler a")
        assert "Seed: 1234," in infotext

        # Reuse the seed of the shown image.
        page.click("#seed-random")
        assert page.input_value("#seed") == "-1"
        page.click("#seed-reuse")
        assert page.input_value("#seed") == "1234"
        page.click("#variation summary")
        page.click("#subseed-reuse")  # no variation strength: A1111's button gives the image's seed
        assert page.input_value("#subseed") == "1234"
        page.click("#subseed-random")
        page.click("#variation summary")
        if SCREENSHOT:
            page.screenshot(path=str(ROOT / "docs" / "webui.png"))

        # PNG Info of the generated image, through the API's png-info, then back into the form.
        page.click("#send-pnginfo")
        expect(page.locator("#png-text")).to_have_text(infotext)
        expect(page.locator("#png-params")).to_contain_text("Seed1234")
        page.click("[data-tab=txt2img]")
        page.fill("#prompt", "")
        page.fill("#steps", "3")
        page.click("[data-tab=pnginfo]")
        page.click("#png-send-txt2img")
        assert page.input_value("#prompt") == prompt and page.input_value("#steps") == str(steps)
        width, height = re.search(r"Size: (\d+)x(\d+)", infotext).groups()
        assert (page.input_value("#width"), page.input_value("#height")) == (width, height)
        assert page.input_value("#sampler") == "Euler a"

        # The drop area's file input reads a PNG from disk the same way.
        png = tmp_path / "generated.png"
        png.write_bytes(base64.b64decode(page.get_attribute("#gallery img", "src").split(",", 1)[1]))
        page.click("[data-tab=pnginfo]")
        page.set_input_files("#png-file", str(png))
        expect(page.locator("#png-text")).to_have_text(infotext)

        # img2img: the shown image becomes the init image; the result records the denoising strength;
        # the chosen resize mode goes into the request as A1111's number.
        page.click("[data-tab=txt2img]")
        page.click("#send-img2img")
        expect(page.locator("#init-preview")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
        page.fill("#steps", "4")
        page.select_option("#resize_mode", label="Resize and fill")
        with page.expect_request("**/sdapi/v1/img2img") as request:
            page.click("#generate")
        assert request.value.post_data_json["resize_mode"] == 2
        expect(page.locator("#infotext")).to_contain_text("Denoising strength: 0.75", timeout=60_000)
        assert errors == []


def test_sampler_parameters_go_with_the_request_and_come_back_from_the_png_info(server):
    # A1111's Settings → Sampler parameters, as a panel of the page: its values travel as the request's
    # override_settings (the server's own options stay as they are) and PNG Info fills them back in.
    from playwright.sync_api import expect

    with ready_page(server) as (page, errors):
        assert page.input_value("#uni_pc_order") == "3" and page.input_value("#beta_dist_alpha") == "0.6"
        page.click("#sampler-parameters summary")
        page.fill("#CLIP_stop_at_last_layers", "2")
        page.fill("#beta_dist_alpha", "0.5")
        page.fill("#token_merging_ratio", "0.5")
        page.select_option("#uni_pc_skip_type", "logSNR")
        page.uncheck("#uni_pc_lower_order_final")
        page.select_option("#sampler", "Euler")
        page.select_option("#scheduler", "beta")
        page.fill("#steps", "2")
        with page.expect_request("**/sdapi/v1/txt2img") as request:
            page.click("#generate")
        sent = request.value.post_data_json["override_settings"]
        assert sent == {"CLIP_stop_at_last_layers": 2, "uni_pc_order": 3, "uni_pc_variant": "bh1",
                        "uni_pc_skip_type": "logSNR", "uni_pc_lower_order_final": False,
                        "beta_dist_alpha": 0.5, "beta_dist_beta": 0.6, "token_merging_ratio": 0.5,
                        "eta_noise_seed_delta": 0}
        expect(page.locator("#infotext")).to_contain_text("Beta schedule alpha: 0.5", timeout=60_000)
        assert "Clip skip: 2" in page.text_content("#infotext")
        assert "Token merging ratio: 0.5" in page.text_content("#infotext")
        assert requests.get(f"{server.url}/sdapi/v1/options").json()["beta_dist_alpha"] == 0.6  # not kept

        page.fill("#CLIP_stop_at_last_layers", "1")
        page.fill("#beta_dist_alpha", "0.6")
        page.fill("#token_merging_ratio", "0")
        page.click("#send-pnginfo")
        page.click("#png-send-txt2img")
        assert page.input_value("#CLIP_stop_at_last_layers") == "2"
        assert page.input_value("#beta_dist_alpha") == "0.5"
        assert page.input_value("#token_merging_ratio") == "0.5"
        assert errors == []


def test_variation_seed_and_ensd_fields_go_with_the_request_and_come_back_from_the_png_info(server):
    from playwright.sync_api import expect

    with ready_page(server) as (page, errors):
        page.click("#variation summary")
        page.fill("#seed", "7")
        page.fill("#subseed", "40")
        page.fill("#subseed_strength", "0.25")
        page.fill("#seed_resize_from_w", "48")
        page.fill("#seed_resize_from_h", "40")
        page.fill("#batch_size", "2")
        page.fill("#steps", "2")
        page.select_option("#sampler", "Euler a")
        page.click("#sampler-parameters summary")
        page.fill("#eta_noise_seed_delta", "31337")
        with page.expect_request("**/sdapi/v1/txt2img") as request:
            page.click("#generate")
        sent = request.value.post_data_json
        assert (sent["subseed"], sent["subseed_strength"], sent["seed_resize_from_w"], sent["seed_resize_from_h"]) \
            == (40, 0.25, 48, 40)
        assert sent["override_settings"]["eta_noise_seed_delta"] == 31337
        expect(page.locator("#gallery img")).to_have_count(2, timeout=HANG * 1000)
        page.locator("#gallery img").nth(1).click()
        expect(page.locator("#infotext")).to_contain_text("Seed: 7, ")
        assert "Variation seed: 41, Variation seed strength: 0.25, Seed resize from: 48x40" \
            in page.text_content("#infotext")
        assert "ENSD: 31337" in page.text_content("#infotext")
        page.click("#subseed-random")
        page.click("#subseed-reuse")
        assert page.input_value("#subseed") == "41"  # the shown image's own

        page.fill("#subseed_strength", "0")
        page.fill("#seed_resize_from_w", "0")
        page.fill("#eta_noise_seed_delta", "0")
        page.click("#send-pnginfo")
        page.click("#png-send-txt2img")
        assert (page.input_value("#subseed"), page.input_value("#subseed_strength")) == ("41", "0.25")
        assert (page.input_value("#seed_resize_from_w"), page.input_value("#seed_resize_from_h")) == ("48", "40")
        assert page.input_value("#eta_noise_seed_delta") == "31337"
        assert errors == []


@pytest.mark.parametrize("written, sampler, schedule", [
    ("Sampler: DPM++ 2M Karras", "DPM++ 2M", "automatic"),  # its own default schedule reads as Automatic
    ("Sampler: Euler a Karras", "Euler a", "karras"),
    ("Sampler: DPM++ 2M SDE Heun Exponential", "DPM++ 2M SDE Heun", "automatic"),
    ("Sampler: k_euler_a", "Euler a", "automatic"),  # an alias
    ("Sampler: Euler, Schedule type: SGM Uniform", "Euler", "sgm_uniform"),
])
def test_png_info_maps_old_sampler_names_onto_sampler_and_schedule_as_a1111s_paste_does(server, tmp_path, written,
                                                                                        sampler, schedule):
    """Infotexts from before A1111's "Schedule type" name the schedule in the sampler; A1111's paste splits it
    off (get_sampler_and_scheduler). The form must come out as A1111's would."""
    from PIL import Image, PngImagePlugin
    from playwright.sync_api import expect

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a cat\nSteps: 7, {written}, CFG scale: 7, Seed: 5, Size: 64x64")
    png = tmp_path / "old.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    with ready_page(server) as (page, errors):
        page.select_option("#scheduler", "exponential")  # something else than what the infotext asks
        page.click("[data-tab=pnginfo]")
        page.set_input_files("#png-file", str(png))
        expect(page.locator("#png-params")).to_contain_text("Seed5")
        page.click("#png-send-txt2img")
        assert (page.input_value("#sampler"), page.input_value("#scheduler")) == (sampler, schedule)
        assert page.input_value("#steps") == "7" and errors == []
