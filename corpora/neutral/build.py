"""Build ``wikitext2_test.jsonl`` from the tokenized WikiText-2 test split: ``build.py SOURCE OUTPUT``.

No network; deterministic. Each paragraph of an article body (headings, empty lines skipped) gives at most
one passage, in source order: its first run of consecutive sentences that holds no ``<unk>``, starts and
ends outside a quotation and has MIN_WORDS to MAX_WORDS words. Text is detokenized (``@-@`` to ``-``,
``@,@`` to ``,``, ``@.@`` to ``.``, punctuation, quotes, brackets closed up); ``<unk>`` in a title is ``…``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MIN_WORDS = 40
MAX_WORDS = 120
UNK = "<unk>"
_TITLE = re.compile(r"^ = ([^=].*) = $")
_ENDS = {".", "!", "?"}
_JOIN = {"@-@": "-", "@,@": ",", "@.@": "."}  # 1 @,@ 000 -> 1,000
_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", "%", ")", "]", "..."}
_NO_SPACE_AFTER = {"(", "[", "$", "#"}


def detokenize(tokens: list[str]) -> str:
    """Undo WikiText's tokenization (straight quotes alternate opening and closing).

    Args:
        tokens: The tokens of one passage (a title, or whole sentences that start outside a quotation).
    """
    out, glue = "", True  # glue: no space before the next token
    open_quotes: set[str] = set()
    for i, tok in enumerate(tokens):
        if tok in _JOIN:
            out, glue = out + _JOIN[tok], True
            continue
        later = tokens[i + 1 :]  # ships ' hulls: a possessive unless a later "'" closes a quotation
        possessive = tok == "'" and out.endswith("s") and "'" not in open_quotes and "'" not in later
        closing = tok in open_quotes or possessive or (tok[:1] == "'" and tok[1:2].isalpha())  # 's, 't, 'll
        out += tok if glue or closing or tok in _NO_SPACE_BEFORE else " " + tok
        glue = tok in _NO_SPACE_AFTER or (tok == ":" and out[-2:-1].isdigit() and "".join(later)[:1].isdigit())
        if tok in ('"', "'") and not possessive:
            glue = tok not in open_quotes
            open_quotes ^= {tok}
    return out


def sentences(paragraph: str) -> list[tuple[list[str], bool]]:
    """Split a paragraph at standalone ``.``, ``!``, ``?`` into (tokens, starts inside a quotation) pairs.

    Args:
        paragraph: One tokenized paragraph; a closing quote stays with the sentence it ends.
    """
    out: list[tuple[list[str], bool]] = []
    current: list[str] = []
    quoted = start_quoted = False
    for tok in paragraph.split():
        if tok == '"' and not current and quoted and out:
            out[-1][0].append(tok)
            quoted = False
            continue
        if not current:
            start_quoted = quoted
        current.append(tok)
        quoted = quoted != (tok == '"')
        if tok in _ENDS:
            out.append((current, start_quoted))
            current = []
    return out + [(current, start_quoted)] if current else out


def passage(paragraph: str) -> str | None:
    """The first fitting run of sentences of a paragraph (see the module docstring), detokenized, or None.

    Args:
        paragraph: One tokenized paragraph.
    """
    sents = sentences(paragraph)
    for start in [i for i, (_, quoted) in enumerate(sents) if not quoted]:
        run: list[str] = []
        best: list[str] = []  # the longest run that ends outside a quotation
        for tokens, _ in sents[start:]:
            if UNK in tokens or len(detokenize(run + tokens).split()) > MAX_WORDS:
                break
            run = run + tokens
            if run.count('"') % 2 == 0:
                best = run
        if len(detokenize(best).split()) >= MIN_WORDS:
            return detokenize(best)
    return None


def build(source: Path, output: Path) -> int:
    """Write the jsonl corpus and return how many passages it holds.

    Args:
        source: The tokenized WikiText-2 ``test.txt``.
        output: Where to write the jsonl.
    """
    rows: list[dict[str, str]] = []
    title = ""
    for line in source.read_text(encoding="utf-8").splitlines():
        if match := _TITLE.match(line):
            title = detokenize(["…" if tok == UNK else tok for tok in match.group(1).split()])
        elif line.strip() and not line.strip().startswith("= ") and (text := passage(line)) is not None:
            rows.append({"id": f"wt2-test-{len(rows) + 1:04d}", "title": title, "text": text})
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build wikitext2_test.jsonl from WikiText-2's test.txt.")
    parser.add_argument("source", type=Path, help="tokenized WikiText-2 test.txt")
    parser.add_argument("output", type=Path, help="jsonl to write")
    args = parser.parse_args()
    print(f"wrote {build(args.source, args.output)} passages to {args.output}")
