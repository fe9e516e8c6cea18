"""Inference-Time Intervention (steering.iti) against oracles that share none of its machinery.

Oracles, on the tiny Llama / Gemma-2 / Gemma-3 / Gemma-3-multimodal models and a Gemma-3 whose
`n_heads * head_dim` (4 x 12 = 48) differs from `hidden_size` (32), as in the real Gemma-3 270m:

- the attention output under ITI minus the plain one equals `o_proj.weight[:, head slice] @ (alpha *
  sigma * direction)`, summed over the layer's heads, from the start position on and exactly 0 before;
- recorded head inputs pushed through `o_proj.weight` by hand give the attention module's output;
- cached, batched, left-padded greedy `generate` under ITI equals a greedy loop that recomputes the
  whole sequence without a cache (position = index) under ITI and under a hook written here;
- probe selection on synthetic activations where one head separates the classes: that head comes
  first with accuracy 1.0, its direction and sigma equal a numpy recomputation;
- the `SteeredCount` equals batch x steered positions, for a forward and for a generation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import BatchEncoding, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel

from steering.hooks import active_hooks, check_steered
from steering.iti import (
    HeadProbes,
    ItiDirections,
    attention_heads,
    iti_applied,
    o_proj,
    record_head_inputs,
    select_heads,
)
from tests.tiny_models import BOS_ID, EOS_ID, PAD_ID, TINY_ARCHS, VOCAB_SIZE, make_tiny, make_tokenizer

ARCHS = (*TINY_ARCHS, "gemma3_wide")
PROMPTS = ["hello world", "hi", "truth is"]
GEN_PROMPTS = ["Is the Earth flat?", "Why?"]
MAX_NEW = 6


def _gemma3_wide() -> PreTrainedModel:
    """Gemma-3 text with 4 heads of 12 on a 32-wide residual: o_proj maps 48 -> 32."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, max_position_embeddings=128, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, query_pre_attn_scalar=12, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config)
    model.set_attn_implementation("eager")
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    return model.float().eval()


@functools.cache
def tiny(arch: str) -> PreTrainedModel:
    return _gemma3_wide() if arch == "gemma3_wide" else make_tiny(arch)[0]


def encode(prompts: list[str]) -> BatchEncoding:
    return make_tokenizer()(prompts, return_tensors="pt", padding=True)  # left padded


def heads_of(model: PreTrainedModel) -> tuple[int, int]:
    """(n_heads, head_dim): heads from the config, head_dim from o_proj's weight (in_features / n_heads)."""
    n_heads = model.config.get_text_config().num_attention_heads
    return n_heads, model.get_decoder().layers[0].self_attn.o_proj.weight.shape[1] // n_heads


def random_directions(pairs: list[tuple[int, int]], head_dim: int, seed: int = 0) -> ItiDirections:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(pairs), head_dim, generator=gen)  # (K, head_dim)
    return ItiDirections(
        layers=torch.tensor([layer for layer, _ in pairs]), heads=torch.tensor([head for _, head in pairs]),
        directions=directions / directions.norm(dim=1, keepdim=True),
        sigmas=0.5 + torch.rand(len(pairs), generator=gen), accuracies=torch.full((len(pairs),), 0.9),
    )


@torch.no_grad()
def attention_outputs(model: PreTrainedModel, enc: BatchEncoding) -> dict[int, Tensor]:
    """Each layer's self_attn output (before Gemma's post-attention norm), by a plain forward hook."""
    store: dict[int, Tensor] = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: store.__setitem__(i, out[0].clone()))
        for i, layer in enumerate(model.get_decoder().layers)
    ]
    try:
        model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    return store


@torch.no_grad()
def hand_shift(model: PreTrainedModel, directions: ItiDirections, alpha: float, layer: int) -> Tensor:
    """sum over the layer's selected heads of o_proj.weight[:, head slice] @ (alpha * sigma * direction)."""
    weight = model.get_decoder().layers[layer].self_attn.o_proj.weight.double()  # (d_model, n_heads * head_dim)
    _, head_dim = heads_of(model)
    total = torch.zeros(weight.shape[0], dtype=torch.float64)  # (d_model,)
    for i in range(len(directions.layers)):
        if int(directions.layers[i]) == layer:
            h = int(directions.heads[i])
            shift = alpha * directions.sigmas[i].double() * directions.directions[i].double()  # (head_dim,)
            total += weight[:, h * head_dim : (h + 1) * head_dim] @ shift
    return total.float()


