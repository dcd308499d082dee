"""The one precision policy (sdlite.devices.choose), and the half-precision GroupNorm it relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlite import devices
from sdlite.errors import ArgumentError
from sdlite.unet.model import GroupNorm32


@pytest.fixture
def fake_cuda(monkeypatch):
    """choose() only asks torch.cuda.is_available(); the policy needs no GPU to be checked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("request_, weights, autocast", [
    (None, torch.float16, None),           # half weights run as they are (no autocast), as diffusers
    ("fp16", torch.float16, None),
    ("bf16", torch.bfloat16, None),
    ("fp32", torch.float32, None),
    ("autocast", torch.float32, torch.float16),  # fp32 weights under fp16 autocast
])
def test_the_cuda_policy(fake_cuda, request_, weights, autocast):
    p = devices.choose("cuda", request_)
    assert (p.device.type, p.weight_dtype, p.autocast_dtype) == ("cuda", weights, autocast)


@pytest.mark.parametrize("request_, weights, autocast", [
    (None, torch.float32, None),
    ("bf16", torch.bfloat16, None),        # bf16 weights, not CPU autocast (it re-casts every call)
    ("autocast", torch.float32, torch.bfloat16),
])
def test_the_cpu_policy(monkeypatch, request_, weights, autocast):
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: True)  # the policy, not this CPU's warning
    p = devices.choose("cpu", request_)
    assert (p.weight_dtype, p.autocast_dtype) == (weights, autocast)


def test_autocast_on_a_cpu_without_native_bf16_warns_and_names_the_fix(monkeypatch):
    # Under autocast PyTorch's own kernels cast to bf16, and on such CPUs (this project's AVX2
    # machine) bf16 matmuls and convolutions run 50-100x slower than fp32; sdlite cannot step in.
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: dtype == torch.float32)
    with pytest.warns(RuntimeWarning, match=r"no native bf16 kernels.*Use fp32.*or bf16 weights"):
        p = devices.choose("cpu", "autocast")
    assert p.compute_dtype == torch.bfloat16  # warned, not refused


@pytest.mark.parametrize("request_", [None, "fp32", "bf16", "fp16", "autocast"])
def test_no_warning_for_weights_in_any_precision_or_where_the_cpu_has_the_kernels(monkeypatch, recwarn, request_):
    # Half *weights* do not warn on a CPU without native half kernels: sdlite.ops computes their
    # convolutions and matmuls in fp32 there (tests/test_ops.py).
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: True)
    devices.choose("cpu", request_)
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: dtype == torch.float32)
    if request_ != "autocast":
        devices.choose("cpu", request_)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_the_probe_follows_pytorch_on_x86_and_judges_no_other_cpu(monkeypatch):
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    assert devices.cpu_has_fast(torch.float32)
    assert devices.cpu_has_fast(torch.bfloat16) == (torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                                    and devices.cpu_has_native_bf16())
    monkeypatch.setattr(devices.platform, "machine", lambda: "arm64")
    assert devices.cpu_has_fast(torch.bfloat16) and devices.cpu_has_fast(torch.float16)


def test_to_device_on_the_cpu_is_a_plain_cast():
    # On CUDA it stages in pinned memory and copies without blocking (tests/test_cuda.py).
    t = torch.tensor([0.1, 2.5], dtype=torch.float64)
    out = devices.to_device(t, torch.device("cpu"), torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, t.float())
    assert devices.to_device(out, torch.device("cpu")) is out  # nothing to move, nothing copied


def test_the_unet_is_channels_last_on_cuda_only():
    assert devices.unet_memory_format(torch.device("cuda")) == torch.channels_last
    assert devices.unet_memory_format(torch.device("cpu")) == torch.contiguous_format


