"""Atomic checkpoints after every round, and resume.

Layout of a checkpoint directory::

    LATEST                  name of the newest complete checkpoint (replaced atomically)
    round-000007/
        meta.json           round, model version, run id, seed, elapsed time, history
        parameters.fhv      global model (fedhive array format)
        strategy.fhv        strategy state (server optimizer moments, ...)
        clients/            per-client persistent state (index.tsv + one file per client)
    best_model.npz          model with the lowest loss so far (centralized, else distributed)
    final_model.npz         model after the last round

(the two models go to ``model_dir`` when one is given).

A checkpoint directory is written in full under a temporary name, then renamed, then
``LATEST`` is switched to it: a crash at any point leaves the previous checkpoint intact.
Randomness needs no saved generator state: every draw uses a seed derived from (run seed,
round, client, purpose), so the seed alone replays it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedhive.common.atomic import SECRET_MODE, atomic_open, atomic_write_bytes, fsync_dir
from fedhive.common.errors import CheckpointError, SerdeError, StateError
from fedhive.common.records import NDArrays
from fedhive.server.history import History

if TYPE_CHECKING:
    from fedhive.server.engine import Engine

__all__ = ["Checkpointer", "ClientStates", "save_npz", "load_npz"]

FORMAT = 1


class ClientStates(Protocol):
    """What a checkpoint keeps of the clients' persistent state.

    :class:`fedhive.client.StateStore` is one: ``dump`` writes every state into a folder
    of the checkpoint, ``load`` replaces the store's content with such a folder.
    """

    def dump(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


def save_npz(path: Path, arrays: NDArrays) -> None:
    """Write a model as ``.npz`` (arrays ``arr_0``, ``arr_1``, ... in order), atomically."""
    with atomic_open(path) as fh:  # streamed: no second copy of the model in memory
        np.savez(fh, *arrays)


def load_npz(path: str | Path) -> NDArrays:
    """Read a model written by :func:`save_npz` (never unpickles)."""
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class Checkpointer:
    """Saves the engine after every round; :meth:`restore` resumes from the newest save."""

    def __init__(
        self,
        directory: str | Path,
        state_store: ClientStates | None = None,
        keep: int = 2,
        model_dir: str | Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.model_dir = Path(model_dir) if model_dir is not None else self.directory
        self.state_store = state_store
        self.keep = max(1, keep)
        self._best_loss = math.inf

    def __call__(self, engine: Engine) -> None:
        self.save(engine)

    def save(self, engine: Engine) -> Path:
        from fedhive.common.serde import encode_parameters, encode_record_dict

        name = f"round-{engine.current_round:06d}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        # a checkpoint may hold client state with SecAgg+ round secrets: owner only
        atomic_write_bytes(
            tmp / "parameters.fhv", encode_parameters(engine.parameters), SECRET_MODE
        )
        strategy_state = encode_record_dict(engine.strategy.state_dict())
        atomic_write_bytes(tmp / "strategy.fhv", strategy_state, SECRET_MODE)
        if self.state_store is not None:
            self.state_store.dump(tmp / "clients")
        meta = {
            "format": FORMAT,
            "round": engine.current_round,
            "model_version": engine.model_version,
            "run_id": engine.run_id,
            "seed": engine.seed,
            "elapsed_s": engine.elapsed(),
            "history": engine.history.to_dict(),
            "policy": {"name": engine.policy.name, "state": engine.policy.state_dict()},
        }
        atomic_write_bytes(
            tmp / "meta.json", json.dumps(meta, allow_nan=False).encode(), SECRET_MODE
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.directory)  # the rename survives a crash before LATEST names it
        atomic_write_bytes(self.directory / "LATEST", name.encode())
        self._save_best(engine)
        self._prune(name)
        return final

    def _save_best(self, engine: Engine) -> None:
        record = engine.history.rounds[-1] if engine.history.rounds else {}
        loss = (record.get("centralized") or {}).get("loss")
        if loss is None:
            loss = (record.get("distributed") or {}).get("loss")
        if loss is not None and math.isfinite(loss) and loss < self._best_loss:
            self._best_loss = loss
            save_npz(self.model_dir / "best_model.npz", list(engine.parameters.arrays))

    def save_final(self, engine: Engine) -> Path:
        path = self.model_dir / "final_model.npz"
        save_npz(path, list(engine.parameters.arrays))
        return path

    def _prune(self, newest: str) -> None:
        rounds = sorted(p for p in self.directory.glob("round-*") if p.is_dir())
        for old in rounds[: -self.keep]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.directory / "LATEST"
        if not pointer.exists():
            return None
        path = self.directory / pointer.read_text().strip()
        if not (path / "meta.json").exists():
            raise CheckpointError(f"LATEST names {path.name}, which is incomplete or missing")
        return path

    def restore(self, engine: Engine) -> bool:
        """Load the newest checkpoint into ``engine``; False if there is none."""
        from fedhive.common.serde import decode_parameters, decode_record_dict

        path = self.latest()
        if path is None:
            return False
        try:
            meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint format {meta.get('format')!r} is not {FORMAT}")
            parameters = decode_parameters(bytearray((path / "parameters.fhv").read_bytes()))
            strategy_state = decode_record_dict(bytearray((path / "strategy.fhv").read_bytes()))
            if self.state_store is not None and (path / "clients").exists():
                self.state_store.load(path / "clients")
        except (OSError, ValueError, KeyError, SerdeError, StateError) as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from exc
        if meta["seed"] != engine.seed:
            raise CheckpointError(
                f"the checkpoint in {path} was made with seed {meta['seed']!r}; "
                f"this run has seed {engine.seed!r}"
            )
        policy = meta.get("policy", {"name": "sync", "state": {}})
        if policy["name"] != engine.policy.name:
            raise CheckpointError(
                f"the checkpoint in {path} was made by the {policy['name']!r} run policy; "
                f"this run uses {engine.policy.name!r}"
            )
        engine.policy.load_state_dict(policy["state"])
        engine.strategy.load_state_dict(strategy_state)
        engine.parameters = parameters
        engine.model_version = int(meta["model_version"])
        engine.current_round = int(meta["round"])
        engine.run_id = int(meta["run_id"])
        engine.history = History.from_dict(meta["history"])
        engine.resume_at(float(meta["elapsed_s"]))
        for record in engine.history.rounds:
            loss = (record.get("centralized") or {}).get("loss")
            if loss is None:
                loss = (record.get("distributed") or {}).get("loss")
            if loss is not None and math.isfinite(loss):
                self._best_loss = min(self._best_loss, loss)
        return True
