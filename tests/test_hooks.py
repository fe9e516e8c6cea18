"""steer / record_residuals / masked_mean against exact oracles on every tiny architecture.

Oracles: recorded activation == `output_hidden_states[layer + 1]` (the last one through the final
norm, as transformers ties `hidden_states[-1]` to the normed `last_hidden_state`); steered state ==
original + scale * vector with earlier layers untouched; scale 0 and `v - v` give the baseline;
batched left-padded generation == one prompt at a time.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerFast

from steering.hooks import active_hooks, masked_mean, record_residuals, steer
from steering.layers import d_model, n_layers
from tests.tiny_models import TINY_ARCHS, make_tiny

pytestmark = pytest.mark.oracle
PROMPTS = ["hello world", "hi", "truth is"]


@functools.cache
def tiny(arch: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return make_tiny(arch)


def batch(tokenizer: PreTrainedTokenizerFast) -> BatchEncoding:
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padded


def direction(model: PreTrainedModel, norm: float = 8.0, seed: int = 1) -> Tensor:
    """A random vector of about the residual norm of the tiny models, so that steering shows."""
    vector = torch.randn(d_model(model), generator=torch.Generator().manual_seed(seed))  # (d_model,)
    return vector / vector.norm() * norm


@torch.no_grad()
def residuals(model: PreTrainedModel, enc: BatchEncoding) -> tuple[dict[int, Tensor], Tensor]:
    with record_residuals(model) as acts:
        logits = model(**enc, output_hidden_states=True).logits  # (batch, seq, vocab)
    return dict(acts), logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_recorded_residuals_equal_output_hidden_states(arch: str) -> None:
    model, tokenizer = tiny(arch)
    with record_residuals(model) as acts:
        out = model(**batch(tokenizer), output_hidden_states=True)
    n = n_layers(model)
    assert sorted(acts) == list(range(n)) and len(out.hidden_states) == n + 1
    for layer in range(n - 1):
        assert torch.equal(acts[layer], out.hidden_states[layer + 1]), layer
    # transformers replaces hidden_states[-1] by last_hidden_state, which has the final norm applied.
    final_norm = model.get_decoder().norm
    assert not torch.allclose(acts[n - 1], out.hidden_states[n])
    assert torch.equal(final_norm(acts[n - 1]), out.hidden_states[n])


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_record_selected_layers_last_call_wins(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    with record_residuals(model, layers=[1]) as acts:
        model(**enc)
        model(input_ids=enc.input_ids[:1, -2:])
    assert list(acts) == [1] and acts[1].shape == (1, 2, d_model(model))
    assert not acts[1].requires_grad


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_scale_zero_zero_vector_and_zero_module_give_identical_logits(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    _, base = residuals(model, enc)
    v = direction(model)

    class Zero(nn.Module):
        def forward(self, resid: Tensor) -> Tensor:
            return torch.zeros_like(resid)

    cases: list[dict[str, Any]] = [
        dict(vector=v, scale=0.0),
        dict(vector=v - v, scale=3.0),
        dict(module=Zero(), scale=2.0),
    ]
    for kwargs in cases:
        with steer(model, 1, **kwargs):
            assert torch.equal(model(**enc).logits, base), kwargs


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layer", [0, 2])
@torch.no_grad()
def test_steered_residual_is_original_plus_scale_vector(arch: str, layer: int) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    base, base_logits = residuals(model, enc)
    v, scale = direction(model), -1.5
    with steer(model, layer, vector=v, scale=scale), record_residuals(model) as acts:
        out = model(**enc, output_hidden_states=True)
    for earlier in range(layer):
        assert torch.equal(acts[earlier], base[earlier])
    assert torch.equal(acts[layer], base[layer] + scale * v)
    # Steering hooks run before transformers' capture hooks (installed by `residuals`), so its
    # hidden states see the steered value too; the last one is after the final norm.
    final_norm = model.get_decoder().norm
    steered = acts[layer] if layer < n_layers(model) - 1 else final_norm(acts[layer])
    assert torch.equal(out.hidden_states[layer + 1], steered)
    assert not torch.allclose(out.logits, base_logits)
    assert active_hooks(model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_module_steering_adds_fp32_module_output(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    base, _ = residuals(model, enc)
    mlp = nn.Linear(d_model(model), d_model(model)).eval()
    with steer(model, 1, module=mlp, scale=0.5), record_residuals(model, [1]) as acts:
        model(**enc)
    assert torch.equal(acts[1], base[1] + 0.5 * mlp(base[1]))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_bf16_model_with_fp32_module_and_vector(arch: str) -> None:
    model = make_tiny(arch)[0].to(torch.bfloat16)
    enc = batch(tiny(arch)[1])
    base, base_logits = residuals(model, enc)
    mlp = nn.Linear(d_model(model), d_model(model)).eval()  # fp32, as trained
    with steer(model, 1, module=mlp, scale=2.0), record_residuals(model, [1]) as acts:
        logits = model(**enc).logits
    assert acts[1].dtype == torch.bfloat16
    assert torch.equal(acts[1], base[1] + (2.0 * mlp(base[1].float())).to(torch.bfloat16))
    assert torch.isfinite(logits).all() and not torch.equal(logits, base_logits)
    v = direction(model)  # fp32 vector on a bf16 model
    with steer(model, 1, vector=v), record_residuals(model, [1]) as acts:
        model(**enc)
    assert torch.equal(acts[1], base[1] + v.to(torch.bfloat16))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_start_positions_steer_only_from_start(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    base, _ = residuals(model, enc)
    v, starts = direction(model), torch.tensor([0, 5, enc.input_ids.shape[1] - 1])
    with steer(model, 1, vector=v, start_positions=starts), record_residuals(model, [1]) as acts:
        model(**enc)
    for row, start in enumerate(starts.tolist()):
        assert torch.equal(acts[1][row, :start], base[1][row, :start])
        assert torch.equal(acts[1][row, start:], base[1][row, start:] + v)


def generate_scores(
    model: PreTrainedModel, enc: BatchEncoding | dict, **kwargs: object
) -> tuple[Tensor, Tensor]:
    """Greedy new tokens (batch, new) and their logits (batch, new, vocab)."""
    out = model.generate(
        **enc, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs
    )
    prompt_len = enc["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_start_positions_in_generate_match_unbatched_and_prefix_oracle(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    prompt_len = enc.input_ids.shape[1]
    v = direction(model)
    # Steer from the last prompt token on: in the padded batch that is prompt_len - 1 for every row.
    with steer(model, 1, vector=v, start_positions=torch.full((len(PROMPTS),), prompt_len - 1)):
        tokens, scores = generate_scores(model, enc)
        tokens_no_cache, scores_no_cache = generate_scores(model, enc, use_cache=False)
    assert torch.equal(tokens, tokens_no_cache) and torch.allclose(scores, scores_no_cache, atol=1e-5)

    for row, prompt in enumerate(PROMPTS):
        single = tokenizer([prompt], return_tensors="pt")
        with steer(model, 1, vector=v, start_positions=torch.tensor([single.input_ids.shape[1] - 1])):
            single_tokens, single_scores = generate_scores(model, single)
        assert torch.equal(single_tokens[0], tokens[row]), prompt
        assert torch.allclose(single_scores[0], scores[row], atol=1e-5), prompt

    # Oracle: the unsteered model reads the prompt up to its end, then the vector is added at every position.
    # position_ids as generate builds them under left padding (a plain forward would use arange).
    mask = enc.attention_mask[:, :-1]  # (batch, prompt_len - 1)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (batch, prompt_len - 1)
    prefix = model(
        input_ids=enc.input_ids[:, :-1], attention_mask=mask, position_ids=position_ids, use_cache=True
    )
    with steer(model, 1, vector=v):
        oracle_tokens, oracle_scores = generate_scores(model, enc, past_key_values=prefix.past_key_values)
        _, everywhere_scores = generate_scores(model, enc)
    assert torch.equal(oracle_tokens, tokens) and torch.allclose(oracle_scores, scores, atol=1e-5)
    # Not vacuous: steering from the start or not at all gives logits 100x the tolerance away.
    _, base_scores = generate_scores(model, enc)
    assert (scores - base_scores).abs().max() > 1e-3 and (scores - everywhere_scores).abs().max() > 1e-3
    assert active_hooks(model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_no_hook_survives_the_block_even_when_it_raises(arch: str) -> None:
    model, tokenizer = tiny(arch)
    enc = batch(tokenizer)
    model(**enc, output_hidden_states=True)  # transformers' own capture hooks are installed now, not counted
    assert active_hooks(model) == 0
    starts = torch.zeros(3, dtype=torch.long)
    with (
        pytest.raises(RuntimeError, match="boom"),
        steer(model, 0, vector=direction(model), start_positions=starts),
        record_residuals(model),
    ):
        assert active_hooks(model) == 2 + n_layers(model)  # pre-hook + hook + one per recorded layer
        raise RuntimeError("boom")
    assert active_hooks(model) == 0
    with (
        pytest.raises(ValueError, match="start_positions has 1 rows but the layer sees batch=3"),
        steer(model, 0, vector=direction(model), start_positions=torch.zeros(1, dtype=torch.long)),
    ):
        model(**enc)  # the error is raised inside the hook
    assert active_hooks(model) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", True, None])
def test_bad_scale_names_the_value(bad: Any) -> None:
    model = tiny("llama")[0]
    with (
        pytest.raises(ValueError, match=re.escape(f"scale={bad!r} must be a finite float")),
        steer(model, 0, vector=direction(model), scale=bad),
    ):
        pass
    assert active_hooks(model) == 0


@pytest.mark.parametrize("bad", [-1, 3, True, 1.5])
def test_bad_layer_names_the_value(bad: Any) -> None:
    model = tiny("gemma3_mm")[0]
    with (
        pytest.raises(ValueError, match=re.escape(f"layer={bad!r} must be in [0, 3)")),
        steer(model, bad, vector=direction(model)),
    ):
        pass
    with pytest.raises(ValueError, match=re.escape(f"layer={bad!r}")), record_residuals(model, [0, bad]):
        pass
    assert active_hooks(model) == 0


def test_bad_vector_module_and_start_positions() -> None:
    model = tiny("gemma2")[0]
    v = direction(model)
    with (
        pytest.raises(
            ValueError, match=re.escape("shape (33,); it must be a float tensor of shape (d_model,) = (32,)")
        ),
        steer(model, 0, vector=torch.zeros(33)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="exactly one of vector= or module="),
        steer(model, 0, vector=v, module=nn.Identity()),
    ):
        pass
    with pytest.raises(ValueError, match="exactly one of vector= or module="), steer(model, 0):
        pass
    with (
        pytest.raises(ValueError, match="start_positions=.* must be a 1-D integer tensor"),
        steer(model, 0, vector=v, start_positions=torch.zeros(3)),
    ):
        pass
    assert active_hooks(model) == 0


def test_masked_mean_ignores_padding_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=gen)  # (batch, seq, d_model)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    mean = masked_mean(hidden, mask)
    expected = torch.stack([hidden[b, mask[b].bool()].mean(dim=0) for b in range(3)])  # (batch, d_model)
    assert mean.shape == (3, 8) and torch.allclose(mean, expected, atol=1e-6)
    garbage = hidden.masked_fill(~mask.bool()[..., None], math.nan)  # padding content must not matter
    assert torch.equal(masked_mean(garbage, mask), mean)
    half = masked_mean(hidden.to(torch.bfloat16), mask)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match=re.escape("mask rows [1] have no unmasked position")):
        masked_mean(hidden, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="must be \\(batch, seq\\)"):
        masked_mean(hidden, mask[:, 1:])
