"""On a CUDA GPU: the real CUDA-graph capture, against eager calls. Skipped without one (CI has none).

tests/test_cuda_graphs.py checks the bookkeeping around the capture on any machine; these check the
capture itself: a replay equals the eager call, a weight change is seen, and the pipeline's image
is the same with and without graphs. Run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sdlite import devices
from sdlite.clip import tokenizer_for
from sdlite.cuda_graphs import GraphedCall
from sdlite.pipeline import Pipeline

from factory import TINY_SD1, random_networks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_FP16 = devices.Precision(torch.device("cuda"), torch.float16)  # sdlite.load's CUDA default


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    nets = random_networks(TINY_SD1, 0)
    for m in nets.values():
        m.to("cuda", torch.float16)
    return Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1,
                    CUDA_FP16, name="tiny")


def unet_inputs(hw: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, hw, hw, generator=g).to("cuda", torch.float16)
    ctx = torch.randn(2, 77, TINY_SD1.unet.context_dim, generator=g).to("cuda", torch.float16)
    return x, torch.tensor([500.0, 20.0], device="cuda"), ctx


def test_a_replay_equals_the_eager_call_exactly(pipe):
    graphed = GraphedCall(pipe.unet, pipe.precision)
    for seed in range(3):  # the first call captures, the others replay with new inputs
        args = unet_inputs(seed=seed)
        torch.testing.assert_close(graphed(*args), graphed.eager(*args), rtol=0, atol=0)
    assert len(graphed.graphs) == 1 and graphed.failed is None


def test_a_weight_changed_in_place_is_seen_by_the_next_call(pipe):
    graphed = GraphedCall(pipe.unet, pipe.precision)
    args = unet_inputs()
    before = graphed(*args)
    conv = pipe.unet.out[-1]
    with torch.no_grad():
        conv.bias.add_(1.0)
    try:
        after = graphed(*args)
        torch.testing.assert_close(after, graphed.eager(*args), rtol=0, atol=0)
        assert not torch.equal(after, before)
    finally:
        with torch.no_grad():
            conv.bias.sub_(1.0)


def test_the_pipeline_draws_the_same_image_with_and_without_graphs(pipe):
    pipe.set_cuda_graphs(False)
    eager = pipe.txt2img("a cat", seed=3, steps=4, output_type="np")
    pipe.set_cuda_graphs(True)
    try:
        graphed = pipe.txt2img("a cat", seed=3, steps=4, output_type="np")
        assert pipe._unet_graphs.graphs and pipe._unet_graphs.failed is None
    finally:
        pipe.set_cuda_graphs(False)
    assert abs(graphed - eager).max() == 0


def test_a_channels_last_unet_replays_exactly_like_its_eager_call(pipe):
    # sdlite.load's CUDA layout (devices.unet_memory_format); the graph must replay it exactly too.
    unet_cl = copy.deepcopy(pipe.unet).to(memory_format=torch.channels_last)
    graphed = GraphedCall(unet_cl, pipe.precision)
    for seed in range(2):
        args = unet_inputs(seed=seed)
        torch.testing.assert_close(graphed(*args), graphed.eager(*args), rtol=0, atol=0)
    # and it computes the NCHW network's function, to fp16 rounding
    ref = GraphedCall(pipe.unet, pipe.precision).eager(*args)
    torch.testing.assert_close(graphed(*args).float(), ref.float(), rtol=0, atol=5e-3 * ref.abs().max().item())


def test_load_on_cuda_draws_the_cpu_image_to_fp16_rounding():
    import sdlite

    gpu = sdlite.load(device="cuda")
    assert gpu.precision.weight_dtype == torch.float16 and gpu.precision.autocast_dtype is None
    assert gpu.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert gpu.cuda_graphs
    image = gpu.txt2img("a red circle on the left", seed=1, output_type="np")
    ref = sdlite.load(device="cpu").txt2img("a red circle on the left", seed=1, output_type="np")
    assert abs(image - ref).max() < 2e-2  # 3e-3 measured on an H100 (benchmarks/RESULTS-cuda.md)


def test_a_sampling_step_never_makes_the_host_wait_for_the_gpu(monkeypatch):
    # devices.to_device: a blocking copy from pageable memory would wait for all queued GPU work
    # each step. CUDA's sync debug mode raises on such a wait; the old blocking copies must trip it.
    from sdlite.schedulers import Denoiser, DiscreteSchedule
    from sdlite.schedulers.k_samplers import randn_like

    d = Denoiser(lambda x, t: x * t.view(-1, 1, 1, 1) * 1e-3, DiscreteSchedule(), "v")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]

    def step() -> list[torch.Tensor]:
        for g, seed in zip(gens, (1, 2)):
            g.manual_seed(seed)
        return [d(x, 3.0), randn_like(x, gens), d.eps(x, 500), d.pred_x0(x, 500, x)]

    step()  # warm-up: lazy initialisation, the pinned-memory cache
    torch.cuda.set_sync_debug_mode("error")
    try:
        queued = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(devices, "ASYNC_HOST_COPIES", False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(queued, step()):  # the same values as blocking copies
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_unet_compiled_with_cuda_graphs_draws_the_eager_image_through_the_whole_loop(dtype):
    """``pipe.compile(mode="reduce-overhead")``: inductor's kernels replayed as CUDA graphs, through
    txt2img. PLMS keeps the noise predicted at earlier steps, and at guidance 1 in fp32 an eps model's
    prediction is the UNet's own return value: a buffer of the graph, which later replays would
    overwrite had the loop not copied it (``Pipeline._model_fn``)."""
    nets = random_networks(TINY_SD1, 0)
    for m in nets.values():
        m.to("cuda", dtype)
    pipe = Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1,
                    devices.Precision(torch.device("cuda"), dtype), name="tiny")
    pipe.set_cuda_graphs(False)
    kwargs = [dict(guidance_scale=1.0, sampler="plms"), dict(guidance_scale=7.5, sampler="euler")]
    eager = [pipe.txt2img("a cat", seed=3, steps=4, output_type="np", **kw) for kw in kwargs]
    pipe.compile(mode="reduce-overhead")
    for kw, ref in zip(kwargs, eager):
        for _ in range(2):  # the first call at a shape compiles and records, the second replays
            image = pipe.txt2img("a cat", seed=3, steps=4, output_type="np", **kw)
            assert abs(image - ref).max() < (2e-3 if dtype == torch.float32 else 2e-2), kw


def test_load_with_compile_on_cuda_draws_the_default_pipelines_image():
    import sdlite

    pipe = sdlite.load(device="cuda", compile=True)  # mode "reduce-overhead": CUDA graphs stay on by default
    assert not pipe.cuda_graphs and pipe._compiled_graphs
    image = pipe.txt2img("a red circle on the left", seed=1, output_type="np")
    ref = sdlite.load(device="cuda").txt2img("a red circle on the left", seed=1, output_type="np")
    assert abs(image - ref).max() < 2e-2
