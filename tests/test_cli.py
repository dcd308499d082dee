"""The command line (sdlite.cli, behind scripts/txt2img.py and scripts/img2img.py), run in-process.

Bad input must fail before the model is loaded: those tests replace ``sdlite.load`` with a function
that fails the test. The generation tests use a fake pipeline, so no test here needs a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import sdlite
from sdlite import cli
from sdlite.pipeline import Images


class Loaded(Exception):
    """Raised by the stand-in ``sdlite.load``: validation passed and loading began."""


def _never_load(*args, **kwargs):
    raise AssertionError("loaded the model before rejecting the input")


def _stop_at_load(*args, **kwargs):
    raise Loaded


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _rejected(monkeypatch, capsys, argv, img2img=False) -> str:
    """The ``error: ...`` line for ``argv``, asserting exit code 2, no loading and nothing written."""
    monkeypatch.setattr(sdlite, "load", _never_load)
    assert cli.run(argv, img2img=img2img) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert not Path("outputs").exists()
    return err


def _reaches_load(monkeypatch, argv, img2img=False) -> None:
    monkeypatch.setattr(sdlite, "load", _stop_at_load)
    with pytest.raises(Loaded):
        cli.run(argv, img2img=img2img)


def _png(path, size=(16, 16)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


# -- --prompt / --from-file ----------------------------------------------------------------------

def test_from_file_that_is_not_utf8_is_an_argument_error_not_a_decode_traceback(in_tmp, monkeypatch, capsys):
    (in_tmp / "prompts.txt").write_bytes(b"a caf\xe9 at night\n")  # Latin-1
    err = _rejected(monkeypatch, capsys, ["--from-file", "prompts.txt"])
    assert "--from-file prompts.txt is not UTF-8 text (" in err


def test_from_file_with_a_utf8_bom_gives_prompts_without_the_bom(in_tmp, monkeypatch):
    (in_tmp / "prompts.txt").write_bytes("\ufeffa red circle\na blue square\n".encode("utf-8"))
    seen = []

    class Pipe:
        def txt2img(self, prompt, **kwargs):
            seen.append(prompt)
            return _images(kwargs["batch_size"])

    monkeypatch.setattr(sdlite, "load", lambda *a, **k: Pipe())
    assert cli.run(["--from-file", "prompts.txt", "--quiet"], img2img=False) == 0
    assert seen == ["a red circle", "a blue square"]


def test_prompt_and_from_file_together_are_rejected_instead_of_ignoring_prompt(in_tmp, monkeypatch, capsys):
    (in_tmp / "prompts.txt").write_text("a red circle\n")
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--from-file", "prompts.txt"])
    assert "not both" in err


def test_from_file_that_is_a_directory_says_it_is_not_a_file(in_tmp, monkeypatch, capsys):
    (in_tmp / "prompts").mkdir()
    assert "is not a file" in _rejected(monkeypatch, capsys, ["--from-file", "prompts"])


# -- counts, clip skip, seed ---------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--n_samples", "--n_iter", "--clip-skip", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_rejected_before_loading(in_tmp, monkeypatch, capsys, flag, value):
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", flag, value])
    assert f"{flag} must be ≥ 1, got {value}" in err


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1)])
def test_seed_outside_what_torch_takes_is_rejected(in_tmp, monkeypatch, capsys, seed):
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--seed", seed])
    assert "--seed must be -1 (random) or in [-2**63, 2**64 - 1]" in err


def test_seed_whose_last_image_seed_overflows_is_rejected(in_tmp, monkeypatch, capsys):
    # 2 prompts x 2 iterations x 2 samples = 8 images: seeds 2**64-8 .. 2**64-1 fit, one more does not.
    (in_tmp / "prompts.txt").write_text("a\nb\n")
    argv = ["--from-file", "prompts.txt", "--n_samples", "2", "--n_iter", "2"]
    err = _rejected(monkeypatch, capsys, [*argv, "--seed", str(2**64 - 7)])
    assert f"give --seed ≤ {2**64 - 8}" in err
    _reaches_load(monkeypatch, [*argv, "--seed", str(2**64 - 8)])


@pytest.mark.parametrize("seed", ["-1", "0", str(2**64 - 1)])
def test_seed_at_the_bounds_is_accepted(in_tmp, monkeypatch, seed):
    _reaches_load(monkeypatch, ["--prompt", "a cat", "--seed", seed])


# -- --outdir, --device --------------------------------------------------------------------------

@pytest.mark.parametrize("outdir", ["taken", "taken/sub"])
def test_outdir_blocked_by_a_file_fails_before_loading(in_tmp, monkeypatch, capsys, outdir):
    (in_tmp / "taken").write_text("not a directory")
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--outdir", outdir])
    assert "taken exists and is not a directory" in err


def test_outdir_that_cannot_be_created_fails_before_loading(in_tmp, monkeypatch, capsys):
    """(/proc takes no new folders, even from root; the image would have been lost at the first save.)"""
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--outdir", "/proc/sdlite-outdir"])
    assert "--outdir /proc/sdlite-outdir: cannot write images there" in err


def test_outdir_is_created_before_loading(in_tmp, monkeypatch):
    _reaches_load(monkeypatch, ["--prompt", "a cat", "--outdir", "new/images"])
    assert (in_tmp / "new" / "images").is_dir()


@pytest.mark.parametrize("argv, match", [
    (["--scale", "nan"], "--scale must be a finite number, got nan"),
    (["--scale", "inf"], "--scale must be a finite number, got inf"),
    (["--ddim_eta", "-1"], "eta must be ≥ 0"),
    (["--sampler", "DDIM", "--ddim_eta", "1.5"], "eta must be ≥ 0 and ≤ 1 for DDIM"),
])
def test_guidance_scale_and_eta_without_a_step_are_rejected_before_loading(in_tmp, monkeypatch, capsys, argv,
                                                                           match):
    assert match in _rejected(monkeypatch, capsys, ["--prompt", "a cat", *argv])


def test_device_that_torch_does_not_know_is_an_argument_error_naming_valid_ones(in_tmp, monkeypatch, capsys):
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--device", "foo"])
    assert "unknown device 'foo'" in err and "cpu, cuda, cuda:1, mps" in err


def test_cuda_on_a_machine_without_it_is_rejected_before_loading(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--device", "cuda:1"])
    assert "torch.cuda.is_available() is False" in err


def test_a_known_device_name_reaches_loading(in_tmp, monkeypatch):
    _reaches_load(monkeypatch, ["--prompt", "a cat", "--device", "cpu"])


# -- --init-img ----------------------------------------------------------------------------------

def test_init_img_that_is_a_directory_says_it_is_not_a_file(in_tmp, monkeypatch, capsys):
    (in_tmp / "pics").mkdir()
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--init-img", "pics"], img2img=True)
    assert "init image pics is not a file" in err


def test_init_img_that_pil_cannot_read_is_rejected_before_loading(in_tmp, monkeypatch, capsys):
    (in_tmp / "in.png").write_text("hello")
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--init-img", "in.png"], img2img=True)
    assert "cannot read init image in.png" in err


def test_init_img_smaller_than_8px_is_rejected(in_tmp, monkeypatch, capsys):
    _png(in_tmp / "tiny.png", (16, 4))
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--init-img", "tiny.png", "--H", "8"], img2img=True)
    assert "16x4 px" in err and "at least 8x8" in err


def test_init_img_of_8x8_px_is_accepted(in_tmp, monkeypatch):
    _png(in_tmp / "in.png", (8, 8))
    _reaches_load(monkeypatch, ["--prompt", "a cat", "--init-img", "in.png"], img2img=True)


@pytest.mark.parametrize("value", ["4", "-1", "stretch"])
def test_a_resize_mode_other_than_a1111s_four_is_rejected_before_loading_with_the_valid_values(
        in_tmp, monkeypatch, capsys, value):
    _png(in_tmp / "in.png")
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--init-img", "in.png", "--resize-mode", value],
                    img2img=True)
    assert err.startswith('error: --resize-mode must be one of: 0 = "just_resize" = "Just resize"; 1 = "crop"')
    assert f"got {value!r}" in err


def test_help_texts_of_strength_clip_skip_and_outdir_say_what_the_values_do():
    txt2img, img2img = cli._parser(False).format_help(), cli._parser(True).format_help()
    assert "0 keeps the image, 1 ignores it" not in " ".join(img2img.split())  # 0 is rejected
    assert "near 0 keeps the image, 1 redraws it from noise" in " ".join(img2img.split())
    assert "'Clip skip 2'" in " ".join(txt2img.split())
    assert "never overwritten" in " ".join(txt2img.split())


# -- generation: paths as saved, Ctrl-C ----------------------------------------------------------

def _run_expecting_ctrl_c(argv) -> int:
    try:
        return cli.run(argv, img2img=False)
    except KeyboardInterrupt:  # re-raised, it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped cli.run: the user gets a traceback")


def _images(n):
    out = Images(Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(n))
    out.seeds, out.infotexts = list(range(n)), [f"a cat\nSteps: 1, Seed: {i}" for i in range(n)]
    return out


def test_each_path_is_printed_when_saved_and_ctrl_c_exits_130_listing_what_was_saved(in_tmp, monkeypatch, capsys):
    stdout_at_call = []

    class Pipe:
        def txt2img(self, prompt, **kwargs):
            stdout_at_call.append(capsys.readouterr().out)
            if len(stdout_at_call) == 2:
                raise KeyboardInterrupt
            return _images(kwargs["batch_size"])

    monkeypatch.setattr(sdlite, "load", lambda *a, **k: Pipe())
    assert _run_expecting_ctrl_c(["--prompt", "a cat", "--n_samples", "2", "--n_iter", "3", "--quiet"]) == 130
    out = "outputs/txt2img-samples"
    # The first batch's paths were on stdout before the second batch began.
    assert stdout_at_call == ["", f"{out}/00000.png\n{out}/00001.png\n"]
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted: 2 image(s) saved → {out}"
    assert sorted(p.name for p in (in_tmp / out).iterdir()) == ["00000.png", "00001.png"]


def test_ctrl_c_while_saving_leaves_no_truncated_png(in_tmp, monkeypatch, capsys):
    import sdlite.infotext

    def interrupted_save(image, fp, text):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    class Pipe:
        def txt2img(self, prompt, **kwargs):
            return _images(1)

    monkeypatch.setattr(sdlite, "load", lambda *a, **k: Pipe())
    monkeypatch.setattr(sdlite.infotext, "save_png", interrupted_save)
    assert _run_expecting_ctrl_c(["--prompt", "a cat", "--quiet"]) == 130
    assert list((in_tmp / "outputs/txt2img-samples").iterdir()) == []
    assert capsys.readouterr().out == ""


# -- what the flags become ----------------------------------------------------------------------

class RecordingPipe:
    """Stands in for a loaded pipeline and records each generation call's arguments."""

    def __init__(self):
        self.calls = []

    def txt2img(self, prompt, **kwargs):
        self.calls.append(("txt2img", prompt, kwargs))
        return _images(kwargs["batch_size"])

    def img2img(self, image, prompt, **kwargs):
        self.calls.append(("img2img", prompt, {"image": image, **kwargs}))
        return _images(kwargs["batch_size"])


