"""benchmarks/winograd.py, whose timings the benchmark reports, computes the same convolution."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdlite import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import winograd  # noqa: E402


@pytest.mark.parametrize("n, cin, cout, h, w, bias", [(2, 8, 16, 6, 10, True), (1, 3, 5, 2, 2, False), (3, 32, 4, 8, 4, True)])
def test_winograd_equals_direct_convolution(n, cin, cout, h, w, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    ref = F.conv2d(x, weight, b, padding=1)
    got = winograd.winograd_conv3x3(x, weight, b)
    assert got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_unet_patch_routes_eligible_convs_and_restores():
    conv = ops.Conv2d(320, 320, 3, padding=1)
    x = torch.randn(2, 320, 16, 16)
    calls = []
    original = winograd.winograd_conv3x3
    try:
        winograd.winograd_conv3x3 = lambda *a: calls.append(1) or original(*a)
        with torch.no_grad(), winograd.winograd_unet_convs():
            inside = conv(x)
    finally:
        winograd.winograd_conv3x3 = original
    assert calls == [1]
    with torch.no_grad():
        assert ((conv(x) - inside).abs().max() / inside.abs().max()).item() < 1e-5
    assert ops.Conv2d._conv_forward is not None and "winograd" not in ops.Conv2d._conv_forward.__qualname__
