"""A command's config: the TOML file, then ``--set KEY=VALUE``, then the flags, with the
origin of every overridden key kept, so that an error names ``--set`` or the flag (not
the file) where the bad value came from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhive.cli.config import apply_overrides, load_config, parse_override

__all__ = ["Overrides", "merged_config"]


@dataclass(frozen=True)
class Overrides:
    """The raw config with overrides applied, and where each overridden key came from."""

    data: dict[str, Any]
    source: str
    sources: Mapping[str, str]


def merged_config(
    config_file: Path | None,
    sets: Sequence[str],
    flags: Mapping[str, tuple[str, Any]],
) -> Overrides:
    """``config_file`` (or the defaults), then ``sets`` (``--set KEY=VALUE``), then the
    ``flags`` given (``{key: (flag, value)}``, ``None`` values left out).

    The ``--set`` values are read before the file, so that ``--set data.alpha 0.1`` (a
    space for ``=``) says so instead of taking ``0.1`` for the config file.
    """
    overrides = dict(parse_override(s) for s in sets)
    sources = dict.fromkeys(overrides, "--set")
    for key, (flag, value) in flags.items():
        if value is not None:
            overrides[key] = value
            sources[key] = flag
    raw = load_config(config_file)
    source = str(config_file) if config_file else "command line"
    return Overrides(apply_overrides(raw, overrides), source, sources)
