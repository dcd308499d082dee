"""sdlite.ops.Conv2d: the CPU backend choice changes which kernel runs, never the result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdlite.ops as ops


@pytest.mark.parametrize("batch, channels, hw", [(2, 512, 8), (2, 512, 16), (1, 64, 8), (4, 512, 32)])
def test_conv2d_equals_the_oneDNN_convolution_on_either_path(batch, channels, hw, monkeypatch):
    monkeypatch.setattr(ops, "BLAS_CONV_MAX_ROWS", 512)  # the AVX2 policy, whatever this CPU is
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(channels, 8, 3, padding=1)
    x = torch.randn(batch, channels, hw, hw, generator=g)
    with torch.no_grad():
        ours = conv(x)
        reference = F.conv2d(x, conv.weight, conv.bias, padding=1)  # oneDNN, PyTorch's default
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch._C._get_mkldnn_enabled()  # the switch is restored after the call


def test_conv2d_takes_the_blas_path_only_for_small_products_with_many_channels(monkeypatch):
    monkeypatch.setattr(ops, "BLAS_CONV_MAX_ROWS", 512)
    seen = []
    real = torch.nn.Conv2d._conv_forward

    def spy(self, input, weight, bias):
        seen.append(torch._C._get_mkldnn_enabled())
        return real(self, input, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    with torch.no_grad():
        ops.Conv2d(512, 4, 3, padding=1)(torch.randn(2, 512, 16, 16))  # 2*16*16 = 512 rows: BLAS
        ops.Conv2d(512, 4, 3, padding=1)(torch.randn(4, 512, 16, 16))  # 1024 rows: oneDNN
        ops.Conv2d(64, 4, 3, padding=1)(torch.randn(1, 64, 8, 8))  # few channels: oneDNN
    assert seen == [False, True, True]
    monkeypatch.setattr(ops, "BLAS_CONV_MAX_ROWS", None)  # the switch off (non-AVX2 CPUs)
    seen.clear()
    with torch.no_grad():
        ops.Conv2d(512, 4, 3, padding=1)(torch.randn(2, 512, 16, 16))
    assert seen == [True]
