"""The trained judge as an MLflow pyfunc model, logged from this file (MLflow's models from code).

``mlflow models serve -m models:/truthsteer-judge/<version>`` (in an environment with this project
installed) answers a table with the columns ``qid``, ``question``, ``answer``, ``best_answer``,
``correct_answers`` and ``incorrect_answers`` (lists joined by ``"; "``) with the judge's rows
(``judge_p_true``, ``judge_truthful``, ...). truthsteer itself never runs this file: it reads the
judge's arrays from the model's artifacts (``evaluation.trained_judge.load_judge``).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from evaluation.judges import JudgeItem


def _answers(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(";")
    return tuple(a.strip() for a in items if str(a).strip())


class JudgeModel(PythonModel):  # type: ignore[misc]
    """Loads the judge from the model's ``judge`` artifact and scores a table of answers."""

    def load_context(self, context: Any) -> None:
        from evaluation.trained_judge import load_judge

        self.judge = load_judge(context.artifacts["judge"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        items = [JudgeItem(qid=str(r["qid"]), question=str(r["question"]), answer=str(r["answer"]),
                           best_answer=str(r["best_answer"]), correct_answers=_answers(r["correct_answers"]),
                           incorrect_answers=_answers(r["incorrect_answers"])) for _, r in model_input.iterrows()]
        return pd.DataFrame(self.judge.score(items))


mlflow.models.set_model(JudgeModel())