# ---------------------------------------------------------------- the hook's effect


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ARCHS)
def test_shift_of_the_attention_output_equals_o_proj_weight_times_the_head_delta(arch: str) -> None:
    model = tiny(arch)
    n_heads, head_dim = heads_of(model)
    assert attention_heads(model) == (n_heads, head_dim)
    enc = encode(PROMPTS)
    width = enc.input_ids.shape[1]
    pairs = [(1, 0), (1, n_heads - 1), (2, 1)]  # two heads of layer 1; layer 2 cannot reach layer 1's output
    directions, alpha = random_directions(pairs, head_dim), 30.0
    starts = torch.tensor([0, 4, width - 1])
    base = attention_outputs(model, enc)
    with iti_applied(model, directions, alpha, start_positions=starts) as count:
        steered = attention_outputs(model, enc)
    assert torch.equal(steered[0], base[0])
    expected = hand_shift(model, directions, alpha, 1)  # (d_model,)
    assert expected.norm() > 1.0  # not vacuous
    for row, start in enumerate(starts.tolist()):
        diff = steered[1][row] - base[1][row]  # (seq, d_model)
        torch.testing.assert_close(diff[start:], expected.expand(width - start, -1), atol=1e-5, rtol=0)
        assert torch.equal(diff[:start], torch.zeros_like(diff[:start]))
    assert (count.total, count.calls) == (int((width - starts).sum()), 1)  # once per forward, not per layer
    check_steered(count, int((width - starts).sum()), "a forward")

    with iti_applied(model, directions, alpha) as everywhere:  # start_positions None: every position
        steered = attention_outputs(model, enc)
    torch.testing.assert_close(steered[1] - base[1], expected.expand_as(base[1]), atol=1e-5, rtol=0)
    assert everywhere.total == len(PROMPTS) * width
    with iti_applied(model, directions, 0.0, start_positions=starts) as zero:
        unsteered = attention_outputs(model, enc)
    assert all(torch.equal(unsteered[i], base[i]) for i in base) and zero.total == count.total
    assert active_hooks(model) == 0


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_recorded_head_inputs_times_o_proj_give_the_attention_output(arch: str) -> None:
    model = tiny(arch)
    n_heads, head_dim = heads_of(model)
    enc = encode(PROMPTS)
    base = attention_outputs(model, enc)
    with record_head_inputs(model, [0, 2]) as heads:
        model(**enc)
    assert sorted(heads) == [0, 2] and not heads[0].requires_grad
    for layer in (0, 2):
        assert heads[layer].shape == (*enc.input_ids.shape, n_heads * head_dim)
        proj = model.get_decoder().layers[layer].self_attn.o_proj
        assert o_proj(model, layer) is proj
        torch.testing.assert_close(heads[layer] @ proj.weight.T, base[layer], atol=1e-5, rtol=0)
    directions = random_directions([(2, 1)], head_dim)
    with iti_applied(model, directions, 2.0), record_head_inputs(model, [2]) as shifted:
        model(**enc)
    diff = (shifted[2] - heads[2]).view(*enc.input_ids.shape, n_heads, head_dim)
    shift = 2.0 * directions.sigmas[0] * directions.directions[0]  # (head_dim,)
    torch.testing.assert_close(diff[:, :, 1], shift.expand_as(diff[:, :, 1]), atol=1e-6, rtol=0)
    assert torch.equal(diff[:, :, 0], torch.zeros_like(diff[:, :, 0]))
    assert active_hooks(model) == 0


# ---------------------------------------------------------------- generation