def test_load_puts_the_unet_in_the_policy_s_memory_format(monkeypatch):
    # Checked on the CPU by pretending the policy says channels-last there.
    import sdlite

    monkeypatch.setattr(devices, "unet_memory_format", lambda device: torch.channels_last)
    monkeypatch.setattr(sdlite.ops, "pack", lambda module: module)  # on the CPU packing replaces the layout
    pipe = sdlite.load(device="cpu")
    conv = pipe.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert pipe.vae.decoder.conv_in.weight.is_contiguous()  # the VAE stays NCHW


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ArgumentError, match="fp32, fp16, bf16, autocast"):
        devices.choose("cpu", "int8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_group_norm_without_upcast_equals_the_fp32_computation_to_rounding(dtype):
    # GroupNorm32 calls the kernel directly when input and weights share a half dtype, trusting
    # PyTorch's fp32 accumulation; the result must be the fp32 computation rounded to that dtype.
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(2, 64, 32, 32, generator=g) * 30 + 100).to(dtype)  # large mean: where fp16 sums fail
    ref = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    out = norm.to(dtype)(x)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().max().item())


def test_group_norm_with_fp32_weights_and_a_half_input_upcasts():
    norm = GroupNorm32(64)
    x = torch.randn(1, 64, 8, 8).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps),
                               rtol=0, atol=2 ** -7 * 4)


def _report_line(lines, name):
    found = [line[len(name) + 2:] for line in lines if line.startswith(name + ": ")]
    assert len(found) == 1, lines
    return found[0]


def test_the_system_report_states_the_cpus_capability_and_native_half_kernels():
    lines = devices.system_report("cpu")
    assert torch.backends.cpu.get_cpu_capability() in _report_line(lines, "CPU")
    half = _report_line(lines, "native half kernels")
    assert half == (f"bf16 {'yes' if devices.cpu_has_fast(torch.bfloat16) else 'no'}, "
                    f"fp16 {'yes' if devices.cpu_has_fast(torch.float16) else 'no'}")
    assert _report_line(lines, "threads").split(";")[0] == str(torch.get_num_threads())


@pytest.mark.parametrize("native_bf16, advice", [(True, "bf16 (--precision bf16)"), (False, "fp32 (the default)")])
def test_the_system_report_names_bf16_as_fastest_only_with_native_bf16(monkeypatch, native_bf16, advice):
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices, "_cpu_kernel_state", lambda: "not asked")  # cpu_kernels caches what the CPU is
    monkeypatch.setattr(devices, "_winograd_state", lambda: "not asked")
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: dtype == torch.float32 or native_bf16)
    assert _report_line(devices.system_report("cpu"), "fastest precision here").startswith(advice)


def test_the_system_report_claims_no_fastest_precision_on_cpus_never_measured(monkeypatch):
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(devices, "_cpu_kernel_state", lambda: "not asked")  # cpu_kernels caches what the CPU is
    monkeypatch.setattr(devices, "_winograd_state", lambda: "not asked")
    assert _report_line(devices.system_report("cpu"), "fastest precision here").startswith("not measured")


def test_the_system_report_names_the_attention_kernel_build_and_its_openmp_runtime(monkeypatch):
    from sdlite import cpu_kernels

    state = _report_line(devices.system_report("cpu"), "attention kernel")
    kernel = cpu_kernels.load() if cpu_kernels.isas() else None
    if not cpu_kernels.isas():
        assert state.startswith("none for this CPU or system")
    else:
        if not cpu_kernels.may_pay():  # a build that pays for no head: SDPA is faster, the kernel is not used
            assert state == f"not used: PyTorch's attention is faster with {cpu_kernels.isas()[0]} alone"
            monkeypatch.setattr(cpu_kernels, "MAX_HEAD_WIDTH", {})  # as if it paid: the build's line
            state = _report_line(devices.system_report("cpu"), "attention kernel")
        assert kernel is not None, "this CPU has AVX2 or AVX-512, so the kernel must build"
        assert state.startswith(f"the {kernel.isa} build (fp32") and str(kernel.library) in state
        widest = cpu_kernels.MAX_HEAD_WIDTH.get(kernel.isa)
        assert (f"; heads up to {widest} channels wide, wider ones on PyTorch's)" in state) == bool(widest)
        assert state.endswith(f"on the OpenMP runtime {cpu_kernels.openmp_runtime()}")


