"""Teacher-forcing sequences for training: prompt + answer token ids per example and branch, and their padded batches."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from core.data import Question
from steering.mlp import LOSS_BRANCHES
from steering.prompts import PromptFormat, answer_text, encode_prompt_answers, format_prompt, left_pad

SEQUENCES_PER_EXAMPLE = {"mc": 2, "gen": 1}


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Teacher-forcing sequences of one split and branch: prompt + answer token ids, unpadded.

    Example ``i`` owns sequences ``i * per_example ... i * per_example + per_example - 1``: for
    ``mc`` the correct then the incorrect answer, for ``gen`` the best answer.

    Args:
        token_ids: one tuple of token ids per sequence, prompt then answer.
        n_answer: the number of answer tokens at the end of each sequence (>= 1).
        per_example: sequences per example: 2 for ``mc``, 1 for ``gen``.
    """

    token_ids: tuple[tuple[int, ...], ...]
    n_answer: tuple[int, ...]
    per_example: int

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.n_answer) or len(self.token_ids) % self.per_example:
            raise ValueError(
                f"{len(self.token_ids)} sequences and {len(self.n_answer)} answer lengths must match and be a "
                f"multiple of per_example={self.per_example}"
            )
        bad = [i for i, (ids, n) in enumerate(zip(self.token_ids, self.n_answer, strict=True)) if not 1 <= n < len(ids)]
        if bad:
            raise ValueError(f"sequences {bad[:5]} need at least one prompt token and one answer token")

    @property
    def n_examples(self) -> int:
        return len(self.token_ids) // self.per_example

    def sequence_indices(self, examples: Sequence[int]) -> list[int]:
        """The sequence indices of ``examples``, example by example."""
        return [e * self.per_example + j for e in examples for j in range(self.per_example)]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded sequences, as ``steering.prompts.encode_prompt_answers`` lays them out.

    Args:
        input_ids: ``(batch, seq)`` token ids.
        attention_mask: ``(batch, seq)`` 1 on real tokens.
        answer_mask: ``(batch, seq)`` 1 on answer tokens (the last ones of each row).
        prompt_end: ``(batch,)`` index of each row's last prompt token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    prompt_end: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


def pick_incorrect(question: Question, seed: int) -> str:
    """The incorrect answer the ``mc`` branch contrasts with the best answer: a choice seeded by
    ``seed`` and the question id, so it does not depend on which other questions share the split."""
    return random.Random(f"{seed}:{question.id}").choice(question.incorrect_answers)


def encode_examples(
    questions: Sequence[Question],
    tokenizer: Any,
    prompt_format: PromptFormat,
    branch: str,
    *,
    max_length: int,
    seed: int = 0,
) -> Sequences:
    """Tokenise the teacher-forcing sequences of ``branch`` for ``questions``.

    Args:
        questions: the split's questions.
        tokenizer: the model's tokenizer.
        prompt_format: ``chat`` or ``qa`` (``LoadedModel.prompt_format``).
        branch: ``mc`` (best answer, then one incorrect answer per question) or ``gen`` (best answer).
        max_length: longest sequence; longer ones lose prompt tokens from the left.
        seed: seeds the choice of the incorrect answer (``pick_incorrect``).
    """
    if branch not in LOSS_BRANCHES:
        raise ValueError(f"branch={branch!r} is not one of {', '.join(LOSS_BRANCHES)}")
    if not questions:
        return Sequences((), (), SEQUENCES_PER_EXAMPLE[branch])
    prompts: list[str] = []
    answers: list[str] = []
    for q in questions:
        prompt = format_prompt(q.question, tokenizer, prompt_format)
        chosen = [q.best_answer] if branch == "gen" else [q.best_answer, pick_incorrect(q, seed)]
        prompts += [prompt] * len(chosen)
        answers += [answer_text(a, prompt_format) for a in chosen]
    enc = encode_prompt_answers(tokenizer, prompts, answers, max_length)
    real = enc["attention_mask"].bool()  # (n_seq, seq)
    token_ids = tuple(tuple(enc["input_ids"][row][real[row]].tolist()) for row in range(len(prompts)))
    n_answer = tuple(int(n) for n in enc["answer_mask"].sum(dim=1))  # (n_seq,)
    return Sequences(token_ids, n_answer, SEQUENCES_PER_EXAMPLE[branch])


def make_batch(seqs: Sequences, indices: Sequence[int], pad_id: int) -> Batch:
    """Left-pad the sequences ``indices`` of ``seqs`` into a Batch (on the CPU).

    Args:
        seqs: the split's sequences.
        indices: sequence indices (``seqs.sequence_indices(examples)``).
        pad_id: the tokenizer's pad token id.
    """
    input_ids, attention_mask = left_pad([seqs.token_ids[i] for i in indices], pad_id)  # (batch, seq)
    width = input_ids.shape[1]
    n_answer = torch.tensor([seqs.n_answer[i] for i in indices])  # (batch,)
    positions = torch.arange(width)  # (seq,)
    answer_mask = (positions[None, :] >= width - n_answer[:, None]).long()  # (batch, seq)
    prompt_end = width - n_answer - 1  # (batch,)
    return Batch(input_ids, attention_mask, answer_mask, prompt_end)


__all__ = ['Batch', 'SEQUENCES_PER_EXAMPLE', 'Sequences', 'encode_examples', 'make_batch', 'pick_incorrect']
