"""Replay the UNet as a CUDA graph: one launch per sampling step instead of thousands.

(An SD1.5 UNet call dispatches about 2,350 tensor operations, counted on the meta device; most of
them launch a kernel.)

Why: on a fast GPU the UNet's kernels finish sooner than Python can issue them. On an H100 an SD1.5
UNet call at batch 2 took the same ~29 ms at 32x32 and at 64x64 latents, for sdlite and for
diffusers alike (benchmarks/RESULTS-cuda.md): the time was the CPU launching kernels, not the GPU
computing. A CUDA graph records the kernels of one call once; each later call is one replay.

How (the recipe of the PyTorch CUDA-graphs documentation): for each input signature (shapes,
dtypes) the inputs get static buffers; two warm-up calls run on a side stream (lazy
initialisation, cuDNN's algorithm choice); one call is captured.
A later call copies its inputs into the buffers, replays the graph and returns a copy of the static
output. Autocast runs with its weight-cast cache off, as capture requires.

A graph reads the memory the parameters had at capture. So the parameters' addresses and version
counters are part of the signature (:func:`weights_state`, read before every replay): replacing a
parameter (``.to()``, ``load_state_dict(..., assign=True)``) or a submodule, or changing a parameter
in place makes the next call capture afresh, and drops the old graphs. Module switches (attention
chunking, kernel cache) are set through :class:`~sdlite.pipeline.Pipeline`, which calls
:meth:`GraphedCall.reset`.

The cost: a few eager calls at each new shape, and the memory of the captured call's activations,
held in the graph's private pool until :meth:`reset` (at most ``max_graphs`` shapes are kept).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops
from .devices import Precision


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; they cannot change in place either
        return 0


def weights_state(module: nn.Module) -> list[tuple[int, int]]:
    """(address, version) of every parameter and buffer of ``module``, found by walking its live
    module tree, so that a replaced submodule, a replaced parameter, new data (``.to()``) and an
    in-place change all show. Checked before every replay, so it is written for speed: the same
    walk through ``module.parameters()`` builds a dotted name for every submodule and took 4.7 ms for
    an SD1.5 UNet (~1,000 modules, 686 tensors) on a 2-core CPU; this takes 1.0 ms."""
    stack, state = [module], []
    while stack:
        m = stack.pop()
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                state.append((t.data_ptr(), _version(t)))
        stack.extend(m._modules.values())
    return state


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class GraphedCall:
    """``module(*args)`` under ``precision``'s autocast, replayed from CUDA graphs (tensor args only).

    One call at a time: the input and output buffers are shared (the web UI serialises generation)."""

    def __init__(self, module: nn.Module, precision: Precision, max_graphs: int = 2):
        self.module, self.precision, self.max_graphs = module, precision, max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._weights: list[tuple[int, int]] = []
        self.failed: str | None = None  # why capture failed; then every call runs eagerly

    def follow(self, module: nn.Module, precision: Precision) -> None:
        """Use ``module`` under ``precision`` from now on (the pipeline's current ones), dropping the
        graphs if either changed: a graph replays the module and autocast it was captured with."""
        if module is not self.module or precision != self.precision:
            self.module, self.precision = module, precision
            self.reset()

    def reset(self) -> None:
        """Drop every graph (and its memory pool)."""
        self.graphs.clear()
        self._weights = []

    def eager(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.precision.autocast(cache_enabled=False):
            return self.module(*args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.eager(*args)
        weights = weights_state(self.module)
        if weights != self._weights:
            self.reset()
            self._weights = weights
        key = (tuple((a.shape, a.dtype, a.device) for a in args), ops.UPSAMPLE_BY_PHASES)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(args)
            except RuntimeError as e:  # an operation that cannot be captured: run eagerly from now on
                self.failed = f"{type(e).__name__}: {e}"
                self.reset()
                warnings.warn(f"CUDA graph capture of the UNet failed, running it eagerly ({self.failed})",
                              RuntimeWarning, stacklevel=2)
                return self.eager(*args)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for static, a in zip(entry.inputs, args):
            static.copy_(a)
        entry.graph.replay()
        return entry.output.clone()

    def capture(self, args: tuple[torch.Tensor, ...]) -> _Graph:
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.eager(*inputs)
        return _Graph(graph, inputs, output)