def test_the_system_report_says_why_the_attention_kernel_is_unavailable(monkeypatch):
    import warnings

    from sdlite import cpu_kernels

    def fails(isa=None):
        warnings.warn("sdlite's CPU attention kernel is not available (no C++ compiler)", RuntimeWarning)

    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx512", "avx2"))
    monkeypatch.setattr(cpu_kernels, "load", fails)
    state = _report_line(devices.system_report("cpu"), "attention kernel")
    assert state == "unavailable: sdlite's CPU attention kernel is not available (no C++ compiler)"
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))  # the AVX2 build pays for the UNet's heads
    assert _report_line(devices.system_report("cpu"), "attention kernel") == state
    monkeypatch.setitem(cpu_kernels.MAX_HEAD_WIDTH, "avx2", 0)  # a build that pays for no head is not built
    assert _report_line(devices.system_report("cpu"), "attention kernel") == \
        "not used: PyTorch's attention is faster with avx2 alone"
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ())
    assert _report_line(devices.system_report("cpu"), "attention kernel").startswith("none for this CPU or system")



def test_the_system_report_says_whether_convolutions_run_by_winograd_and_why_not(monkeypatch):
    import warnings

    from sdlite import cpu_kernels, ops

    line = lambda: _report_line(devices.system_report("cpu"), "Winograd convolutions")  # noqa: E731
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ("cpu",))
    if cpu_kernels.isas():
        kernel = cpu_kernels.load_winograd()
        assert kernel is not None, "an x86-64 Linux CPU with a compiler: the kernel must build"
        assert line() == ("fp32 3x3 convs by F(4x4, 3x3) from 64 output tiles of 4x4, F(2x2, 3x3) from 64 output "
                          f"tiles of 2x2 (over the batch), the {kernel.isa} build, {kernel.library}")

    def fails():
        warnings.warn("sdlite's Winograd convolution kernel is not available (no C++ compiler)", RuntimeWarning)

    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))
    monkeypatch.setattr(cpu_kernels, "load_winograd", fails)
    assert line() == "unavailable: sdlite's Winograd convolution kernel is not available (no C++ compiler)"
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ())
    assert line().startswith("none for this CPU or system")
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())
    assert line().startswith("not used with ")
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
    assert line() == "off (--no-fused-kernels)"


@pytest.mark.parametrize("avx512_bf16, amx, limit, native", [
    (False, False, None, False),              # Skylake to Ice Lake Xeons, Tiger Lake: AVX-512 without bf16
    (True, False, None, True),                # AMD Zen 4, Cooper Lake
    (True, True, None, True),                 # Sapphire Rapids
    (True, False, "AVX512_CORE", False),      # oneDNN held below bf16 (how such a CPU is measured here)
    (True, False, "avx512_core_vnni", False),
    (True, False, "AVX512_CORE_BF16", True),
    (True, True, "AVX512_CORE_AMX", True),
])
def test_native_bf16_takes_bf16_instructions_and_heeds_onednns_limit(monkeypatch, avx512_bf16, amx, limit, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if limit is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert devices.cpu_has_native_bf16() is native
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices, "_onednn_has", lambda dtype: True)  # oneDNN has bf16 kernels, emulated or not
    assert devices.cpu_has_fast(torch.bfloat16) is native


@pytest.mark.parametrize("emulated, says", [(True, "emulates them with fp32 instructions"),
                                            (False, "slow reference loops")])
def test_the_autocast_warning_says_how_slow_bf16_is_on_this_kind_of_cpu(monkeypatch, emulated, says):
    monkeypatch.setattr(devices, "cpu_has_fast", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(devices, "_onednn_has", lambda dtype: emulated)
    with pytest.warns(RuntimeWarning, match=says):
        devices.choose("cpu", "autocast")


def test_with_onednn_held_below_bf16_bf16_weights_are_computed_in_fp32():
    # What an AVX-512 CPU without AVX512-BF16 gets, measured on this one: ops computes bf16 in fp32,
    # and sdlite's attention kernel has no bf16 there.
    import os
    import subprocess
    import sys

    code = ("import torch; from sdlite import ops, cpu_kernels; "
            "print(torch.bfloat16 in ops.HALF_AS_FP32, cpu_kernels.cpu_supported(torch.bfloat16))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]
