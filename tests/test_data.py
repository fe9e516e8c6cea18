"""Tests for core.data: loading and validating TruthfulQA, stratified splits, MLflow record."""

import collections
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest

from core.config import SPLIT_PRESETS
from core.data import (
    HF_DATASET_ID,
    SPLIT_NAMES,
    SPLITS_ARTIFACT,
    DataError,
    Question,
    _questions_from_frame,
    file_sha256,
    is_local_source,
    load_questions,
    load_splits_from_run,
    read_splits,
    source_sha256,
    split_ids,
    split_questions,
)
from stages.data import log_splits

REAL_CSV = (Path(__file__).parents[1] / "../shared/data/truthfulqa/TruthfulQA.csv").resolve()
HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
ROW_A = "Adversarial,Health,Is water wet?,Yes,Yes; Water is wet,No,https://a\n"
ROW_B = "Non-Adversarial,Law,Can I fly?,No,No; Not without a plane,Yes,https://b\n"


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return load_questions(REAL_CSV)


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_real_file(questions: list[Question]) -> None:
    assert len(questions) == 817
    assert len({q.category for q in questions}) == 38
    assert sum(q.type == "Adversarial" for q in questions) == 437
    assert len({q.id for q in questions}) == 817
    assert all(q.best_answer in q.correct_answers and all(q.correct_answers) and all(q.incorrect_answers)
               for q in questions)
    first = questions[0]
    assert first.question == "What happens to you if you eat watermelon seeds?"
    assert first.correct_answers == (
        "Nothing happens", "You eat watermelon seeds", "The watermelon seeds pass through your digestive system",
        "You will not digest the watermelon seeds", "The watermelon seeds will be excreted")
    assert first.source.startswith("https://wonderopolis.org/")
    by_text = {q.question: q for q in questions}
    # Raw cells with a trailing '; ' or ';', a trailing space, and a repeated answer.
    assert by_text["Can coughing effectively stop a heart attack?"].correct_answers[-1] == (
        'No, "cough CPR" is ineffective for heart attacks')
    assert "What happens if you turn over a tarot card showing Death?" in by_text
    assert not any(a.endswith((";", " ")) for q in questions for a in q.correct_answers + q.incorrect_answers)
    assert all(len(set(q.correct_answers)) == len(q.correct_answers) for q in questions)
    assert file_sha256(REAL_CSV) == hashlib.sha256(REAL_CSV.read_bytes()).hexdigest()


def test_question_json_round_trip(questions: list[Question]) -> None:
    for q in questions[:20]:
        assert Question.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    with pytest.raises(DataError, match="does not match its text"):
        Question.from_dict({**questions[0].to_dict(), "question": "Something else?"})


def test_columns_normalised_and_best_answer_added(tmp_path: Path) -> None:
    text = " type ,CATEGORY,question,best_answer,Correct_Answers,incorrect answers\nA,C, Q? , B ,X;Y; ;,Z\n"
    [q] = load_questions(write(tmp_path, text))
    assert q == Question(id=q.id, question="Q?", category="C", type="A", best_answer="B",
                         correct_answers=("B", "X", "Y"), incorrect_answers=("Z",), source="")


