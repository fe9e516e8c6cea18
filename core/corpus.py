"""The neutral English corpus: WikiText-2 test passages unrelated to TruthfulQA.

Steering should leave a model's next-token distributions on such text nearly unchanged; the
side-effect metrics (``kl_neutral``, ``ce_neutral_delta``) measure how far it moves them. The corpus
ships with the project (``corpora/neutral/``, built by ``corpora/neutral/build.py``; its README names
the source and the licence, CC BY-SA 3.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError

NEUTRAL_CORPUS = Path(__file__).resolve().parents[1] / "corpora" / "neutral" / "wikitext2_test.jsonl"


@dataclass(frozen=True)
class Passage:
    """One paragraph of a Wikipedia article.

    Args:
        id: Its id, ``wt2-test-0001`` and on, in source order.
        title: The article's title.
        text: The passage, plain English of 40 to 120 words.
    """

    id: str
    title: str
    text: str


def load_passages(path: str | Path = NEUTRAL_CORPUS, n: int = 0) -> list[Passage]:
    """Read the first ``n`` passages of a jsonl corpus, in file order.

    Args:
        path: A jsonl file, one ``{"id", "title", "text"}`` object a line (empty lines are skipped).
        n: How many passages to return; 0 returns them all.

    Returns:
        The passages.

    Raises:
        ConfigError: The file is missing, a line is not a JSON object with a string ``text``,
            ``n`` is negative or larger than the file holds.
    """
    if n < 0:
        raise ConfigError(f"n={n} must be >= 0 (0 loads every passage)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"neutral corpus {path} not found; pass the path of a jsonl file "
                          f"(the shipped one is {NEUTRAL_CORPUS}, built by corpora/neutral/build.py)")
    passages: list[Passage] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {lineno} is not valid JSON ({err.msg}); "
                                  "write one JSON object a line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"{path} line {lineno} lacks a string 'text'; "
                                  'write {"id": ..., "title": ..., "text": ...}')
            passages.append(Passage(id=str(row.get("id", f"line-{lineno}")), title=str(row.get("title", "")),
                                    text=row["text"]))
            if len(passages) == n:
                return passages
    if n > len(passages):
        raise ConfigError(f"n={n} but {path} holds only {len(passages)} passages; use n <= {len(passages)} "
                          "(or 0 for all)")
    return passages
