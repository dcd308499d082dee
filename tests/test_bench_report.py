"""The benchmark's report arithmetic: what benchmarks/RESULTS.md says is computed from the timings.

The benchmark itself is not a test (it takes ~55 minutes at SD1.5 size); these check the pure
helpers that turn its timings into the report's notes, and (on tiny networks) that the attention
kernel's lever switches what it says it switches and that first_step.py still replays the conv
packing it compares against."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench  # noqa: E402


def _row(s: list[float], d: list[float], unit: str = "s", flops: float = 0.0, peak_dtype: str = "") -> "bench.Row":
    return bench.Row("r", unit, values={"sdlite": s, "diffusers": d}, flops=flops, peak_dtype=peak_dtype)


def test_paired_note_is_the_range_and_median_of_per_round_ratios():
    # Rounds: 1/2, 3/3, 4/2 -> ratios 0.5, 1.0, 2.0
    assert bench.paired_note(_row([1.0, 3.0, 4.0], [2.0, 3.0, 2.0])) == [
        "per-round ratios 0.50–2.00 (median 1.00)"]


@pytest.mark.parametrize("s, d, unit", [([1.0, 2.0], [1.0, 2.0], "s"),  # fewer than 3 rounds
                                        ([1.0, 2.0, 3.0], [1.0, 2.0], "s"),  # unpaired
                                        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "MiB")])  # not a time
def test_paired_note_only_for_three_or_more_paired_timings(s, d, unit):
    assert bench.paired_note(_row(s, d, unit)) == []


def test_flops_note_divides_median_speed_by_the_peak_of_the_rows_dtype():
    # 100 GFLOP in a median of 1 s (sdlite) and 2 s (diffusers), fp32 peak 200 GFLOP/s.
    row = _row([0.5, 1.0, 3.0], [2.0, 2.0, 2.0], flops=100e9, peak_dtype="fp32")
    peaks = {"fp32": (200.0, 2048), "bf16": (1.0, 512)}
    assert bench.flops_note(row, peaks) == ["100 GFLOP; 100.0 / 50.0 GFLOP/s = 50% / 25% of peak"]


def test_flops_note_without_a_peak_gives_speed_only():
    # Where bf16 is emulated the bf16 rows get no "% of peak" (peak_dtype cleared).
    row = _row([1.0], [2.0], flops=100e9, peak_dtype="")
    assert bench.flops_note(row, {"fp32": (200.0, 2048)}) == ["100 GFLOP; 100.0 / 50.0 GFLOP/s"]


def test_matmul_peak_measures_each_backend_and_skips_one_this_build_lacks(monkeypatch):
    # The run's peak is the larger of torch.mm (MKL on x86) and oneDNN's GEMM, which sdlite uses.
    gflops, n = bench.matmul_peak(torch.float32, 512, repeats=1, backend="torch.mm")
    assert gflops > 0 and n == 512
    monkeypatch.setattr(bench.ops, "ONEDNN_GEMM", frozenset())
    assert bench.matmul_peak(torch.float32, 512, repeats=1, backend="oneDNN") == (0.0, 0)
    monkeypatch.undo()
    if torch.float32 in bench.ops.ONEDNN_GEMM:
        gflops, n = bench.matmul_peak(torch.float32, 512, repeats=1, backend="oneDNN")
        assert gflops > 0 and n == 512


@pytest.mark.skipif(not __import__("sdlite.cpu_kernels").cpu_kernels.cpu_supported(torch.float32),
                    reason="the CPU attention kernel needs AVX-512")
def test_attention_kernel_levers_switch_the_kernel_and_report_three_rows(monkeypatch):
    # The lever rows time each call with sdlite.ops.FUSED_ATTENTION off, then on (tiny networks, one
    # round): the kernel must really run in the second and not in the first.
    from sdlite import cpu_kernels, ops

    seen = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: seen.append(ops.FUSED_ATTENTION) or real(*a))
    cfg = bench.SIZES["tiny"]
    nets = bench.sdlite_networks(cfg, bench.random_original_weights(cfg), torch.float32)
    lines = bench.attention_kernel_levers(cfg, nets, "fp32", repeats=1).splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "| UNet 64x64, batch 2, fp32", "| UNet 32x32, batch 2, fp32", "| VAE decode 64x64 -> 512x512, fp32"]
    assert all(float(line.rstrip(" |").rsplit("| ", 1)[1]) > 0 for line in lines)
    assert seen and set(seen) == {("cpu",)}


def test_a_childs_report_is_found_among_its_other_output_and_round_trips(capsys):
    # Fresh-process rows and scripts hand their result back as one marked JSON line on stdout,
    # among whatever else the child printed (warnings, progress).
    bench.report_to_parent({"load_s": 1.5, "how": "sdlite.load", "peak": [1, 2]})
    out = "a warning\n" + capsys.readouterr().out + "progress 3/3\n"
    assert bench.reported(out) == {"load_s": 1.5, "how": "sdlite.load", "peak": [1, 2]}
    assert bench.reported("Traceback (most recent call last):\n  ...\nMemoryError\n") is None


def test_a_fresh_process_row_that_fails_gives_its_last_lines_not_an_exception(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nprint('loading', flush=True)\nsys.exit('out of memory at step 2')\n")
    assert bench.run_spec(str(script), {"side": "sdlite"}, env={}, timeout=60) == {"error": "out of memory at step 2"}


def test_first_step_script_replays_the_layout_at_load_and_reports_both_ways(tmp_path):
    # benchmarks/first_step.py patches sdlite's conv packing to replay the way before session 28;
    # a run on a tiny checkpoint (numbers meaningless) keeps that patch in step with sdlite.
    import subprocess

    import sdlite
    from test_pipeline import make_pipe

    if torch.float32 not in sdlite.ops.ONEDNN_GEMM:
        pytest.skip("no oneDNN GEMM here: nothing is packed")
    pipe = make_pipe()
    convs = sum(isinstance(m, sdlite.ops.Conv2d) and m.kernel_size != (1, 1)
                for net in (pipe.unet, pipe.vae) for m in net.modules())
    ckpt = sdlite.save(pipe, tmp_path / "tiny.safetensors")
    out = tmp_path / "first-step.md"
    subprocess.run([sys.executable, str(Path(bench.__file__).with_name("first_step.py")), "--ckpt", str(ckpt),
                    "--runs", "1", "--steps", "2", "--hw", "8", "--out", str(out)], check=True, capture_output=True)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")]
    laid_out_at_load = {cells[0].removeprefix("| "): cells[1] for cells in rows if " of " in cells[1]}
    assert laid_out_at_load == {"every conv packed at load for (1, 8, 8) (before session 28)": f"{convs} of {convs}",
                                "each conv laid out at its first call (sdlite now)": f"0 of {convs}"}
