"""Prompt format and tokenisation, shared by extraction, training, generation and the judges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

PromptFormat = Literal["chat", "qa"]


def format_prompt(question: str, tokenizer: Any, fmt: PromptFormat) -> str:
    """The text a model sees before its answer.

    ``chat``: the tokenizer's own chat template with the question as the user turn and the
    generation prompt appended, so instruction-tuned models answer in the role they were
    trained for. ``qa``: TruthfulQA's plain ``Q: ...\\nA:`` form, for base models that have no
    template. Answers follow the prompt directly (``answer_text`` adds the space ``qa`` needs).

    Args:
        question: the question text.
        tokenizer: the model's tokenizer (its chat template is used for ``chat``).
        fmt: ``chat`` or ``qa``.
    """
    if fmt == "chat":
        messages = [{"role": "user", "content": question}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"Q: {question}\nA:"


def answer_text(answer: str, fmt: PromptFormat) -> str:
    return answer if fmt == "chat" else f" {answer}"


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids with exactly one BOS where the model uses one.

    Chat templates (Gemma's, SmolLM2's) already begin with the BOS text; adding special tokens
    again would double it, so they are added only when the text does not start with BOS.
    """
    bos = tokenizer.bos_token
    has_bos = bool(bos) and text.startswith(bos)
    ids: list[int] = tokenizer(text, add_special_tokens=not has_bos)["input_ids"]
    bos_id = tokenizer.bos_token_id
    while bos_id is not None and len(ids) > 1 and ids[0] == bos_id and ids[1] == bos_id:
        ids = ids[1:]
    return ids


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, both ``(batch, seq)``."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (batch, seq)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def shared_prefix(rows_ids: Sequence[Sequence[int]], keep: int = 2) -> int:
    """How many leading tokens every row shares (a chat template's system prompt, its turn markers), at most
    the shortest row's length - ``keep``: every row keeps ``keep`` tokens of its own."""
    if not rows_ids:
        return 0
    limit = min(len(ids) for ids in rows_ids) - keep
    first = rows_ids[0]
    shared = 0
    while shared < limit and all(ids[shared] == first[shared] for ids in rows_ids):
        shared += 1
    return shared


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation: ``input_ids`` and ``attention_mask``."""
    input_ids, attention_mask = left_pad([encode_text(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_answer_ids(tokenizer: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """The token ids of ``prompt`` and ``answer``, tokenised separately (the boundary is exact); when
    both exceed ``max_length`` tokens, the prompt loses tokens from the left (the answer is what is read)."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length - 1]
    return encode_text(tokenizer, prompt)[-(max_length - len(answer_ids)):], answer_ids


def encode_prompt_answers(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Prompt + answer sequences for teacher forcing, left-padded.

    Prompt and answer are tokenised separately and joined, so the boundary is exact. A sequence
    longer than ``max_length`` loses prompt tokens from the left (the answer is what is read).

    Returns:
        ``input_ids``, ``attention_mask``, ``answer_mask`` (1 on answer tokens), all ``(batch, seq)``,
        and ``prompt_end`` ``(batch,)``: the index of each row's last prompt token.
    """
    seqs, answer_lens = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids, answer_ids = prompt_answer_ids(tokenizer, prompt, answer, max_length)
        seqs.append(prompt_ids + answer_ids)
        answer_lens.append(len(answer_ids))
    input_ids, attention_mask = left_pad(seqs, tokenizer.pad_token_id)
    width = input_ids.shape[1]
    answer_mask = torch.zeros_like(attention_mask)  # (batch, seq)
    prompt_end = torch.empty(len(seqs), dtype=torch.long)  # (batch,)
    for row, n_answer in enumerate(answer_lens):
        answer_mask[row, width - n_answer:] = 1 if n_answer else 0
        prompt_end[row] = width - n_answer - 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
            "prompt_end": prompt_end}
