"""What an answer is: the new tokens up to the end of the turn, decoded (``evaluation.generate`` makes them).

``stop_token_ids`` says which tokens end a turn for a model, and ``decode_answer`` cuts generated ids there
(and a ``Q:/A:`` answer before the model starts a next ``Q:``) into an ``Answer``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from steering.prompts import PromptFormat

# Tokens that end an assistant turn in the chat templates of the supported families (Gemma,
# SmolLM2/ChatML, Llama-3), whichever of them the tokenizer knows; its EOS always counts.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<eos>")
QA_NEXT_TURN = "\nQ:"  # a base model answering `Q: ...\nA:` goes on to invent the next question


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """Ids that end an answer: EOS, the generation config's EOS ids and known end-of-turn tokens.

    Args:
        tokenizer: the model's tokenizer.
        model: the model, for its ``generation_config.eos_token_id``.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list | tuple) else [configured]))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer.

    Args:
        text: the answer: new tokens up to the end of turn, decoded and stripped.
        raw: every new token decoded, special tokens included (for debugging prompts).
        n_new_tokens: tokens up to (not including) the end of turn.
        truncated: True when ``max_new_tokens`` ran out before the end of turn.
        steered_tokens: the answer's tokens (the end-of-turn token included) predicted from a
            steered state; ``generate_batch`` checks that the hook edited every position it should,
            so for a steered variant this is every one of them, 0 for baseline. Not compared.
    """

    text: str
    raw: str
    n_new_tokens: int
    truncated: bool
    steered_tokens: int = dataclasses.field(default=0, compare=False)


def decode_answer(tokenizer: Any, new_ids: Sequence[int], stop_ids: Sequence[int], fmt: PromptFormat) -> Answer:
    """Cut generated ids at the first stop id, decode, cut a ``Q:/A:`` answer before a next ``Q:``.

    Args:
        tokenizer: the model's tokenizer.
        new_ids: the generated token ids (padding after the end included).
        stop_ids: ``stop_token_ids`` of the model.
        fmt: the prompt format, ``chat`` or ``qa``.
    """
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    kept = list(new_ids[:end]) if end is not None else list(new_ids)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    truncated = end is None
    if fmt == "qa" and QA_NEXT_TURN in text:
        text, truncated = text.split(QA_NEXT_TURN, 1)[0], False
    raw = tokenizer.decode(list(new_ids), skip_special_tokens=False)
    return Answer(text=text.strip(), raw=raw, n_new_tokens=len(kept), truncated=truncated)


__all__ = ['END_OF_TURN_TOKENS', 'QA_NEXT_TURN', 'Answer', 'decode_answer', 'stop_token_ids']
