"""Judge designs compared on the same folds: held-out-question agreement with the human labels.

Every labelled answer whose question is in the CSV (22,408 truth and as many info labels) gets the
trained judge's features (``evaluation.judge_features.FEATURES``), computed once; each design is then
fitted and scored on the same 5 folds grouped by question (``grouped_folds``), so no question's
answers are seen in training and testing at once. Designs:

- ``rule``: ``cos_max_diff > 0`` (the semantic judge's accuracy rule on the same embeddings);
- ``logistic``: scikit-learn's logistic regression on the standardised features;
- ``mlp_64`` and ``mlp_128_64``: the trained judge's ``Head`` (the default is (64,));
- ``hist_gradient_boosting``: scikit-learn's HistGradientBoostingClassifier. Not used by the judge,
  because it cannot be saved without pickle (or skops, which MLflow gates behind the same flag).

Reports accuracy and Cohen's kappa overall and on the answers that are not verbatim reference
answers, per label, and the seconds each design took. Run: ``python -m benchmarks.judge_designs``;
writes ``benchmarks/results/judge_designs.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import DATA_CSV, RESULTS_DIR, parser, write_report
from core.data import load_questions
from evaluation.human_labels import LABEL_FILES, agreement, grouped_folds, read_labels
from evaluation.judge_features import FEATURES, Featurizer
from evaluation.semantic_judge import minilm_encoder
from evaluation.trained_judge import Head

RESULTS = RESULTS_DIR / "judge_designs.json"
Predict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (train X, train y, test X) -> P(yes)


def _sklearn(make: Callable[[], object]) -> Predict:
    def predict(x: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), make())
        model.fit(x, y)
        return np.asarray(model.predict_proba(test))[:, 1]

    return predict


def designs(seed: int) -> dict[str, Predict]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    rule_column = FEATURES.index("cos_max_diff")
    return {
        "rule": lambda x, y, test: (test[:, rule_column] > 0).astype(float),
        "logistic": _sklearn(lambda: LogisticRegression(max_iter=2000)),
        "mlp_64": lambda x, y, test: Head.fit(x, y, hidden=(64,), seed=seed).predict_proba(test),
        "mlp_128_64": lambda x, y, test: Head.fit(x, y, hidden=(128, 64), seed=seed).predict_proba(test),
        "hist_gradient_boosting": _sklearn(lambda: HistGradientBoostingClassifier(max_iter=400, learning_rate=0.05,
                                                                                  random_state=seed)),
    }


def main() -> None:
    p = parser("judge_designs", __doc__, flags=())
    p.add_argument("--data", default=str(DATA_CSV), help="TruthfulQA CSV; the label files lie beside it")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    questions = load_questions(args.data)
    featurizer = Featurizer(minilm_encoder())
    result: dict[str, object] = {"folds": args.folds, "seed": args.seed, "features": list(FEATURES)}
    for kind, name in LABEL_FILES.items():
        labelled = read_labels(Path(args.data).parent / name, questions, kind)
        tick = time.perf_counter()
        x = featurizer([r.item for r in labelled])  # (n, n_features)
        y = np.array([r.label for r in labelled])
        nonref = np.array([not r.verbatim for r in labelled])
        per_design: dict[str, object] = {"n": len(labelled), "n_nonref": int(nonref.sum()),
                                         "feature_seconds": time.perf_counter() - tick}
        folds = grouped_folds(labelled, args.folds, args.seed)
        for design, predict in designs(args.seed).items():
            tick = time.perf_counter()
            p_yes = np.zeros(len(labelled))
            for test in folds:
                train = np.setdiff1d(np.arange(len(labelled)), test)
                p_yes[test] = predict(x[train], y[train], x[test])
            verdicts = (p_yes > 0.5).astype(int)
            overall = agreement(y.tolist(), verdicts.tolist())
            sub = agreement(y[nonref].tolist(), verdicts[nonref].tolist())
            per_design[design] = {"accuracy": overall["accuracy"], "kappa": overall["kappa"],
                                  "nonref_accuracy": sub["accuracy"], "nonref_kappa": sub["kappa"],
                                  "seconds": time.perf_counter() - tick}
            print(f"{kind:>5} {design:>24}: kappa {overall['kappa']:.3f} (accuracy {overall['accuracy']:.3f}); "
                  f"not verbatim references {sub['kappa']:.3f}", flush=True)
        result[kind] = per_design
    write_report(RESULTS, result)


if __name__ == "__main__":
    main()
