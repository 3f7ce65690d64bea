"""The code blocks of the documentation (docs/, the README, examples/README.md and the
README that ``fedhive new`` writes), read the way a reader copies them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from deploy_helpers import ROOT

#: Every page a reader follows commands from.
PAGES = sorted(
    [
        *(ROOT / "docs").rglob("*.md"),
        ROOT / "README.md",
        ROOT / "examples" / "README.md",
        ROOT / "src" / "fedhive" / "cli" / "templates" / "README.md.tmpl",
    ]
)

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, language, text, and the paragraph before it."""

    page: Path
    lang: str
    text: str
    intro: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}: {self.text.splitlines()[0] if self.text else ''}"


def blocks(page: Path, lang: str | None = None) -> list[Block]:
    """The code blocks of ``page`` in page order (only ``lang`` ones when given)."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        paragraphs = text[: match.start()].strip().split("\n\n")
        intro = " ".join(paragraphs[-1].split()) if paragraphs else ""
        block = Block(page, match.group(1), match.group(2), intro)
        if lang is None or block.lang == lang:
            found.append(block)
    return found


def commands(block: Block, program: str = "fedhive") -> list[list[str]]:
    """The ``program`` command lines of a shell block as argv lists (without the program),
    continuation lines joined and trailing comments dropped."""
    out = []
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == program:
            out.append(words[1:])
    return out
