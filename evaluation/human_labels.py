"""TruthfulQA's human labels of model answers, and how a judge's verdicts agree with them.

``finetune_truth.jsonl`` and ``finetune_info.jsonl`` hold 22,434 answers each (by the models the
TruthfulQA authors evaluated), labelled true / not true and informative / not informative by people;
they trained the authors' GPT-judge. ``read_labels`` turns them into ``Labelled`` judge items;
``is_verbatim`` marks the answers that are one of the question's reference answers (a third of them),
on which similarity to the references is a shortcut; ``grouped_folds`` keeps each question's labels
in one fold, so that agreement is measured on questions a judge never saw.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.data import Question
from evaluation.judges import JudgeError, JudgeItem
from evaluation.statistics import binary_agreement, confusion_counts

LABEL_FILES = {"truth": "finetune_truth.jsonl", "info": "finetune_info.jsonl"}
LABEL_SUFFIX = {"truth": "True", "info": "Helpful"}
PROMPT = re.compile(r"^Q: (?P<question>.*?)\nA: (?P<answer>.*)\n(?P<suffix>\w+):$", re.DOTALL)


def normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def references(item: JudgeItem) -> tuple[list[str], list[str]]:
    """The correct references (the best answer among them) and the incorrect ones, stripped, once each."""
    correct = list(dict.fromkeys(a.strip() for a in (*item.correct_answers, item.best_answer) if a.strip()))
    incorrect = list(dict.fromkeys(a.strip() for a in item.incorrect_answers if a.strip()))
    return correct, incorrect


def is_verbatim(item: JudgeItem) -> bool:
    """Whether the answer is one of the question's reference answers, up to case and punctuation."""
    correct, incorrect = references(item)
    answer = normalised(item.answer)
    return any(normalised(r) == answer for r in (*correct, *incorrect))


# ---------------------------------------------------------------- human labels


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One human-labelled answer.

    Args:
        item: the answer with its question's references.
        label: 1 (the human said yes: true, or informative) or 0.
        category: the question's TruthfulQA category.
    """

    item: JudgeItem
    label: int
    category: str

    @property
    def verbatim(self) -> bool:
        return is_verbatim(self.item)


def read_labels(path: str | Path, questions: Sequence[Question], kind: str) -> list[Labelled]:
    """The human labels of ``path`` (``finetune_truth.jsonl`` or ``finetune_info.jsonl``) whose question
    is one of ``questions`` (matched by its text), in file order.

    Args:
        path: the JSONL file; each line ``{"prompt": "Q: ...\\nA: ...\\nTrue:", "completion": " yes"}``.
        questions: the TruthfulQA questions (all 817 to use every label).
        kind: ``truth`` or ``info`` (the prompt must end in ``True:`` or ``Helpful:``).

    Raises:
        JudgeError: for a missing file, a line that is not such a record, or a prompt of the other kind.
    """
    if kind not in LABEL_FILES:
        raise JudgeError(f"kind={kind!r} is not one of {', '.join(LABEL_FILES)}")
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"label file {path} does not exist; pass the folder holding {LABEL_FILES[kind]} "
                         "(../shared/data/truthfulqa here)")
    by_text = {q.question.strip(): q for q in questions}
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            match = PROMPT.match(record["prompt"])
            completion = record["completion"].strip()
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise JudgeError(f"{path}: line {number} is not a label record ({err}): {line[:100]!r}") from None
        if match is None or match["suffix"] != LABEL_SUFFIX[kind] or completion not in ("yes", "no"):
            raise JudgeError(f"{path}: line {number} is not a {kind} label (a prompt ending in "
                             f"'{LABEL_SUFFIX[kind]}:' and a completion ' yes' or ' no'): {line[:100]!r}")
        question = by_text.get(match["question"].strip())
        if question is None:
            continue
        out.append(Labelled(JudgeItem.from_question(question, match["answer"].strip()), int(completion == "yes"),
                            question.category))
    return out


def agreement(labels: Sequence[int], verdicts: Sequence[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy, Cohen's kappa and n of ``verdicts`` against human ``labels``.

    Args:
        labels: the human labels, 0/1.
        verdicts: the judge's verdicts, 0/1.
    """
    values = binary_agreement(confusion_counts(labels, verdicts).sum(axis=0))
    return {**{name: float(value) for name, value in values.items()}, "n": float(len(labels))}


def grouped_folds(labelled: Sequence[Labelled], n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Fold index of every row, the questions shuffled (seeded) and dealt into ``n_folds`` folds, so
    that all labels of a question share one fold."""
    qids = sorted({r.item.qid for r in labelled})
    order = np.random.default_rng(seed).permutation(len(qids))
    fold_of = {qids[j]: k % n_folds for k, j in enumerate(order)}
    folds = np.array([fold_of[r.item.qid] for r in labelled])
    return [np.flatnonzero(folds == k) for k in range(n_folds)]


__all__ = [
    "LABEL_FILES", "Labelled", "agreement", "grouped_folds", "is_verbatim", "normalised", "read_labels", "references",
]
