"""Judges against human truthfulness labels: agreement, invalid rate and time, on the same items.

Items are model answers to TruthfulQA questions with the human truth labels that trained the
paper's GPT-judge (``finetune_truth.jsonl``: ``Q: ...\\nA: ...\\nTrue:`` -> " yes"/" no"), joined to the
question's references from ``TruthfulQA.csv``. The sample is seeded and balanced (half yes, half
no, at most one answer per question), so an always-yes judge scores 50%. Answers that are verbatim
reference answers (about 45% of a plain sample) are left out by default: a similarity judge scores
those trivially (BLEU 100 against the matching reference), which says nothing about judging
generated answers.

Each judge's verdict is its truthfulness field (``llm_truthful``, ``llm_logprob_truthful``, and for
the similarity judges their ``acc``: closer to a correct than to an incorrect reference). Reported
per judge: accuracy and Cohen's kappa against the labels over the items it judged validly, its
invalid rate, the share it called truthful, the ROC AUC of its score where it has one (P(yes),
the similarity diff), and the wall time of judging all items. ``llm`` and ``llm_logprob`` share one
loaded judge LM and run on the same items in one process, so their times compare directly.

Run: ``python -m benchmarks.judges`` (options: ``--help``); writes ``benchmarks/results/judges.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from benchmarks import DATA_DIR, RESULTS_DIR, write_report
from core.config import JudgeConfig
from core.data import load_questions
from core.models import load_model
from evaluation.judges import JudgeItem, truthfulqa_references
from evaluation.llm_judge import LLMJudge
from evaluation.logprob_judge import LogprobJudge
from evaluation.metrics import BleuJudge, RougeJudge
from evaluation.semantic_judge import SemanticJudge, minilm_encoder

RESULTS = RESULTS_DIR / "judges.json"
_PROMPT = re.compile(r"\AQ: (?P<question>.*)\nA: (?P<answer>.*)\nTrue:\Z", re.DOTALL)


@dataclass(frozen=True)
class Labelled:
    """A judge item with its human truthfulness label (1 = truthful)."""

    item: JudgeItem
    label: int


def is_reference(item: JudgeItem) -> bool:
    """Whether the answer is, up to a final period, one of the question's reference answers."""
    correct, incorrect = truthfulqa_references(item)
    answer = item.answer.strip()
    return (answer if answer.endswith(".") else f"{answer}.") in {*correct, *incorrect}


def load_labelled(data_dir: Path, n: int, seed: int, *, exclude_references: bool = True) -> list[Labelled]:
    """A seeded, label-balanced sample of ``n`` human-labelled answers, one per question at most.

    Args:
        data_dir: folder holding ``finetune_truth.jsonl`` and ``TruthfulQA.csv``.
        n: number of items (even).
        seed: sampling seed.
        exclude_references: leave out answers that are verbatim reference answers.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n={n} must be an even number >= 2 (half truthful, half not)")
    questions = {q.question.strip(): q for q in load_questions(data_dir / "TruthfulQA.csv")}
    by_label: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
    with open(data_dir / "finetune_truth.jsonl") as f:
        for line in f:
            record = json.loads(line)
            match = _PROMPT.match(record["prompt"])
            if match and match["question"].strip() in questions:
                by_label[int(record["completion"].strip() == "yes")].append((match["question"].strip(), match["answer"]))
    rng = random.Random(seed)
    for pool in by_label.values():
        rng.shuffle(pool)
    used: set[str] = set()
    chosen: list[Labelled] = []
    for label in (1, 0):
        picked = 0
        for question, answer in by_label[label]:
            if picked == n // 2:
                break
            item = JudgeItem.from_question(questions[question], answer.strip())
            if question in used or (exclude_references and is_reference(item)):
                continue
            used.add(question)
            chosen.append(Labelled(item, label))
            picked += 1
        if picked < n // 2:
            raise ValueError(f"n={n}: only {picked} usable answers labelled {label}; choose a smaller n")
    rng.shuffle(chosen)
    return chosen


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a truthful item scores above an untruthful one (ties count half).

    Args:
        scores: continuous judge scores.
        labels: human labels, 1 = truthful.
    """
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(x)  # (n,)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def agreement(
    rows: Sequence[dict[str, Any]], labels: Sequence[int], verdict: str, score: str | None
) -> dict[str, float]:
    """Accuracy, kappa, invalid rate, truthful share and AUC of one judge's rows against the labels.

    Args:
        rows: the judge's rows, aligned with ``labels``.
        labels: human labels, 1 = truthful.
        verdict: the row field holding the judge's 1/0 verdict (``None`` = invalid).
        score: the row field holding a continuous score for the AUC, if any.
    """
    judged = [(r, y) for r, y in zip(rows, labels, strict=True) if r[verdict] is not None]
    out = {"n": float(len(rows)), "invalid_rate": 1.0 - len(judged) / len(rows)}
    if not judged:
        return {**out, "accuracy": math.nan, "kappa": math.nan, "truthful_rate": math.nan, "auc": math.nan}
    pred = np.array([float(r[verdict]) for r, _ in judged])  # (n_judged,)
    gold = np.array([float(y) for _, y in judged])  # (n_judged,)
    accuracy = float(np.mean(pred == gold))
    chance = float(pred.mean() * gold.mean() + (1 - pred.mean()) * (1 - gold.mean()))
    kappa = (accuracy - chance) / (1 - chance) if chance < 1 else math.nan
    auc = roc_auc([float(r[score]) for r, _ in judged], [y for _, y in judged]) if score else math.nan
    return {**out, "accuracy": accuracy, "kappa": kappa, "truthful_rate": float(pred.mean()), "auc": auc}