@contextmanager
def oracle_iti(model: PreTrainedModel, directions: ItiDirections, alpha: float, starts: Tensor) -> Iterator[None]:
    """o_proj pre-hooks adding the heads' shifts at positions >= starts[row]; valid without a KV cache only."""
    n_heads, head_dim = heads_of(model)

    def hook_for(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()  # (batch, seq, n_heads * head_dim)
            batch, seq = x.shape[:2]
            here = torch.arange(seq)[None, :] >= starts[:, None]  # (batch, seq)
            per_head = x.view(batch, seq, n_heads, head_dim)
            for i in range(len(directions.layers)):
                if int(directions.layers[i]) == layer:
                    shift = alpha * directions.sigmas[i] * directions.directions[i]  # (head_dim,)
                    per_head[:, :, int(directions.heads[i])] += here[..., None] * shift
            return (x, *args[1:])

        return hook

    blocks = model.get_decoder().layers
    handles = [blocks[layer].self_attn.o_proj.register_forward_pre_hook(hook_for(layer))
               for layer in set(directions.layers.tolist())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


Hook = Callable[[PreTrainedModel, ItiDirections, float, Tensor], AbstractContextManager[Any]]


@torch.no_grad()
def recompute_greedy(model: PreTrainedModel, enc: BatchEncoding, hook: Hook, directions: ItiDirections,
                     alpha: float) -> Tensor:
    """Greedy new tokens (batch, new): every step a full forward without cache, the hook from the prompt's end."""
    ids, mask = enc.input_ids, enc.attention_mask  # (batch, width)
    batch, width = ids.shape
    starts = torch.full((batch,), width - 1)  # the last prompt token and every generated one
    finished = torch.zeros(batch, dtype=torch.bool)
    new: list[Tensor] = []
    for _ in range(MAX_NEW):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        with hook(model, directions, alpha, starts):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        token = torch.where(finished, PAD_ID, logits[:, -1].argmax(dim=-1))  # (batch,)
        finished |= token == EOS_ID
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        if bool(finished.all()):
            break
    return torch.stack(new, dim=1)


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_cached_batched_generation_equals_a_no_cache_recompute(arch: str) -> None:
    model = tiny(arch)
    n_heads, head_dim = heads_of(model)
    enc = encode(GEN_PROMPTS)
    batch, width = enc.input_ids.shape
    assert (enc.attention_mask[1] == 0).any()  # the second row is left padded
    directions, alpha = random_directions([(0, 0), (1, n_heads - 1), (2, 1)], head_dim, seed=3), 25.0
    starts = torch.full((batch,), width - 1)
    with iti_applied(model, directions, alpha, start_positions=starts) as count:
        tokens = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, use_cache=True)[:, width:]
    by_iti = recompute_greedy(model, enc, iti_applied, directions, alpha)
    by_oracle = recompute_greedy(model, enc, oracle_iti, directions, alpha)
    assert torch.equal(tokens, by_iti) and torch.equal(tokens, by_oracle), (tokens, by_iti, by_oracle)
    assert count.total == batch * tokens.shape[1] and count.calls == tokens.shape[1]
    check_steered(count, batch * tokens.shape[1], f"generation of {batch} answers")

    with iti_applied(model, directions, 0.0, start_positions=starts) as zero:
        unsteered = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, use_cache=True)[:, width:]
    plain = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, use_cache=True)[:, width:]
    assert torch.equal(unsteered, plain) and zero.total == batch * unsteered.shape[1]
    assert not torch.equal(tokens, unsteered)  # the steering shows
    assert active_hooks(model) == 0


# ---------------------------------------------------------------- probes and selection


