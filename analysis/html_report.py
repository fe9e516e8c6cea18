"""``report.html``: the analysis report as one self-contained page that MLflow's artifact viewer renders.

The viewer shows ``report.md``'s tables but not its images, and its relative links lead nowhere. This page is
the same Markdown rendered by markdown-it (CommonMark with tables), each local ``.png`` embedded as a data URI,
and each other local link (a ``.csv`` or ``.pdf`` beside it) turned into its file name in code: an artifact of
the same run, listed beside the report. Links with a scheme (``https://``) are kept.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

HTML_REPORT = "report.html"
STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem;line-height:1.4}"
         "table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.2rem .4rem}"
         "img{max-width:100%}code{background:#f4f4f4}")
_IMAGE = re.compile(r'<img src="([^"]+)"')
_LINK = re.compile(r'<a href="([^"]+)">(.*?)</a>', re.DOTALL)


def _local(target: str) -> bool:
    return "://" not in target and not target.startswith(("#", "mailto:", "data:"))


def render(markdown: str, folder: Path, title: str = "truthsteer analysis") -> str:
    """The page for `markdown`, whose relative links point into `folder`."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def image(match: re.Match[str]) -> str:
        target = html.unescape(match.group(1))
        path = folder / target
        if not _local(target) or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"'

    def link(match: re.Match[str]) -> str:
        target = html.unescape(match.group(1))
        if not _local(target):
            return match.group(0)
        return f"{match.group(2)} (<code>{html.escape(Path(target).name)}</code>)"

    body = _LINK.sub(link, _IMAGE.sub(image, body))
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


__all__ = ['HTML_REPORT', 'render']
