"""mkdocs hook: the docstrings' Sphinx roles (``:class:`Engine```) read as plain code
on the site (mkdocstrings shows the role's name otherwise)."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
