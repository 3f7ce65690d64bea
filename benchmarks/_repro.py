"""Shared pieces of the strategy reproductions (``fedprox_stragglers.py``,
``adaptive_optimizers.py``, ``scaffold_fednova.py``, ``robustness.py``).

- :class:`PerClient`: wraps a strategy and edits each round's fit instructions, one per
  client (stragglers' epoch counts, attackers' flags, drawn local epochs), with an RNG
  seeded by ``(seed, round)``;
- :class:`Track`: a round callback keeping the last model, the accuracy curve, and the
  round a target accuracy was first reached (optionally ending the run there);
- :class:`Report`: prints lines and saves them to ``benchmarks/results/<name>.txt``;
- :func:`table`: a plain-text table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
)
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.strategy import Strategy
from fedhive.server.strategy.base import Aggregator, EvaluateResults, FitResults
from fedhive.server.strategy.traits import StrategyTraits, traits_of

RESULTS = Path(__file__).resolve().parent / "results"

#: ``edit(rng, instructions) -> instructions``: the round's fit instructions, sorted by
#: client id, and an RNG seeded by (seed, round); returns the instructions to send.
Edit = Callable[
    [np.random.Generator, list[tuple[ClientProxy, FitIns]]], list[tuple[ClientProxy, FitIns]]
]


def with_config(ins: FitIns, **entries: Scalar) -> FitIns:
    """A copy of ``ins`` with ``entries`` added to its config (the original is shared;
    its extras, e.g. SCAFFOLD's server variate, go along)."""
    return dataclasses.replace(ins, config={**ins.config, **entries})


class PerClient(Strategy):
    """``inner`` with its fit instructions edited per client each round; all else delegated.

    The RNG of round ``r`` is ``np.random.default_rng([seed, r])``, so a run's per-client
    draws (who straggles, who attacks, how many epochs) are fixed by its seed, whatever
    the strategy.
    """

    def __init__(self, inner: Strategy, edit: Edit, seed: int) -> None:
        self.inner, self.edit, self.seed = inner, edit, seed

    @property
    def traits(self) -> StrategyTraits:
        return traits_of(self.inner)  # the same strategy, instructions edited

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        instructions = sorted(instructions, key=lambda pair: pair[0].cid)
        rng = np.random.default_rng([self.seed, server_round])
        return self.edit(rng, instructions)

    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        return self.inner.fit_aggregator(server_round, parameters)

    def evaluate_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        return self.inner.evaluate_aggregator(server_round, parameters)

    def state_dict(self) -> RecordDict:
        return self.inner.state_dict()

    def load_state_dict(self, state: RecordDict) -> None:
        self.inner.load_state_dict(state)


class TargetReached(Exception):
    """Raised by :class:`Track` to end a run once the target is reached."""


class Track(RoundCallback):
    """Records the centralized accuracy per round, the last model and the target round.

    With ``stop=True`` the run ends (:class:`TargetReached`) at the first round whose
    centralized accuracy is ``>= target``.
    """

    def __init__(self, target: float = math.inf, stop: bool = False) -> None:
        self.target, self.stop = target, stop
        self.curve: list[tuple[int, dict[str, Scalar]]] = []
        self.reached: int | None = None
        self.model: NDArrays = []

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        central = record.get("centralized") or {}
        if "accuracy" not in central:
            return
        rnd = int(record["round"])
        self.curve.append((rnd, dict(central)))
        if self.reached is None and rnd > 0 and float(central["accuracy"]) >= self.target:
            self.reached = rnd
            if self.stop:
                self.model = list(engine.parameters.arrays)
                raise TargetReached

    def on_run_end(self, engine: Engine, history: Any) -> None:
        self.model = list(engine.parameters.arrays)

    def last(self, key: str = "accuracy") -> float:
        return float(self.curve[-1][1][key]) if self.curve else math.nan


def median(values: Sequence[float]) -> float:
    """Median that treats ``inf`` (target not reached) as larger than every number."""
    return float(statistics.median(values))


def fmt_rounds(rounds: float, cap: int) -> str:
    return f">{cap}" if math.isinf(rounds) else f"{rounds:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text table with a dashed rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Report:
    """Prints the report and, when ``path`` is given, saves it there as well."""

    def __init__(self, script: str, path: Path | None) -> None:
        self.script, self.path = Path(script).name, path
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def finish(self, argv: Sequence[str]) -> None:
        """The ``Reproduce:`` line, then the file (if any)."""
        self(f"\nReproduce: .venv/bin/python benchmarks/{self.script} {shlex.join(argv)}".rstrip())
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines) + "\n")
            print(f"(saved to {self.path})", file=sys.stderr)


def results_path(name: str, quick: bool, out: str | None) -> Path | None:
    """``--out`` if given; else ``benchmarks/results/<name>.txt`` for a full run and
    nothing for ``--quick`` (smoke runs leave no files)."""
    if out:
        return Path(out)
    return None if quick else RESULTS / f"{name}.txt"


def simulate(
    strategy: Strategy,
    client_fn: Any,
    num_clients: int,
    rounds: int,
    seed: int,
    *,
    target: float = math.inf,
    stop: bool = False,
    mods: Sequence[Any] = (),
) -> Track:
    """One ``start_simulation`` run (thread backend, one worker); its :class:`Track`."""
    from fedhive.server.config import ServerConfig
    from fedhive.simulation import start_simulation

    track = Track(target, stop)
    with contextlib.suppress(TargetReached):
        start_simulation(
            client_fn=client_fn,
            num_clients=num_clients,
            config=ServerConfig(num_rounds=rounds),
            strategy=strategy,
            num_workers=1,
            seed=seed,
            mods=mods,
            callbacks=[track],
        )
    return track