def _calls(monkeypatch, argv, img2img=False):
    pipe = RecordingPipe()
    monkeypatch.setattr(sdlite, "load", lambda *a, **k: pipe)
    assert cli.run([*argv, "--quiet"], img2img=img2img) == 0
    return pipe.calls


def test_each_batch_continues_the_seeds_of_the_last_one_across_iterations_and_prompts(in_tmp, monkeypatch):
    # As the CompVis scripts and A1111's "Batch count": image i of the whole run uses seed + i.
    (in_tmp / "prompts.txt").write_text("a cat\n\na dog\n")
    calls = _calls(monkeypatch, ["--from-file", "prompts.txt", "--seed", "100", "--n_samples", "2", "--n_iter", "2"])
    assert [(c[1], c[2]["seed"], c[2]["batch_size"]) for c in calls] == [
        ("a cat", 100, 2), ("a cat", 102, 2), ("a dog", 104, 2), ("a dog", 106, 2)]
    assert len(list((in_tmp / "outputs/txt2img-samples").iterdir())) == 8


def test_the_generation_flags_reach_the_pipeline_unchanged(in_tmp, monkeypatch):
    (kind, prompt, kw), = _calls(monkeypatch, [
        "--prompt", "a cat", "--negative-prompt", "blurry", "--plms", "--steps", "7", "--scale", "3.5",
        "--H", "48", "--W", "64", "--clip-skip", "2", "--ddim_eta", "0.0", "--seed", "5",
        "--token-merging-ratio", "0.5"])
    assert (kind, prompt) == ("txt2img", "a cat")
    assert {k: kw[k] for k in ("negative_prompt", "sampler", "steps", "guidance_scale", "height", "width",
                               "clip_skip", "eta", "seed", "batch_size", "token_merging_ratio")} == {
        "negative_prompt": "blurry", "sampler": "plms", "steps": 7, "guidance_scale": 3.5, "height": 48,
        "width": 64, "clip_skip": 2, "eta": 0.0, "seed": 5, "batch_size": 1, "token_merging_ratio": 0.5}


