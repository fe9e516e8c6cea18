"""The resumable store of generated answers, and what keys it.

``GenerationStore`` is a JSONL file with one record per answer, keyed by (question id, variant,
variant hash). The variant hash (``variant_hash``) covers everything that changes an answer: the
model, the decoding (the ``eval`` section's ``decoding_key_fields``) and the steering's key fields. Each finished batch is
appended in one write, flushed and fsynced, so an evaluation killed at any point regenerates nothing
that was written; a torn last line is ignored, and cut off by the next append. Its default place is
``$TRUTHSTEER_OUTPUTS/evaluate/<store hash>/generations.jsonl``, the store hash covering the model and
the decoding.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.config import EvalConfig, ModelSpec

OUTPUTS_ENV = "TRUTHSTEER_OUTPUTS"
DEFAULT_OUTPUTS = "outputs"
StoreKey = tuple[str, str, str]  # (question id, variant, variant hash)
STORE_FILE = "generations.jsonl"


DECODING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")


def decoding_key_fields(decoding: EvalConfig) -> dict[str, Any]:
    """What of the ``eval`` section changes an answer. Greedy answers do not depend on the seed,
    temperature or top_p; sampled ones also depend on the batching, because the seed is drawn per batch.

    Args:
        decoding: the ``eval`` section (``cfg.eval``).
    """
    if not decoding.do_sample:
        return {"max_new_tokens": decoding.max_new_tokens, "do_sample": False}
    return {name: getattr(decoding, name) for name in DECODING_FIELDS}


def model_key_fields(spec: ModelSpec, dtype: str) -> dict[str, Any]:
    """What identifies the model's answers: its weights, compute dtype and prompt format.

    Args:
        spec: the model's registry entry.
        dtype: the compute dtype name.
    """
    return {"model": spec.alias, "hf_id": spec.hf_id, "gguf": f"{spec.gguf_package}/{spec.gguf_file}",
            "dtype": dtype, "prompt_format": spec.prompt_format}


def _digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_hash(spec: ModelSpec, dtype: str, decoding: EvalConfig) -> str:
    """Hash of the model and decoding: names the default store folder, shared by every variant.

    Args:
        spec: the model's registry entry.
        dtype: the compute dtype name.
        decoding: the decoding settings.
    """
    return _digest({**model_key_fields(spec, dtype), **decoding_key_fields(decoding)})


def variant_hash(spec: ModelSpec, dtype: str, decoding: EvalConfig, steering_fields: Mapping[str, Any]) -> str:
    """Hash of everything that changes a variant's answers.

    Args:
        spec: the model (alias, weights source, prompt format).
        dtype: the compute dtype name.
        decoding: the decoding settings.
        steering_fields: ``Steering.key_fields()`` (or ``steering_key_fields``) of the variant.
    """
    return _digest({**model_key_fields(spec, dtype), **decoding_key_fields(decoding), **steering_fields})


def default_store_path(spec: ModelSpec, dtype: str, decoding: EvalConfig) -> Path:
    """``$TRUTHSTEER_OUTPUTS/evaluate/<store hash>/generations.jsonl`` (``outputs/`` by default).

    Args:
        spec: the model's registry entry.
        dtype: the compute dtype name.
        decoding: the decoding settings.
    """
    root = Path(os.environ.get(OUTPUTS_ENV) or DEFAULT_OUTPUTS)
    return root / "evaluate" / store_hash(spec, dtype, decoding) / STORE_FILE


class GenerationStore:
    """Answers on disk, one JSON record a line, appended batch by batch.

    Writers hold an exclusive lock while they append, flush and fsync, so a line without its
    newline is either another process's write in flight or what a killed process left. Reading
    ignores it; the next append (under the lock, so no write is in flight) cuts it off first. A
    torn line anywhere else means the file was edited or corrupted, and is an error naming it.

    Args:
        path: the JSONL file; created (with its folder) on the first append.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._records: dict[StoreKey, dict[str, Any]] = {}
        self.torn_tail = False  # whether the file ended in a line without newline when read
        self._load()

    @staticmethod
    def key(record: Mapping[str, Any]) -> StoreKey:
        return (str(record["qid"]), str(record["variant"]), str(record["variant_hash"]))

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        self.torn_tail = complete < len(data)
        for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = self.key(record)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{self.path}: line {number} is not a generation record ({err}): {line[:120]!r}; "
                    "delete that line (its answer is regenerated) or the file"
                ) from None
            self._records.setdefault(key, record)  # the first answer of a key wins

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: StoreKey) -> dict[str, Any] | None:
        return self._records.get(key)

    def records(self) -> list[dict[str, Any]]:
        """Every record, in the order first written."""
        return list(self._records.values())

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append ``records`` in one write, then flush and fsync, under an exclusive file lock; a torn
        last line left by a killed writer is cut off first.

        Args:
            records: dicts with at least ``qid``, ``variant`` and ``variant_hash``.
        """
        if not records:
            return
        data = "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                existing = f.read()
                if existing and not existing.endswith(b"\n"):
                    f.truncate(existing.rfind(b"\n") + 1)
                f.write(data)  # O_APPEND: at the (new) end of the file
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        for record in records:
            self._records.setdefault(self.key(record), dict(record))


__all__ = ['DEFAULT_OUTPUTS', 'DECODING_FIELDS', 'GenerationStore', 'OUTPUTS_ENV', 'STORE_FILE', 'decoding_key_fields', 'default_store_path', 'model_key_fields', 'store_hash', 'variant_hash']