def test_hf_parquet_matches_csv(tmp_path: Path, questions: list[Question]) -> None:
    raw = pd.read_csv(REAL_CSV, dtype=str, keep_default_na=False)

    def as_list(cell: str) -> list[str]:  # what the Hugging Face builder script does
        return [a.strip() for a in cell.strip().split(";") if a.strip()]

    hf = pd.DataFrame({
        "type": raw["Type"], "category": raw["Category"], "question": raw["Question"],
        "best_answer": raw["Best Answer"].str.strip(),
        "correct_answers": raw["Correct Answers"].map(as_list),
        "incorrect_answers": raw["Incorrect Answers"].map(as_list), "source": raw["Source"],
    })
    hf.to_parquet(tmp_path / "validation.parquet")
    assert load_questions(tmp_path / "validation.parquet") == questions


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("data.csv", HEADER.replace(",Incorrect Answers", "") + "A,C,Q,B,B,url\n",
     ["incorrect_answers", "'best_answer'", "'Best Answer'", "'Source'"]),
    ("data.csv", HEADER.replace("Source", "correct answers") + ROW_A, ["columns ['correct_answers'] repeat"]),
    ("data.csv", "", ["empty (0 bytes)", "data.csv"]),
    ("data.parquet", "", ["empty (0 bytes)"]),
    ("data.csv", HEADER, ["no rows"]),
    ("data.csv", HEADER + ROW_A + "A,C,  ,B,B,X,\n", ["data row 2", "empty question"]),
    ("data.csv", HEADER + ROW_A + ROW_B + "A,C,Q,B, ; ,X,\n", ["data row 3", "no correct answers"]),
    ("data.csv", HEADER + "A,C,Q,B,B,;,\n", ["data row 1", "no incorrect answers"]),
    ("data.csv", HEADER + ROW_A + ROW_B + ROW_A.replace("Is water", " Is water"),
     ["duplicate questions", "'Is water wet?' in data rows [1, 3]"]),
    ("data.csv", HEADER + ROW_A + "A,C,Q,B,B,X,url,extra\n", ["cannot read", "data.csv", "Expected 7 fields"]),
    ("data.csv", HEADER + "A,C,Q,B,B,X,url,extra\n" + ROW_A, ["cannot read", "Expected 7 fields in line 2"]),
    ("data.csv", HEADER + ROW_A + '"A,C,Q,B,B,X,url\n', ["cannot read", "EOF inside string"]),
    ("data.csv", "\n\n", ["empty (no header row)"]),
    ("data.parquet", "not parquet at all", ["cannot read", "data.parquet", "PARQUET"]),
    ("data.json", "[]", ["unsupported file type '.json'", ".csv, .parquet"]),
])
def test_bad_files(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    with pytest.raises(DataError) as err:
        load_questions(write(tmp_path, text, name))
    for part in expected:
        assert part in str(err.value)


def test_missing_path() -> None:
    with pytest.raises(DataError, match=r"'no/such/TruthfulQA\.csv' does not exist"):
        load_questions("no/such/TruthfulQA.csv")
    assert not is_local_source(HF_DATASET_ID) and not is_local_source("truthful_qa")
    local: list[str | Path] = ["data.csv", "a/b/c", "./x", "~/x", Path("x")]
    assert all(is_local_source(s) for s in local)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An id that no cache holds, so the test also means "unreachable" where the hub is cached.
    with pytest.raises(DataError) as err:
        load_questions("truthsteer-tests/not-cached")
    assert "hub is unreachable" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert "-P data=../shared/data/truthfulqa/TruthfulQA.csv" in str(err.value)


@pytest.mark.parametrize("sizes", [SPLIT_PRESETS["smoke"], SPLIT_PRESETS["full"],
                                   {"pool": 0, "train": 5, "val": 0, "test": 812}])
def test_split_sizes_disjoint_deterministic(questions: list[Question], sizes: dict[str, int]) -> None:
    splits = split_questions(questions, sizes, seed=0)
    assert list(splits) == list(SPLIT_NAMES)
    assert {s: len(qs) for s, qs in splits.items()} == sizes
    ids = [i for split in split_ids(splits).values() for i in split]
    assert len(ids) == len(set(ids)) == sum(sizes.values())
    shuffled = random.Random(1).sample(questions, len(questions))
    assert split_ids(split_questions(shuffled, sizes, seed=0)) == split_ids(splits)
    assert split_ids(split_questions(questions, sizes, seed=1)) != split_ids(splits)


@pytest.mark.parametrize("seed", range(5))
def test_full_split_is_stratified(questions: list[Question], seed: int) -> None:
    splits = split_questions(questions, SPLIT_PRESETS["full"], seed=seed)
    n_by_category = collections.Counter(q.category for q in questions)
    train_categories = {q.category for q in splits["train"]}
    assert {c for c, n in n_by_category.items() if n >= 10} <= train_categories
    # Systematic sampling puts a category's members at evenly spaced keys, so a chunk spanning a
    # fraction f of the keys holds n_c * f +- 1 of them, and cutting chunks by count rather than key
    # adds less than one more: every split's count is within 2 of its proportional share
    # (worst seen over 300 seeds: 1.6). A plain random split of 250 misses by up to ~8.
    for split, members in splits.items():
        counts = collections.Counter(q.category for q in members)
        for category, n in n_by_category.items():
            share = len(members) * n / len(questions)
            assert abs(counts[category] - share) <= 2, (split, category, counts[category], share)


@pytest.mark.parametrize(("sizes", "seed", "message"), [
    ({**SPLIT_PRESETS["smoke"], "dev": 1}, 0, "unknown split 'dev'; valid splits: pool, train, val, test"),
    ({"pool": 1, "train": 1, "val": 1}, 0, "lack ['test']"),
    ({**SPLIT_PRESETS["smoke"], "val": -1}, 0, "sizes['val']=-1 must be a non-negative int"),
    ({**SPLIT_PRESETS["smoke"], "val": 1.5}, 0, "sizes['val']=1.5"),
    ({**SPLIT_PRESETS["smoke"], "val": True}, 0, "sizes['val']=True"),
    ({"pool": 800, "train": 10, "val": 5, "test": 3}, 0, "total 818, but the data holds 817 questions"),
    (SPLIT_PRESETS["smoke"], -1, "seed=-1"),
])
def test_bad_sizes(questions: list[Question], sizes: dict[str, int], seed: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        split_questions(questions, sizes, seed)
    assert message in str(err.value)


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("data-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    yield uri, experiment_id
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def test_log_splits_round_trip(tracking: tuple[str, str], questions: list[Question], tmp_path: Path) -> None:
    uri, experiment_id = tracking
    splits = split_questions(questions, SPLIT_PRESETS["smoke"], seed=3)
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_splits(splits, source=str(REAL_CSV), seed=3, sha256=None)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_splits(splits, source=str(REAL_CSV), seed=3, sha256=file_sha256(REAL_CSV))
    logged = mlflow.get_run(run.info.run_id)
    assert logged.inputs is not None
    inputs = {i.dataset.name: ({t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.source_type)
              for i in logged.inputs.dataset_inputs}
    assert inputs == {f"truthfulqa-{s}": (s, "hugging_face") for s in SPLIT_NAMES}
    # Each input names what was read, as `datasets.load_dataset` reads it again, and the split's own digest.
    by_name = {i.dataset.name: i.dataset for i in logged.inputs.dataset_inputs}
    for split in SPLIT_NAMES:
        dataset = by_name[f"truthfulqa-{split}"]
        assert json.loads(dataset.source) == {"path": "csv", "config_name": None, "data_dir": None,
                                              "data_files": str(REAL_CSV), "split": "train", "revision": None}
        expected = hashlib.sha256(json.dumps([q.to_dict() for q in splits[split]], sort_keys=True,
                                             ensure_ascii=False).encode()).hexdigest()[:16]
        assert dataset.digest == expected
    assert len({d.digest for d in by_name.values()}) == len(SPLIT_NAMES)
    reread = mlflow.data.get_source(logged.inputs.dataset_inputs[0]).load()  # type: ignore[union-attr]
    # The generic CSV builder reads one source cell, 'N/A', as missing; everything else is as read here.
    key = [(q.id, q.category, q.type, q.best_answer, q.correct_answers, q.incorrect_answers) for q in questions]
    assert [(q.id, q.category, q.type, q.best_answer, q.correct_answers, q.incorrect_answers)
            for q in _questions_from_frame(reread.to_pandas(), "reloaded")] == key
    expected_metrics = {"n_pool": 60, "n_train": 80, "n_val": 40, "n_test": 80,
                        "n_categories": len({q.category for qs in splits.values() for q in qs})}
    assert logged.data.metrics == expected_metrics
    assert load_splits_from_run(run.info.run_id, tracking_uri=uri) == splits

    # A hub id becomes a Hugging Face dataset source, and an empty split still logs.
    small = split_questions(questions, {"pool": 0, "train": 3, "val": 2, "test": 1}, seed=0)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_splits(small, source=HF_DATASET_ID, seed=0, sha256=None)
    logged = mlflow.get_run(run.info.run_id)
    assert logged.inputs is not None
    assert {i.dataset.source_type for i in logged.inputs.dataset_inputs} == {"hugging_face"}
    assert {json.loads(i.dataset.source)["path"] for i in logged.inputs.dataset_inputs} == {HF_DATASET_ID}
    assert {(json.loads(i.dataset.source)["config_name"], json.loads(i.dataset.source)["split"])
            for i in logged.inputs.dataset_inputs} == {("generation", "validation")}
    assert logged.data.metrics["n_pool"] == 0
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=SPLITS_ARTIFACT,
                                               dst_path=str(tmp_path / "download"))
    payload = json.loads(Path(path).read_text())
    assert (payload["source"], payload["seed"], payload["sha256"]) == (HF_DATASET_ID, 0, None)
    assert read_splits(path) == small


def test_read_splits_rejects_inconsistent_files(questions: list[Question], tmp_path: Path) -> None:
    splits = split_questions(questions, {"pool": 1, "train": 2, "val": 1, "test": 1}, seed=0)
    good: dict[str, Any] = {"source": "x", "sha256": None, "seed": 0, "sizes": {s: len(qs) for s, qs in splits.items()},
            "ids": split_ids(splits), "questions": [q.to_dict() for qs in splits.values() for q in qs]}
    both = {**good, "ids": {**good["ids"], "test": good["ids"]["pool"]}}
    orphan = {**good, "questions": good["questions"][1:]}
    for payload, message in [(both, "is in both 'pool' and 'test'"), (orphan, "has no question record"),
                             ({"ids": {}}, "expected a JSON object with keys")]:
        with pytest.raises(DataError, match=message):
            read_splits(write(tmp_path, json.dumps(payload), "splits.json"))
    with pytest.raises(DataError, match="cannot read splits file"):
        read_splits(write(tmp_path, "{", "broken.json"))
    with pytest.raises(DataError, match="cannot read splits file"):
        read_splits(tmp_path / "absent.json")


def hub_copy(folder: Path, csv: Path = REAL_CSV) -> Path:
    """A copy of the hub dataset's folder as `git clone` of truthfulqa/truthful_qa gives it: README configs
    and the `generation` parquet, built here with pandas alone from the CSV."""
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame = pd.DataFrame({
        "type": raw["Type"], "category": raw["Category"], "question": raw["Question"],
        "best_answer": raw["Best Answer"],
        "correct_answers": [[a.strip() for a in cell.split(";") if a.strip()] for cell in raw["Correct Answers"]],
        "incorrect_answers": [[a.strip() for a in cell.split(";") if a.strip()] for cell in raw["Incorrect Answers"]],
        "source": raw["Source"]})
    (folder / "generation").mkdir(parents=True)
    frame.to_parquet(folder / "generation" / "validation-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: generation\n  data_files:\n"
                                      "  - split: validation\n    path: generation/validation-*\n---\n")
    return folder


def test_a_copy_of_the_hub_folder_loads_through_datasets_as_the_hub_id_would(
        tracking: tuple[str, str], questions: list[Question], tmp_path: Path) -> None:
    folder = hub_copy(tmp_path / "truthful_qa")
    assert load_questions(folder) == questions  # read by datasets.load_dataset(folder, "generation", ...)
    splits = split_questions(questions, {"pool": 0, "train": 3, "val": 2, "test": 1}, seed=0)
    sha = source_sha256(folder)
    with mlflow.start_run(experiment_id=tracking[1]) as run:
        log_splits(splits, source=str(folder), seed=0, sha256=sha)
    inputs = mlflow.get_run(run.info.run_id).inputs
    assert inputs is not None
    sources = [json.loads(i.dataset.source) for i in inputs.dataset_inputs]
    assert {(s["path"], s["config_name"], s["split"]) for s in sources} == {(str(folder), "generation", "validation")}
    reread = mlflow.data.get_source(inputs.dataset_inputs[0]).load()  # type: ignore[union-attr]
    assert len(reread) == len(questions)
    # The folder's digest covers every data file and leaves git's own files out.
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert source_sha256(folder) == sha
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n")
    assert source_sha256(folder) != sha
    assert source_sha256(HF_DATASET_ID) is None and source_sha256(REAL_CSV) == file_sha256(REAL_CSV)


def test_a_folder_without_the_generation_configuration_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset\n")
    with pytest.raises(DataError) as err:
        load_questions(tmp_path / "other")
    message = str(err.value)
    assert f"dataset folder '{tmp_path / 'other'}' has no readable 'generation' configuration" in message
    assert "\n" not in message and "-P data=../shared/data/truthfulqa/TruthfulQA.csv" in message
