"""Tests for core.corpus and the shipped neutral corpus (corpora/neutral/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import ConfigError
from core.corpus import NEUTRAL_CORPUS, Passage, load_passages

README = NEUTRAL_CORPUS.parent / "README.md"


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    return load_passages()


def test_shipped_corpus_is_clean(passages: list[Passage]) -> None:
    assert len(passages) >= 200
    assert len({p.id for p in passages}) == len(passages)
    for p in passages:
        assert "<unk>" not in p.text and "<unk>" not in p.title, p.id
        assert "@-@" not in p.text and "@,@" not in p.text and "@.@" not in p.text, p.id
        assert len(p.text.split()) >= 30, p.id
        assert p.title, p.id


def test_shipped_corpus_size() -> None:
    assert NEUTRAL_CORPUS.stat().st_size < 400_000


def test_first_n_in_file_order(passages: list[Passage]) -> None:
    first = load_passages(n=5)
    assert first == passages[:5]
    lines = NEUTRAL_CORPUS.read_text(encoding="utf-8").splitlines()[:5]
    assert [p.id for p in first] == [json.loads(line)["id"] for line in lines]
    assert first[0].id == "wt2-test-0001"


def test_readme_names_licence_and_source() -> None:
    text = README.read_text(encoding="utf-8")
    assert "CC BY-SA" in text
    assert "pytorch/examples" in text
    assert "word_language_model/data/wikitext-2/test.txt" in text


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_a_small_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", '{"id": "a", "title": "T", "text": "one"}', "",
                  '{"id": "b", "title": "T", "text": "two"}')
    assert load_passages(path) == [Passage("a", "T", "one"), Passage("b", "T", "two")]
    assert load_passages(str(path), n=1) == [Passage("a", "T", "one")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_passages(tmp_path / "absent.jsonl")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", '{"id": "a", "title": "T", "text": "one"}', "{not json")
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_passages(path)


@pytest.mark.parametrize("row", ['{"id": "a", "title": "T"}', '{"id": "a", "text": 3}', '["text"]'])
def test_missing_text_names_the_line(tmp_path: Path, row: str) -> None:
    path = _write(tmp_path / "c.jsonl", row)
    with pytest.raises(ConfigError, match="line 1 lacks a string 'text'"):
        load_passages(path)


def test_n_larger_than_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", '{"id": "a", "title": "T", "text": "one"}')
    with pytest.raises(ConfigError, match="n=2 but .* holds only 1 passages"):
        load_passages(path, n=2)


def test_negative_n() -> None:
    with pytest.raises(ConfigError, match="n=-1 must be >= 0"):
        load_passages(n=-1)