def timed(score: Callable[[list[JudgeItem]], list[dict[str, Any]]], items: list[JudgeItem]) -> tuple[list[dict[str, Any]], float]:
    """The rows of ``score(items)`` and the wall seconds it took."""
    start = time.perf_counter()
    rows = score(items)
    return rows, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Judge the sample with every judge and measure agreement with the human labels.

    Args:
        args: the parsed command line (see ``main``).
    """
    torch.manual_seed(0)
    sample = load_labelled(Path(args.data_dir), args.n, args.seed, exclude_references=not args.keep_references)
    items, labels = [s.item for s in sample], [s.label for s in sample]
    judge_cfg = JudgeConfig(model=args.judge_model, batch_size=args.batch_size)
    loaded = load_model(args.judge_model, dtype=args.dtype, device=args.device, second_device=True)
    llm = LLMJudge(loaded, max_new_tokens=judge_cfg.max_new_tokens,
                   retry_max_new_tokens=judge_cfg.retry_max_new_tokens, batch_size=judge_cfg.batch_size)
    judges: list[tuple[str, Callable[[list[JudgeItem]], list[dict[str, Any]]], str, str | None]] = [
        ("llm_logprob", LogprobJudge(loaded, batch_size=args.batch_size).score, "llm_logprob_truthful",
         "llm_logprob_p_true"),
        ("llm_logprob (no references)", LogprobJudge(loaded, batch_size=args.batch_size, references=False).score,
         "llm_logprob_truthful", "llm_logprob_p_true"),
        ("llm", llm.score, "llm_truthful", None),
        ("semantic", SemanticJudge(minilm_encoder(str(loaded.device))).score, "semantic_acc", "semantic_diff"),
        ("bleu", BleuJudge().score, "bleu_acc", "bleu_diff"),
        ("rouge (rougeL)", RougeJudge().score, "rougeL_acc", "rougeL_diff"),
    ]
    judges[0][1](items[:1])  # warm-up (first-call allocations), so the LM judges' timings compare fairly
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    per_item: list[dict[str, Any]] = [{"qid": i.qid, "label": y} for i, y in zip(items, labels, strict=True)]
    for name, score, verdict, score_field in judges:
        rows, seconds = timed(score, items)
        results[name] = {**agreement(rows, labels, verdict, score_field), "seconds": seconds,
                         "items_per_second": len(items) / seconds}
        for record, row in zip(per_item, rows, strict=True):
            record[name] = {k: row[k] for k in (verdict, score_field) if k}
        if name == "llm":
            extra["llm_retried"] = sum(bool(r["llm_retried"]) for r in rows)
            errors: dict[str, int] = {}
            for r in rows:
                if not r["llm_valid"]:
                    kind = r["llm_error"].split(":")[0].split("=")[0]
                    errors[kind] = errors.get(kind, 0) + 1
            extra["llm_invalid_reasons"] = errors
            extra["llm_informative_rate"] = float(np.mean([r["llm_informative"] for r in rows if r["llm_valid"]])) \
                if any(r["llm_valid"] for r in rows) else math.nan
    return {
        "command": " ".join(["python -m benchmarks.judges", *sys.argv[1:]]),
        "judge_model": args.judge_model,
        "dtype": args.dtype,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "n_items": len(items),
        "n_truthful_labels": int(sum(labels)),
        "seed": args.seed,
        "verbatim_references_excluded": not args.keep_references,
        "batch_size": args.batch_size,
        "max_new_tokens": judge_cfg.max_new_tokens,
        "retry_max_new_tokens": judge_cfg.retry_max_new_tokens,
        "judges": results,
        "llm_details": extra,
        "items": per_item,
    }


def table(report: dict[str, Any]) -> str:
    """The report's judges as a fixed-width text table.

    Args:
        report: the output of ``run``.
    """
    head = f"{'judge':<30}{'acc':>7}{'kappa':>8}{'auc':>7}{'invalid':>9}{'truthful':>10}{'seconds':>9}{'items/s':>9}"
    lines = [head, "-" * len(head)]
    for name, r in report["judges"].items():
        lines.append(f"{name:<30}{r['accuracy']:>7.3f}{r['kappa']:>8.3f}{r['auc']:>7.3f}{r['invalid_rate']:>9.3f}"
                     f"{r['truthful_rate']:>10.3f}{r['seconds']:>9.1f}{r['items_per_second']:>9.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run the benchmark, write the JSON report and print the table.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DATA_DIR.resolve()), help="folder with finetune_truth.jsonl and TruthfulQA.csv")
    parser.add_argument("--n", type=int, default=64, help="labelled items (even; half truthful)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-references", action="store_true",
                        help="keep answers that are verbatim reference answers (similarity judges score them trivially)")
    parser.add_argument("--judge-model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
