"""Answer log-probabilities: the LM head applied only where it predicts answer tokens (with Gemma's final
logit soft-capping), sums over the answer, steered scoring checked against the steered-token count, and the
branch losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from steering.hooks import check_steered
from steering.mlp import LOSS_BRANCHES, MLPSteering
from steering.sequences import Batch


def final_logit_softcap(model: nn.Module) -> float | None:
    """The final logit soft-capping ``model``'s own forward applies, or None.

    Gemma2ForCausalLM and Gemma3ForCausalLM apply ``config.final_logit_softcapping`` after the LM
    head when it is set. Gemma3ForConditionalGeneration (transformers 5.23) never applies it, even
    when its text config sets it; its top-level ``Gemma3Config`` has no such attribute, so reading
    the top-level config reproduces every class exactly. Llama has none.
    """
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap  # the order of operations of Gemma's forward


HEAD_CHUNK = 96  # answer-predicting states through the LM head at a time (SmolLM2's 49,152-token head: 19 MB a chunk's
# logits; chunks of 256, 48 MB, each landed on heap pages the last had not touched: MC peaked 2.40-2.90 GiB in
# smoke runs, 2.39 and 2.55 in the two full runs with 96)


def _predicting(answer_mask: Tensor) -> Tensor:
    """``(batch, seq - 1)`` bool: position t predicts token t + 1, an answer token."""
    return answer_mask[:, 1:].bool()


def answer_head_logprobs(model: nn.Module, hidden: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Log-probs of the answer tokens, applying the LM head only to the states that predict them.

    Args:
        model: the causal LM whose ``get_output_embeddings()`` is the LM head.
        hidden: ``(batch, seq, d_model)`` final hidden states (after the final norm).
        input_ids: ``(batch, seq)``.
        answer_mask: ``(batch, seq)`` 1 on answer tokens.

    Returns:
        ``(n_answer_tokens,)`` fp32 log-probs, in row-major order of ``answer_mask[:, 1:]``.
    """
    predicts = _predicting(answer_mask)  # (batch, seq - 1)
    states = hidden[:, :-1][predicts]  # (n_tokens, d_model)
    targets = input_ids[:, 1:][predicts]  # (n_tokens,)
    # HEAD_CHUNK tokens at a time: MC's 80 rows hold ~900 answer tokens, whose logits and log-softmax
    # would take ~180 MB each at once for SmolLM2's 49,152 tokens (more for Gemma's 256k)
    parts = [head_logits(model, states[at:at + HEAD_CHUNK]).float().log_softmax(dim=-1)  # (chunk, vocab)
             .gather(-1, targets[at:at + HEAD_CHUNK, None])[:, 0] for at in range(0, len(states), HEAD_CHUNK)]
    return torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)  # (n_tokens,)


def head_logits(model: nn.Module, states: Tensor) -> Tensor:
    """The logits ``model``'s own forward gives for final hidden ``states`` (``(..., d_model)``):
    its LM head, then the final logit soft-capping where its class applies one."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return _softcap(head(states), final_logit_softcap(model))  # (..., vocab)


def full_logits_logprobs(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Log-probs of the answer tokens from the full ``(batch, seq, vocab)`` logits of a forward.

    Returns:
        ``(n_answer_tokens,)`` fp32, in the order of ``answer_head_logprobs``.
    """
    logp = logits[:, :-1].float().log_softmax(dim=-1)  # (batch, seq - 1, vocab)
    token_logp = logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # (batch, seq - 1)
    return token_logp[_predicting(answer_mask)]  # (n_tokens,)


def sequence_logprobs(token_logp: Tensor, answer_mask: Tensor) -> Tensor:
    """``(batch,)`` sums of the answer-token log-probs of each row."""
    rows = _predicting(answer_mask).nonzero()[:, 0]  # (n_tokens,)
    zeros = torch.zeros(answer_mask.shape[0], dtype=token_logp.dtype, device=token_logp.device)  # (batch,)
    return zeros.index_add(0, rows, token_logp)  # (batch,)


def steered_answer_logprobs(
    model: nn.Module,
    module: MLPSteering,
    batch: Batch,
    *,
    positions: str = "from_prompt_end",
    answer_only_head: bool = True,
) -> Tensor:
    """Answer-token log-probs of ``batch`` with ``module`` steering ``model`` at its layer: a full
    forward with the steering hook (the straightforward path, and the fast path's reference).

    Args:
        model: the frozen causal LM.
        module: the steering module (its ``config.layer`` is the steering layer).
        batch: the batch, on the model's device.
        positions: ``from_prompt_end`` (steer from ``batch.prompt_end`` on) or ``all``.
        answer_only_head: apply the LM head only where answer tokens are predicted.

    Returns:
        ``(n_answer_tokens,)`` fp32 log-probs, in row-major order of ``batch.answer_mask[:, 1:]``.
    """
    if positions not in ("from_prompt_end", "all"):
        raise ValueError(f"positions={positions!r} is not one of from_prompt_end, all")
    start = batch.prompt_end if positions == "from_prompt_end" else None
    width = batch.input_ids.shape[1]
    # Independently of the hook: every position from the row's start to the end of the padded row.
    expected = int((width - batch.prompt_end).sum()) if start is not None else batch.input_ids.numel()
    with module.steering(model, start) as count:
        if answer_only_head:
            base: Any = model.base_model
            out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            token_logp = answer_head_logprobs(model, out.last_hidden_state, batch.input_ids, batch.answer_mask)
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            token_logp = full_logits_logprobs(logits, batch.input_ids, batch.answer_mask)
    check_steered(count, expected, f"teacher-forced forward of {batch.input_ids.shape[0]} sequences")
    return token_logp


def branch_loss(branch: str, token_logp: Tensor, answer_mask: Tensor, margin: float) -> tuple[Tensor, int]:
    """The loss of a batch as ``(sum, count)``, so that chunks of a split add up exactly.

    ``gen``: sum of the answer tokens' NLL, count = tokens. ``mc``: sum over examples of
    ``relu(margin - (logp(correct) - logp(incorrect)))`` (rows 2i and 2i + 1), count = examples.

    Args:
        branch: ``mc`` or ``gen``.
        token_logp: ``(n_answer_tokens,)`` from ``steered_answer_logprobs``.
        answer_mask: ``(batch, seq)`` of the same batch.
        margin: hinge margin (``mc``).
    """
    if branch == "gen":
        return -token_logp.sum(), token_logp.numel()
    if branch != "mc":
        raise ValueError(f"branch={branch!r} is not one of {', '.join(LOSS_BRANCHES)}")
    seq_logp = sequence_logprobs(token_logp, answer_mask)  # (batch,)
    gap = seq_logp[0::2] - seq_logp[1::2]  # (examples,)
    return torch.relu(margin - gap).sum(), gap.numel()


__all__ = ['answer_head_logprobs', 'branch_loss', 'final_logit_softcap', 'full_logits_logprobs', 'head_logits', 'sequence_logprobs', 'steered_answer_logprobs']
