"""The machine's fp32 matmul roof and the matmuls a model's decoding runs, timed alone (``benchmarks.generate``).

Each is the best of a few timed calls after a warm-up call, on the threads PyTorch runs with.
"""

from __future__ import annotations

import collections
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from evaluation.linear import onednn_product, switches
from steering.layers import decoder_layers


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
    """The fewest seconds of ``repeats`` calls of ``call``, after a warm-up call."""
    call()
    best = math.inf
    for _ in range(repeats):
        tick = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - tick)
    return best


def matmul_roof(size: int, repeats: int = 5) -> dict[str, float]:
    """The best GFLOP/s of ``repeats`` fp32 ``(size, size) @ (size, size)`` products with each of PyTorch's CPU
    matmul libraries: ``torch.mm`` (its BLAS, MKL) and, where PyTorch has oneDNN (whether or not
    ``TRUTHSTEER_CPU_LINEAR`` opts out of it: the roof is the machine's), oneDNN on the second factor as it is (what ``evaluation.linear`` runs) and laid out for it beforehand
    (``torch.ops.mkldnn._reorder_linear_weight``, what PyTorch's compiler does for frozen models); the roof is
    the fastest."""
    return {library: 2 * size**3 / best_seconds(call, repeats) / 1e9 for library, call in products(size).items()}


def products(size: int) -> dict[str, Callable[[], Any]]:
    """One fp32 ``(size, size) @ (size, size)`` product with each of ``matmul_roof``'s libraries, by name."""
    a, b = torch.randn(size, size), torch.randn(size, size)  # (size, size) each
    calls: dict[str, Callable[[], Any]] = {"torch_mm": functools.partial(torch.mm, a, b)}
    if torch.backends.mkldnn.is_available():
        weight = b.T.contiguous()  # (size, size): b as a linear layer's weight
        laid_out = torch.ops.mkldnn._reorder_linear_weight(weight, size)
        calls.update(onednn=functools.partial(onednn_product, a, weight, None),
                     onednn_laid_out=functools.partial(onednn_product, a, laid_out, None))
    return calls


def sustained_gflops(size: int, library: str, seconds: float = 1.0) -> float:
    """The median GFLOP/s of ``library``'s ``(size, size)`` products (``products``) run back to back for about
    ``seconds`` after a warm-up call: what the machine sustains at one stretch of a run, where ``matmul_roof``'s
    best of a few calls finds its fastest moment."""
    call = products(size)[library]
    call()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        tick = time.perf_counter()
        call()
        times.append(time.perf_counter() - tick)
    return 2 * size**3 / statistics.median(times) / 1e9


def matmul_flops(model: Any) -> tuple[float, float]:
    """Per token: the FLOPs of every decoder layer's linear layers, and of the LM head (2 x weights)."""
    layers = sum(2 * m.weight.numel() for layer in decoder_layers(model) for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    return float(layers), float(2 * head.weight.numel())


def decode_shape_gflops(model: Any, rows: int, repeats: int = 5) -> dict[str, float]:
    """The GFLOP/s of one decode step's matmuls at ``rows`` rows: each distinct (in, out) shape of the decoder
    layers' linear layers and of the LM head timed alone (best of ``repeats``), weighted by how often a token
    runs it, with PyTorch's ``torch.nn.functional.linear`` (MKL) and, where ``evaluation.linear`` switches, with
    oneDNN as ``evaluation.linear`` runs it. The most a batch of ``rows`` can reach in decode with each."""
    shapes = collections.Counter((m.in_features, m.out_features) for layer in decoder_layers(model)
                                 for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight  # (vocab, d_model)
    shapes[(head.shape[1], head.shape[0])] += 1
    seconds: dict[str, float] = collections.defaultdict(float)
    flops = 0.0
    for (n_in, n_out), count in shapes.items():
        x, weight = torch.randn(rows, n_in), torch.randn(n_out, n_in)  # (rows, in), (out, in)
        seconds["torch_linear"] += count * best_seconds(functools.partial(torch.nn.functional.linear, x, weight), repeats)
        if switches(x.device):
            seconds["onednn"] += count * best_seconds(functools.partial(onednn_product, x, weight, None), repeats)
        flops += count * 2 * rows * n_in * n_out
    return {library: flops / s / 1e9 for library, s in seconds.items()}


__all__ = ['best_seconds', 'decode_shape_gflops', 'matmul_flops', 'matmul_roof', 'products', 'sustained_gflops']