@pytest.mark.parametrize("value", ["-0.1", "0.8", "nan"])
def test_a_token_merging_ratio_outside_0_to_0_75_is_rejected_before_loading(in_tmp, monkeypatch, capsys, value):
    err = _rejected(monkeypatch, capsys, ["--prompt", "a cat", "--token-merging-ratio", value])
    assert "token_merging_ratio must be a number in [0, 0.75] (0: off)" in err


def test_img2img_passes_the_init_image_and_strength(in_tmp, monkeypatch):
    _png(in_tmp / "in.png", (16, 16))
    (kind, prompt, kw), = _calls(monkeypatch, ["--prompt", "a cat", "--init-img", "in.png", "--strength", "0.4"],
                                 img2img=True)
    assert (kind, prompt, kw["image"], kw["strength"]) == ("img2img", "a cat", Path("in.png"), 0.4)


@pytest.mark.parametrize("argv, mode", [
    ([], 0), (["--resize-mode", "1"], 1), (["--resize-mode", "fill"], 2), (["--resize_mode", "Resize and fill"], 2),
    (["--resize-mode", "latent"], 3), (["--resize-mode", "Just resize (latent upscale)"], 3),
])
def test_img2img_passes_the_resize_mode_as_its_a1111_number(in_tmp, monkeypatch, argv, mode):
    _png(in_tmp / "in.png", (16, 16))
    (_, _, kw), = _calls(monkeypatch, ["--prompt", "a cat", "--init-img", "in.png", *argv], img2img=True)
    assert kw["resize_mode"] == mode


def test_system_info_prints_the_machine_and_exits_without_a_prompt_or_a_model(in_tmp, monkeypatch, capsys):
    from sdlite import ops

    monkeypatch.setattr(sdlite, "load", _never_load)
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ops.FUSED_ATTENTION)  # --no-fused-kernels sets it for the process
    monkeypatch.setattr(ops, "FUSED_GROUP_NORM", ops.FUSED_GROUP_NORM)
    monkeypatch.setattr(ops, "FUSED_GELU", ops.FUSED_GELU)
    threads = torch.get_num_threads()
    try:
        assert cli.txt2img_main(["--system-info", "--no-fused-kernels", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"sdlite: {sdlite.__version__}; torch {torch.__version__}")
    assert "device: cpu (the default)" in out
    assert "threads: 1" in [line.split(";")[0] for line in out]  # --threads applies before the report
    assert "attention kernel: off (--no-fused-kernels)" in out
    assert [line for line in out if line.startswith("fastest precision here: ")]
    assert not list(in_tmp.iterdir())  # no outputs folder


def test_system_info_checks_the_device_it_is_given(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.txt2img_main(["--system-info", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
