"""The output folder of ``fedhive run`` and ``fedhive server``: a new run does not write
into the folder of an old one (whose checkpoints a later ``--resume`` would take up)
unless told to replace it, and a resumed run says where it continues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedhive.common.errors import ConfigError

__all__ = ["RUN_FILES", "prepare_out_dir", "resume_line"]

#: The files a run writes to its output folder (besides its checkpoints).
RUN_FILES = (
    "history.json",
    "metrics.csv",
    "accuracy.png",
    "config.toml",
    "final_model.npz",
    "best_model.npz",
)


def prepare_out_dir(
    out_dir: Path, checkpoint_dir: Path, *, overwrite: bool, resume_hint: str
) -> None:
    """Refuse a new run into ``out_dir`` when it holds an earlier run's files or
    checkpoints (:class:`ConfigError` naming them, ``resume_hint`` and ``--overwrite``);
    with ``overwrite``, delete them (only those: other files in the folder stay)."""
    used = [name for name in RUN_FILES if (out_dir / name).exists()]
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        used.append(f"{checkpoint_dir.name}/")
    if not used:
        return
    if not overwrite:
        raise ConfigError(
            f"{out_dir} already holds a run ({', '.join(used)}); continue it with "
            f"{resume_hint}, choose another --out, or pass --overwrite to replace it"
        )
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)


def _checkpoint_round(checkpoint_dir: Path) -> int | None:
    """The round of the newest checkpoint in ``checkpoint_dir``, or ``None``."""
    pointer = checkpoint_dir / "LATEST"
    try:
        meta = json.loads((checkpoint_dir / pointer.read_text().strip() / "meta.json").read_text())
        return int(meta["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_line(checkpoint_dir: Path, rounds: int) -> str:
    """``"resuming after round 3 of 10 (checkpoint in ...)"``, or why it starts over."""
    done = _checkpoint_round(checkpoint_dir)
    if done is None:
        return f"no checkpoint in {checkpoint_dir}: starting at round 1 of {rounds}"
    if done >= rounds:
        return (
            f"the checkpoint in {checkpoint_dir} is after round {done}: all {rounds} rounds "
            "are done (raise --rounds to go on)"
        )
    return (
        f"resuming after round {done} (checkpoint in {checkpoint_dir}): rounds "
        f"{done + 1} to {rounds}"
    )
