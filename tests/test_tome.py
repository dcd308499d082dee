"""Token merging (sdlite.unet.tome): the same merges and the same UNet output as the ``tomesd`` package (the
web UI's implementation) with the web UI's settings, applied to diffusers' UNet; where it applies; its bounds.

tomesd merges the same tokens into the same means, but lists them in another order (its partition comes from an
unstable argsort), so the comparisons are of order-free quantities: a token's merged value, read back at its own
position (unmerge(merge(x))), and the UNet's output (self-attention does not depend on the order of its tokens).
"""

from __future__ import annotations

import pytest
import torch

from sdlite.errors import ArgumentError
from sdlite.unet import tome

from test_unet import TINY, diffusers_unet, tiny

# The web UI's call: tomesd.apply_patch(model, ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
# merge_mlp=False), with tomesd's defaults max_downsample=1, sx=sy=2.
A1111_TOMESD = dict(use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)


def test_partition_takes_the_top_left_of_each_whole_2x2_cell():
    dst, src = tome.partition(5, 4)
    assert dst.tolist() == [0, 2, 8, 10]  # rows 0 and 2, columns 0 and 2; row 4 has no whole cell
    assert sorted(dst.tolist() + src.tolist()) == list(range(20))


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (5, 4), (64, 64)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_merges_equal_tomesd(h, w, ratio):
    """Measured: max |difference| <= 4.8e-7 (the order of the sums in a mean), for values of O(1). Ratios
    above 0.75 merge every source, as tomesd's cap does."""
    from tomesd.merge import bipartite_soft_matching_random2d

    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * w))
    r = int(h * w * ratio)
    merge, unmerge = bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    ours = tome.match_tokens(x, h, w, r)
    assert ours.rows == merge(x).shape[1]
    torch.testing.assert_close(ours.unmerge(ours.merge(x)), unmerge(merge(x)), rtol=0, atol=2e-6)
    assert not torch.allclose(ours.unmerge(ours.merge(x)), x)  # tokens were merged


def test_a_merged_token_is_the_mean_of_its_group_and_unmerge_copies_it_back():
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])  # a 2x2 grid: token 0 is the destination
    m = tome.match_tokens(x, 2, 2, 1)  # the source most similar to token 0 is token 1
    merged = m.merge(x)
    assert m.rows == 3 and merged.shape == (1, 3, 2)
    torch.testing.assert_close(m.unmerge(merged)[0, :2], torch.tensor([[0.95, 0.05], [0.95, 0.05]]))
    torch.testing.assert_close(m.unmerge(merged)[0, 2:], x[0, 2:])


@pytest.mark.parametrize("h,w,r", [(1, 8, 4), (8, 1, 4), (4, 4, 0)])
def test_nothing_is_merged_without_a_whole_cell_or_with_r_0(h, w, r):
    x = torch.randn(2, h * w, 8)
    m = tome.match_tokens(x, h, w, r)
    assert m.rows == h * w and torch.equal(m.merge(x), x) and torch.equal(m.unmerge(x), x)


@pytest.mark.parametrize("hw", [(16, 12), (10, 6)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_unet_with_token_merging_equals_diffusers_patched_by_tomesd(hw, ratio):
    """fp32, tiny UNet (two levels; attention at both), batch 2. Measured: max |difference| 1.8e-6-2.4e-6, while
    merging moves the output by 0.34 (0.3), 0.44 (0.5), 0.58 (0.75) at 16x12. (Latents of odd size are not compared:
    there diffusers resizes its upsampled maps where sdlite and the web UI crop them. Odd token grids are compared
    in test_merges_equal_tomesd.)"""
    import tomesd  # a test dependency (pyproject's "test" extra): missing, this fails rather than skips
    model = tiny()
    ref = diffusers_unet(TINY, model.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, *hw, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        plain = ref(x, t, encoder_hidden_states=context).sample
        tomesd.apply_patch(ref, ratio=ratio, **A1111_TOMESD)
        expected = ref(x, t, encoder_hidden_states=context).sample
        model.token_merging_ratio = ratio
        ours = model(x, t, context)
    assert (expected - plain).abs().max() > 0.1  # merging changes the output
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_only_the_top_levels_self_attention_sees_fewer_tokens(monkeypatch):
    import sdlite.unet.model as unet_model

    seen = []
    real = unet_model.attention
    monkeypatch.setattr(unet_model, "attention", lambda q, k, v, chunk=None: seen.append((q.shape[-2], k.shape[-2]))
                        or real(q, k, v, chunk))
    model = tiny()
    model.token_merging_ratio = 0.5
    with torch.no_grad():
        model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32))
    # Level 1 (8x8 = 64 tokens): 32 merged away; level 2 (4x4) untouched; cross-attention (77 keys) untouched.
    self_attention = [s for s in seen if s[1] != 77]
    assert (32, 32) in self_attention and (16, 16) in self_attention
    assert {s for s in self_attention if s[0] not in (16, 32)} == set()
    assert all(q in (64, 16) for q, k in seen if k == 77)


def test_ratio_0_is_the_plain_unet_bit_for_bit_and_the_ratio_is_bounded():
    model = tiny()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = model(x, t, context)
        model.token_merging_ratio = 0.5
        model.token_merging_ratio = 0.0
        assert torch.equal(model(x, t, context), plain)
    for bad in (-0.1, 0.8, float("nan")):
        with pytest.raises(ArgumentError, match=r"\[0, 0.75\]"):
            model.token_merging_ratio = bad
    assert model.token_merging_ratio == 0.0


def test_the_token_merging_context_restores_the_ratio_it_found_even_after_an_error():
    model = tiny()
    model.token_merging_ratio = 0.25
    with model.token_merging(0.5):
        assert model.token_merging_ratio == 0.5
    assert model.token_merging_ratio == 0.25
    with pytest.raises(RuntimeError), model.token_merging(0.0):
        raise RuntimeError("interrupted")
    assert model.token_merging_ratio == 0.25


def test_token_merging_in_bf16_runs_in_bf16():
    model = tiny(dtype=torch.bfloat16)
    model.token_merging_ratio = 0.5
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
