"""CUDA-graph replay of the UNet: when a graph is captured, reused, dropped, and given up.

A CUDA graph cannot be captured without a GPU, so these tests replace the capture by a stand-in
whose replay recomputes the call from the static input buffers (as a graph does). What they prove
is the bookkeeping around it, which is where wrong images would come from: inputs copied into the
buffers, one capture per shape, a fresh capture after the weights change, a warning and eager calls
after a failed capture, and the pipeline's switches dropping graphs that would keep old behaviour.
The capture itself is checked on a GPU by benchmarks/bench_cuda.py (parity and speed, in
benchmarks/RESULTS-cuda.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdlite
from sdlite import devices
from sdlite.clip import tokenizer_for
from sdlite.cuda_graphs import GraphedCall, _Graph
from sdlite.errors import ArgumentError
from sdlite.pipeline import Pipeline

from factory import TINY_SD1, random_networks

CPU = devices.Precision(torch.device("cpu"), torch.float32)


class _Replay:
    """Stands in for torch.cuda.CUDAGraph: replay() recomputes the output from the static inputs."""

    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self) -> None:
        self.output.copy_(self.fn(*self.inputs))


class StandIn(GraphedCall):
    def __init__(self, *args, fail: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.captures, self.fail = 0, fail

    def capture(self, args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        inputs = [a.clone() for a in args]
        output = self.eager(*inputs)
        return _Graph(_Replay(self.eager, inputs, output), inputs, output)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4)).eval()


def test_replays_equal_eager_calls_and_one_capture_serves_each_shape(net):
    g = StandIn(net, CPU)
    for _ in range(3):  # new values, same shape: copied into the buffers, no new capture
        x = torch.randn(2, 4)
        torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert g.captures == 1
    y = torch.randn(5, 4)
    torch.testing.assert_close(g(y), net(y), rtol=0, atol=0)
    assert g.captures == 2 and len(g.graphs) == 2


def test_the_output_is_a_copy_not_the_static_buffer(net):
    g = StandIn(net, CPU)
    a = g(torch.ones(1, 4))
    before = a.clone()
    g(torch.zeros(1, 4))  # overwrites the static output
    torch.testing.assert_close(a, before, rtol=0, atol=0)


def test_at_most_max_graphs_shapes_are_kept_oldest_dropped_first(net):
    g = StandIn(net, CPU, max_graphs=2)
    for n in (1, 2, 3):
        g(torch.randn(n, 4))
    assert [k[0][0][0][0] for k in g.graphs] == [2, 3]
    g(torch.randn(1, 4))
    assert g.captures == 4


def test_weights_changed_in_place_or_replaced_mean_a_new_capture(net):
    g = StandIn(net, CPU)
    x = torch.randn(2, 4)
    g(x)
    with torch.no_grad():
        net[0].weight.mul_(2)  # in place: same address, new version
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert g.captures == 2 and len(g.graphs) == 1
    net.load_state_dict({k: v + 1 for k, v in net.state_dict().items()}, assign=True)  # new tensors
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert g.captures == 3 and len(g.graphs) == 1
    with torch.no_grad():
        net[2].bias.data = net[2].bias.data + 1  # same Parameter object, new memory (as .to() does)
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert g.captures == 4
    net[2] = nn.Linear(8, 4)  # a replaced submodule (as a LoRA wrapper would do)
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert g.captures == 5
    g(x)
    assert g.captures == 5  # unchanged weights: the graph is replayed, not captured again


def test_a_failed_capture_warns_once_and_runs_eagerly_from_then_on(net):
    g = StandIn(net, CPU, fail=True)
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the UNet failed"):
        out = g(x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    assert g.failed and not g.graphs
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)  # no second warning: pytest would not fail, so
    assert g.captures == 0  # check that no capture was tried again


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    nets = random_networks(TINY_SD1, 0)
    return Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1, CPU,
                    name="tiny")


def test_the_pipeline_loop_through_graphs_draws_the_same_image(pipe):
    ref = pipe.txt2img("a cat", seed=3, steps=3, output_type="np")
    pipe._unet_graphs = graphs = StandIn(pipe.unet, pipe.precision)
    try:
        out = pipe.txt2img("a cat", seed=3, steps=3, output_type="np")
        assert graphs.captures == 1  # cond + uncond as one batch: one shape for every step
    finally:
        pipe._unet_graphs = None
    assert abs(out - ref).max() == 0


def test_with_token_merging_the_loop_runs_eagerly_and_uses_the_graphs_again_after(pipe):
    """A graph captured without merging must not replay a merging run (and merging is untried in graphs)."""
    ref = pipe.txt2img("a cat", seed=3, steps=2, output_type="np", token_merging_ratio=0.5)
    pipe._unet_graphs = graphs = StandIn(pipe.unet, pipe.precision)
    try:
        out = pipe.txt2img("a cat", seed=3, steps=2, output_type="np", token_merging_ratio=0.5)
        assert graphs.captures == 0 and not graphs.graphs
        pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
        assert graphs.captures == 1
    finally:
        pipe._unet_graphs = None
    assert abs(out - ref).max() == 0


def test_graphs_follow_a_replaced_unet_and_precision(pipe, net):
    ref = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
    pipe._unet_graphs = graphs = StandIn(net, devices.Precision(torch.device("cpu"), torch.bfloat16))
    try:  # captured for another module and precision: must not be replayed for this pipeline
        out = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
        assert graphs.module is pipe.unet and graphs.precision == pipe.precision and graphs.captures == 1
    finally:
        pipe._unet_graphs = None
    assert abs(out - ref).max() == 0


def test_pipeline_switches_drop_the_graphs_and_low_memory_turns_them_off(pipe):
    pipe._unet_graphs = graphs = StandIn(pipe.unet, pipe.precision)
    try:
        pipe.txt2img("a cat", seed=3, steps=1, output_type="np")
        assert graphs.graphs
        pipe.attention_chunk = 5  # a captured graph would keep running unchunked attention
        assert not graphs.graphs
        pipe.attention_chunk = None
        pipe.set_low_memory()
        assert pipe._unet_graphs is None and not pipe.cuda_graphs
    finally:
        pipe.set_low_memory(False)
        pipe._unet_graphs = None


def test_cuda_graphs_need_cuda_and_are_off_by_default_on_the_cpu(pipe):
    with pytest.raises(ArgumentError, match="CUDA graphs need a CUDA device"):
        pipe.set_cuda_graphs(True)
    pipe.set_cuda_graphs(False)  # turning them off is always allowed
    assert not sdlite.load(device="cpu").cuda_graphs
    with pytest.raises(ArgumentError, match="CUDA graphs need a CUDA device"):
        sdlite.load(device="cpu", cuda_graphs=True)


def test_load_compiles_in_reduce_overhead_mode_exactly_where_cuda_graphs_are_on(monkeypatch):
    # compile's default mode would give up the graph replay (slower at batch 2 on a GPU).
    calls = []
    monkeypatch.setattr(Pipeline, "compile", lambda self, **options: calls.append(("compile", options)))
    monkeypatch.setattr(Pipeline, "set_cuda_graphs", lambda self, enabled=True: calls.append(("graphs", enabled)))
    sdlite.load(device="cpu", compile=True)
    assert calls == [("compile", {})]
    calls.clear()
    sdlite.load(device="cpu", compile=True, cuda_graphs=True)  # as on CUDA, where graphs are the default
    assert calls == [("graphs", True), ("compile", {"mode": "reduce-overhead"})]
