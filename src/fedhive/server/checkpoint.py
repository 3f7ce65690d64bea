"""Atomic, durable checkpoints of every new model and every round, and resume.

Layout of a checkpoint directory::

    LATEST                  name of the newest complete checkpoint (replaced atomically)
    round-000007-released/  round 7's new model, saved before anything outside saw it
    round-000007-open-000004/  asynchronous runs with ``checkpoint_every``: version 7
                            and 4 results buffered for version 8
    round-000007/           round 7 finished (evaluated); each checkpoint holds:
        meta.json           round, model version, run id, seed, elapsed time, history
                            (a release also holds the round's fit record: "pending")
        parameters.fhv      global model (fedhive array format)
        strategy.fhv        strategy state (server optimizer moments, privacy ledger, ...)
        stage-NN-<name>.fhv a round stage's state, for stages that keep one (NN: its place)
        clients/            per-client persistent state (index.tsv + one file per client)
    best_model.npz          model with the lowest loss so far (centralized, else distributed)
    final_model.npz         model after the last round

(the two models go to ``model_dir`` when one is given).

Each round is saved twice. When its new model exists, *before* evaluation sends it out
or shows it to an evaluation function, :meth:`Checkpointer.release` saves it with the
strategy's state, whose privacy ledger has charged it: the model, its release and its
accounting are one durable step. After evaluation :meth:`Checkpointer.save` saves the
finished round (the model file, and the strategy state if evaluation left it unchanged,
are hard links to the release's, not written again) and
the release, now superseded, is removed. Resuming from a release evaluates that round
and goes on; the round is never run again, so a released model is never replaced by
another with fresh noise, and never charged twice or not at all. A crash before the
release saved loses a model nobody saw; that round runs again.

A checkpoint directory is written in full under a temporary name, fsynced, renamed, then
``LATEST`` is switched to it (and the folder fsynced): a crash or power cut at any point
leaves ``LATEST`` naming a complete checkpoint. Randomness needs no saved generator
state: every draw uses a seed derived from (run seed, round, client, purpose), so the
seed alone replays it (secure DP noise is never replayed: it is drawn fresh).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedhive.common.atomic import SECRET_MODE, atomic_open, atomic_write_bytes, fsync_dir
from fedhive.common.errors import CheckpointError, SerdeError, StateError
from fedhive.common.records import NDArrays
from fedhive.server.history import History, _jsonable, _unjsonable

if TYPE_CHECKING:
    from fedhive.server.engine import Engine

__all__ = ["Checkpointer", "ClientStates", "save_npz", "load_npz"]

FORMAT = 1
_FINISHED = re.compile(r"round-\d{6}")  # a finished round's checkpoint


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


def _stage_file(index: int, name: str) -> str:
    return f"stage-{index:02d}-{name}.fhv"


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
        # this version's release: (round, model version, folder, digest of strategy.fhv)
        self._released: tuple[int, int, Path, bytes] | None = None
        self._strategy_digest = b""

    def __call__(self, engine: Engine) -> None:
        self.save(engine)

    def release(self, engine: Engine, pending: dict[str, Any]) -> Path:
        """Save a new model before anything outside the server sees it (``LATEST`` names
        ``round-NNNNNN-released``): with the strategy's state, and so the privacy ledger
        that charged it, and ``pending`` (the version's fit record). Resuming from it
        evaluates that version; it never runs its round again."""
        name = f"round-{engine.current_round:06d}-released"
        path = self._write(engine, name, {"pending": _jsonable(pending)})
        self._released = (engine.current_round, engine.model_version, path, self._strategy_digest)
        return path

    def save(self, engine: Engine) -> Path:
        """Save the engine after a finished round (``LATEST`` names ``round-NNNNNN``), or
        inside an asynchronous version's open buffer (the policy's state has ``open``:
        ``round-NNNNNN-open-KKKKKK``, version NNNNNN and KKKKKK results buffered for the
        next), a name of its own, so it never writes over a finished round's checkpoint."""
        name = f"round-{engine.current_round:06d}"
        policy_state = engine.policy.state_dict()
        opened = policy_state.get("open")
        if opened is not None:
            name += f"-open-{int(opened['num_results']):06d}"
        path = self._write(engine, self._not_latest(name), {}, policy_state)
        self._save_best(engine)
        return path

    def _not_latest(self, name: str) -> str:
        """``name``, or ``name-again`` when ``LATEST`` names it (saved twice in a row):
        a checkpoint is never written over the one ``LATEST`` names."""
        return name + "-again" if name == self._latest_name() else name

    def _write(
        self,
        engine: Engine,
        name: str,
        extra: dict[str, Any],
        policy_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``name`` in full under a temporary name, fsync it, rename it,
        then switch ``LATEST`` to it (fsynced): a crash at any point leaves ``LATEST``
        naming a complete checkpoint, the old one or this."""
        from fedhive.common.serde import encode_parameters, encode_record_dict

        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        # a checkpoint may hold client state with SecAgg+ round secrets: owner only
        if not self._link_released(engine, "parameters.fhv", tmp):
            atomic_write_bytes(
                tmp / "parameters.fhv", encode_parameters(engine.parameters), SECRET_MODE
            )
        strategy_state = encode_record_dict(engine.strategy.state_dict())
        self._strategy_digest = hashlib.blake2b(strategy_state, digest_size=32).digest()
        # unchanged since the release (evaluation rarely touches it): linked, not rewritten
        if not self._link_released(engine, "strategy.fhv", tmp, self._strategy_digest):
            atomic_write_bytes(tmp / "strategy.fhv", strategy_state, SECRET_MODE)
        del strategy_state
        if self.state_store is not None:
            self.state_store.dump(tmp / "clients")
            fsync_dir(tmp / "clients")
        for i, stage in enumerate(engine.pipeline.stages):
            state = stage.state_dict()
            if state.array_records or state.config_records or state.metric_records:
                path = tmp / _stage_file(i, stage.name)
                atomic_write_bytes(path, encode_record_dict(state), SECRET_MODE)
        meta = {
            "format": FORMAT,
            "round": engine.current_round,
            "model_version": engine.model_version,
            "run_id": engine.run_id,
            "seed": engine.seed,
            "elapsed_s": engine.elapsed(),
            "history": engine.history.to_dict(),
            "policy": {
                "name": engine.policy.name,
                "state": engine.policy.state_dict() if policy_state is None else policy_state,
            },
            **extra,
        }
        atomic_write_bytes(
            tmp / "meta.json", json.dumps(meta, allow_nan=False).encode(), SECRET_MODE
        )  # atomic_write_bytes syncs tmp's entries too
        shutil.rmtree(final, ignore_errors=True)  # never LATEST's: a stale, unfinished one
        tmp.rename(final)
        fsync_dir(self.directory)  # the rename survives a crash before LATEST names it
        atomic_write_bytes(self.directory / "LATEST", name.encode())  # synced with its folder
        self._prune(name)
        return final

    def _link_released(
        self, engine: Engine, name: str, folder: Path, digest: bytes | None = None
    ) -> bool:
        """Hard-link file ``name`` of this version's release checkpoint into ``folder``
        instead of writing it again (the model; the strategy state when its ``digest``
        is the release's); False if there is no such release, or links are refused."""
        if self._released is None:
            return False
        rnd, version, path, released_digest = self._released
        if (rnd, version) != (engine.current_round, engine.model_version):
            return False
        if digest is not None and digest != released_digest:
            return False
        try:
            os.link(path / name, folder / name)
        except OSError:
            return False
        return True

    def _latest_name(self) -> str | None:
        try:
            return (self.directory / "LATEST").read_text().strip()
        except OSError:
            return None

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
        """Keep ``newest`` and the ``keep - 1`` latest finished rounds before it; a release
        or repeated save that ``LATEST`` no longer names is superseded and goes."""
        finished = []
        for path in self.directory.glob("round-*"):
            if path.name == newest or not path.is_dir():
                continue
            if _FINISHED.fullmatch(path.name):
                finished.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        finished.sort()
        for old in finished[: max(0, len(finished) - (self.keep - 1))]:
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
            strategy_bytes = (path / "strategy.fhv").read_bytes()
            strategy_state = decode_record_dict(bytearray(strategy_bytes))
            if self.state_store is not None and (path / "clients").exists():
                self.state_store.load(path / "clients")
            stages = [
                (stage, decode_record_dict(bytearray(file.read_bytes())))
                for i, stage in enumerate(engine.pipeline.stages)
                if (file := path / _stage_file(i, stage.name)).exists()
            ]
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
        for stage, state in stages:
            stage.load_state_dict(state)
        engine.parameters = parameters
        engine.model_version = int(meta["model_version"])
        engine.current_round = int(meta["round"])
        engine.run_id = int(meta["run_id"])
        engine.history = History.from_dict(meta["history"])
        engine.resume_at(float(meta["elapsed_s"]))
        if "pending" in meta:  # released, not evaluated: the run evaluates it first
            engine.resume_released(_unjsonable(meta["pending"]))
            digest = hashlib.blake2b(strategy_bytes, digest_size=32).digest()
            self._released = (engine.current_round, engine.model_version, path, digest)
        for record in engine.history.rounds:
            loss = (record.get("centralized") or {}).get("loss")
            if loss is None:
                loss = (record.get("distributed") or {}).get("loss")
            if loss is not None and math.isfinite(loss):
                self._best_loss = min(self._best_loss, loss)
        return True
