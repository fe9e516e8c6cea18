"""``benchmarks.generate``'s ``in_place`` measurement: one batched generation timed from the inside."""

from __future__ import annotations

import os
import time
from typing import Any
from unittest import mock

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from core.config import EvalConfig
from evaluation import native
from evaluation.attention import PACKED_DECODE, packed_decode_attention
from evaluation.generate import generate_batch
from evaluation.linear import onednn_linears
from steering.layers import decoder_layers
from steering.methods.intervention import Steering


def in_place_breakdown(loaded: Any, questions: list[Any], steering: Steering, decoding: EvalConfig,
                       answers: list[str]) -> dict[str, Any]:
    """One more batched generation of ``questions`` (the evaluate path), timed from the inside: every linear
    layer's and the LM head's forward (their seconds and GFLOP/s where they run, their weights streaming
    from memory between other work, unlike ``decode_shape_gflops``), each also run by PyTorch's own
    ``torch.nn.functional.linear`` on the same input (before the layer on odd calls, after it on even ones),
    and every one-token attention call run three times, ``packed_decode_attention`` with its C++ products
    (``evaluation.native``), the same with PyTorch's ``bmm`` (``TRUTHSTEER_CPU_ATTENTION=torch``) and
    ``transformers``' ``sdpa`` under the math kernel, in alternating order, so that all meet the same machine
    state (a paired comparison the whole-run timings cannot resolve here); the layer's and the packed results
    go on, and the answers must equal ``answers``."""
    linear = {"seconds": 0.0, "torch_seconds": 0.0, "flops": 0.0, "calls": 0}
    attention = {"packed": 0.0, "packed_bmm": 0.0, "sdpa": 0.0, "calls": 0}
    started: dict[int, float] = {}

    def torch_linear(module: Any, args: Any) -> None:
        tick = time.perf_counter()
        torch.nn.functional.linear(args[0], module.weight, module.bias)
        linear["torch_seconds"] += time.perf_counter() - tick

    def before(module: torch.nn.Module, args: Any) -> None:
        linear["calls"] += 1
        if linear["calls"] % 2:  # PyTorch's own product on the same input, before the layer's on odd calls
            torch_linear(module, args)
        started[id(module)] = time.perf_counter()

    def after(module: Any, args: Any, output: torch.Tensor) -> None:
        linear["seconds"] += time.perf_counter() - started.pop(id(module))
        linear["flops"] += 2.0 * output[..., :1].numel() * module.in_features * module.out_features
        if not linear["calls"] % 2:  # and after it on even ones
            torch_linear(module, args)

    def paired(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if query.shape[2] != 1:
            return packed_decode_attention(module, query, *args, **kwargs)
        attention["calls"] += 1
        kernels = [("packed", packed_decode_attention), ("packed_bmm", packed_decode_attention),
                   ("sdpa", sdpa_attention_forward)]
        results = {}
        for name, kernel in kernels if attention["calls"] % 2 else reversed(kernels):
            with mock.patch.dict(os.environ, {native.OPT_OUT: "torch" if name == "packed_bmm" else ""}):
                tick = time.perf_counter()
                results[name] = kernel(module, query, *args, **kwargs)
                attention[name] += time.perf_counter() - tick
        return results["packed"]

    linears = [m for layer in decoder_layers(loaded.model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    linears.append(loaded.model.get_output_embeddings())
    handles = [h for m in linears for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    AttentionInterface.register(PACKED_DECODE, paired)
    try:
        tick = time.perf_counter()
        with onednn_linears(loaded.model, loaded.device, laid_out_rows=decoding.batch_size):  # as evaluate lays them out
            got = [a.text for i in range(0, len(questions), decoding.batch_size)
                   for a in generate_batch(loaded, [q.question for q in questions[i:i + decoding.batch_size]],
                                           steering, decoding)]
        seconds = time.perf_counter() - tick
    finally:
        AttentionInterface.register(PACKED_DECODE, packed_decode_attention)
        for handle in handles:
            handle.remove()
    if got != answers:
        raise AssertionError(f"in place: {sum(g != a for g, a in zip(got, answers, strict=True))} answers differ")
    report = {"seconds_with_both_attentions_and_linears": seconds, "linear_seconds": linear["seconds"],
              "linear_gflops": linear["flops"] / linear["seconds"] / 1e9, "linear_calls": linear["calls"],
              "torch_linear_seconds": linear["torch_seconds"],
              "torch_linear_gflops": linear["flops"] / linear["torch_seconds"] / 1e9,
              "speedup_of_onednn_linear_over_torch_linear": linear["torch_seconds"] / linear["seconds"],
              "one_token_attention_calls": attention["calls"], "packed_attention_seconds": attention["packed"],
              "packed_bmm_attention_seconds": attention["packed_bmm"], "sdpa_math_attention_seconds": attention["sdpa"],
              "speedup_of_packed_cpp_products_over_bmm": attention["packed_bmm"] / attention["packed"],
              "speedup_of_packed_attention_over_sdpa_math": attention["sdpa"] / attention["packed"]}
    print(f"in place: linear layers {linear['seconds']:.1f} s at {report['linear_gflops']:.0f} GFLOP/s (PyTorch's own "
          f"on the same inputs, paired: {linear['torch_seconds']:.1f} s); one-token "
          f"attention {attention['packed']:.2f} s packed (C++ products) vs {attention['packed_bmm']:.2f} s packed (bmm) vs "
          f"{attention['sdpa']:.2f} s sdpa (math kernel), paired",
          flush=True)
    return report


__all__ = ['in_place_breakdown']