def synthetic(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 3 layers, 4 heads, 8) noise; head 2 of recorded layer 1 separates the classes along u with a margin."""
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], n // 2)
    acts = rng.normal(size=(n, 3, 4, 8)).astype(np.float32)
    u = rng.normal(size=8)
    u /= np.linalg.norm(u)
    noise = acts[:, 1, 2] - np.outer(acts[:, 1, 2] @ u, u)  # noise orthogonal to u
    along = np.where(labels == 1, 1.0, -1.0) * (2.0 + rng.uniform(size=n))  # |projection| >= 2
    acts[:, 1, 2] = noise + np.outer(along, u)
    return acts, labels, u


@pytest.mark.oracle
def test_the_separating_head_comes_first_with_its_mass_mean_direction_and_sigma() -> None:
    acts, labels, u = synthetic()
    probes = HeadProbes.fit(acts, labels, layers=[4, 7, 9])
    assert probes.layers == (4, 7, 9) and probes.accuracies.shape == (3, 4)
    assert probes.accuracies[1, 2] == 1.0 and probes.accuracies.flatten().topk(2).values[1] < 1.0
    assert probes.top(1) == [(7, 2)]
    result = select_heads(torch.from_numpy(acts), torch.from_numpy(labels), 5, layers=[4, 7, 9])
    assert (int(result.layers[0]), int(result.heads[0]), float(result.accuracies[0])) == (7, 2, 1.0)
    accuracy = {(layer, head): float(probes.accuracies[i, head]) for i, layer in enumerate((4, 7, 9))
                for head in range(4)}
    order = sorted(accuracy, key=lambda pair: (-accuracy[pair], pair))[:5]
    assert list(zip(result.layers.tolist(), result.heads.tolist(), strict=True)) == order
    for i, (layer, head) in enumerate(order):
        x = acts[:, (4, 7, 9).index(layer), head].astype(np.float64)  # (n, head_dim)
        diff = x[labels == 1].mean(axis=0) - x[labels == 0].mean(axis=0)
        direction = diff / np.linalg.norm(diff)
        np.testing.assert_allclose(result.directions[i].numpy(), direction, atol=1e-6)
        np.testing.assert_allclose(float(result.sigmas[i]), np.std(x @ direction), rtol=1e-6)
        assert result.accuracies[i] == accuracy[(layer, head)]
    assert float(result.directions[0].double() @ torch.from_numpy(u)) > 0.9
    again = select_heads(acts, labels.tolist(), 5, layers=[4, 7, 9])
    assert all(torch.equal(getattr(again, f), getattr(result, f)) for f in ("layers", "heads", "directions"))


def test_ties_are_broken_by_layer_then_head() -> None:
    acts, labels, _ = synthetic(n=20)
    acts[:] = acts[:, 1:2, 2:3]  # every head a copy of the separating one: all accuracies 1.0
    chosen = select_heads(acts, labels, 6)
    assert chosen.accuracies.tolist() == [1.0] * 6
    assert list(zip(chosen.layers.tolist(), chosen.heads.tolist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]


def test_save_load_round_trip(tmp_path: Any) -> None:
    acts, labels, _ = synthetic(n=20)
    directions = select_heads(acts, labels, 3)
    path = tmp_path / "iti.safetensors"
    directions.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"layers", "heads", "directions", "sigmas", "accuracies"}
    loaded = ItiDirections.load(path)
    for name in ("layers", "heads", "directions", "sigmas", "accuracies"):
        assert torch.equal(getattr(loaded, name), getattr(directions, name)), name
    assert loaded.layers.dtype == torch.int64 and loaded.directions.dtype == torch.float32


# ---------------------------------------------------------------- validation


def valid_fields() -> dict[str, Tensor]:
    return dict(layers=torch.tensor([0, 1]), heads=torch.tensor([1, 1]), directions=torch.ones(2, 16),
                sigmas=torch.ones(2), accuracies=torch.ones(2))


@pytest.mark.parametrize(("change", "message"), [
    (dict(k=0), r"k=0 must be an int number of heads in \[1, 12\]"),
    (dict(k=13), r"k=13 must be an int number of heads in \[1, 12\]"),
    (dict(labels=np.ones(20)), r"labels hold 0 false and 20 true examples"),
    (dict(labels=np.tile([0, 1], 10)[:19]), r"labels are \(19,\) .* must be \(20,\) zeros and ones"),
    (dict(labels=np.tile([0, 2], 10)), r"labels are \(20,\) with values \[0, 2\]"),
    (dict(activations=np.zeros((20, 3, 4))), r"activations are \(20, 3, 4\) .* must be float \(n_examples"),
    (dict(activations=np.zeros((20, 3, 4, 8), dtype=np.int64)), r"activations are .* torch.int64"),
    (dict(layers=[1, 2]), r"layers=\[1, 2\] names 2 layers but activations record 3"),
    (dict(val_fraction=0.0), r"val_fraction=0.0 of 20 examples holds out 0"),
])
def test_bad_probe_inputs_name_the_value(change: dict[str, Any], message: str) -> None:
    acts, labels, _ = synthetic(n=20)
    kwargs: dict[str, Any] = dict(activations=acts, labels=labels, k=2, layers=None, val_fraction=0.2) | change
    with pytest.raises(ValueError, match=message):
        select_heads(kwargs.pop("activations"), kwargs.pop("labels"), kwargs.pop("k"), **kwargs)


@pytest.mark.parametrize(("change", "message"), [
    (dict(directions=torch.ones(3, 16)), r"ItiDirections.directions is \(3, 16\); it must be a float tensor"),
    (dict(sigmas=torch.ones(2, 1)), r"ItiDirections.sigmas is \(2, 1\)"),
    (dict(layers=torch.tensor([0.0, 1.0])), r"ItiDirections.layers is \(2,\); it must be an int tensor"),
    (dict(layers=torch.tensor([], dtype=torch.long)), r"K = len\(layers\) >= 1"),
    (dict(layers=torch.tensor([1, 1])), r"pairs \[\(1, 1\), \(1, 1\)\] must be non-negative and distinct"),
    (dict(sigmas=torch.tensor([1.0, math.nan])), r"finite: False"),
])
def test_bad_directions_name_the_field(change: dict[str, Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ItiDirections(**(valid_fields() | change))


def test_bad_iti_arguments_name_the_value(tmp_path: Any) -> None:
    model, good = tiny("llama"), ItiDirections(**valid_fields())
    bad = [
        (dict(alpha=math.nan), r"alpha=nan must be a finite float"),
        (dict(alpha=True), r"alpha=True must be a finite float"),
        (dict(directions="x"), r"directions is a str; pass ItiDirections"),
        (dict(directions=ItiDirections(**valid_fields() | dict(directions=torch.ones(2, 8)))),
         r"head_dim 8, but this model has 2 heads of 16"),
        (dict(directions=ItiDirections(**valid_fields() | dict(heads=torch.tensor([1, 2])))),
         r"heads \[1, 2\] of head_dim 16, but this model has 2 heads"),
        (dict(directions=ItiDirections(**valid_fields() | dict(layers=torch.tensor([0, 3])))),
         r"layer=3 must be in \[0, 3\)"),
        (dict(start_positions=torch.zeros(3)), r"start_positions=.* must be a 1-D integer tensor"),
    ]
    for change, message in bad:
        kwargs: dict[str, Any] = dict(directions=good, alpha=1.0, start_positions=None) | change
        with pytest.raises(ValueError, match=message), iti_applied(model, **kwargs):
            pass
    enc = encode(PROMPTS)
    with (pytest.raises(ValueError, match=r"start_positions has 1 rows but the layer sees batch=3"),
          iti_applied(model, good, 1.0, start_positions=torch.zeros(1, dtype=torch.long))):
        model(**enc)
    torch.save({"x": 1}, tmp_path / "pickle.safetensors")  # not a safetensors file at all
    with pytest.raises(SafetensorError):  # never unpickled
        ItiDirections.load(tmp_path / "pickle.safetensors")
    save_file({"layers": torch.tensor([0])}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensors \['heads', 'directions', 'sigmas', 'accuracies'\]"):
        ItiDirections.load(tmp_path / "partial.safetensors")
    assert active_hooks(model) == 0


def test_models_without_heads_or_o_proj_are_named() -> None:
    with pytest.raises(ValueError, match=r"Linear's \(text\) config has num_attention_heads=None"):
        attention_heads(nn.Linear(2, 2))

    class Block(nn.Module):
        pass

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = tiny("llama").config
            self.layers = nn.ModuleList([Block()])

    with pytest.raises(ValueError, match=r"decoder layer 0 \(Block\) has no self_attn.o_proj module"):
        o_proj(Bare(), 0)


# ---------------------------------------------------------------- hygiene


@pytest.mark.parametrize("arch", ["llama", "gemma3_wide"])
def test_hooks_leave_on_exceptions_and_weights_stay_untouched(arch: str) -> None:
    model = tiny(arch)
    _, head_dim = heads_of(model)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    directions = random_directions([(0, 1), (2, 0), (2, 1)], head_dim)
    starts = torch.zeros(3, dtype=torch.long)
    with (pytest.raises(RuntimeError, match="boom"), iti_applied(model, directions, 5.0, starts),
          record_head_inputs(model)):
        assert active_hooks(model) == 2 * 2 + 3  # per steered layer: cache offset + shift; 3 recorders
        model(**encode(PROMPTS))
        raise RuntimeError("boom")
    assert active_hooks(model) == 0
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.oracle
def test_probes_hold_out_whole_questions_so_a_repeated_answer_cannot_leak() -> None:
    """Answers without any shared true/false structure, each question's pair seen twice (as
    ``pairs_per_question=2`` repeats answers): split by example, the held-out copies are memorised; split by
    question, the probe is at chance, as it should be."""
    rng = np.random.default_rng(0)
    n_questions, dim = 60, 96
    answers = rng.normal(size=(n_questions, 2, dim)).astype(np.float32)  # (question, true/false, dim)
    acts = np.concatenate([answers[:, 0], answers[:, 1]] * 2)[:, None, None, :]  # (4 * n_questions, 1, 1, dim)
    labels = np.array(([1] * n_questions + [0] * n_questions) * 2)
    questions = [f"q{i}" for i in range(n_questions)] * 4
    by_example = float(HeadProbes.fit(acts, labels, seed=1).accuracies[0, 0])
    by_question = float(HeadProbes.fit(acts, labels, seed=1, groups=questions).accuracies[0, 0])
    assert by_example > 0.8 and 0.25 < by_question < 0.75, (by_example, by_question)
    with pytest.raises(ValueError, match="groups has 3 entries for 240 examples"):
        HeadProbes.fit(acts, labels, groups=["a", "b", "c"])
