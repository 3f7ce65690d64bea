"""Budgets stop training before they are exceeded; checkpoints keep epsilon and not noise."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from conftest import initial, noisy_client_fn
from fedhive.common import PrivacyBudgetExceeded
from fedhive.privacy import (
    Accounting,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    epsilon_for,
)
from fedhive.server import RoundCallback, ServerConfig, load_npz
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

N, M, Z, DELTA = 8, 4, 1.5, 1e-4


def eps(rounds):
    return epsilon_for(Z, DELTA, rounds, sampling="fixed", population=N, cohort=M)


def inner():
    return FedAvg(fraction_fit=0.5, fraction_evaluate=0.5, initial_parameters=initial((6,)))


def fixed(**accounting):
    return DifferentialPrivacyServerSideFixedClipping(
        inner(), Z, 0.5, M, accounting=Accounting(delta=DELTA, **accounting)
    )


def run(strategy, rounds, directory=None, resume=False, callbacks=()):
    return start_simulation(
        client_fn=noisy_client_fn, num_clients=N, config=ServerConfig(num_rounds=rounds),
        strategy=strategy, seed=5, num_workers=2, checkpoint_dir=directory, resume=resume,
        callbacks=callbacks,
    )  # fmt: skip


def test_budget_stops_before_the_round_that_would_exceed_it(caplog):
    limit = (eps(3) + eps(4)) / 2
    strategy = fixed(max_epsilon=limit)
    with caplog.at_level(logging.WARNING, logger="fedhive.privacy"):
        history = run(strategy, 6)
    spent = history.metrics_distributed_fit["epsilon"]
    assert [r for r, _ in spent] == [1, 2, 3]
    assert spent[-1][1] == pytest.approx(eps(3)) and spent[-1][1] <= limit
    rounds = [r for r in history.rounds if r["round"] > 0]
    assert [r["fit"]["updated"] for r in rounds] == [True] * 3 + [False] * 3
    assert all("selected no clients" in r["fit"]["note"] for r in rounds[3:])
    assert "round 4 would raise epsilon" in strategy.exhausted_reason
    assert sum("privacy budget exhausted" in m for m in caplog.messages) == 1
    assert strategy.accountant.rounds == 3


def test_budget_can_raise_instead():
    with pytest.raises(PrivacyBudgetExceeded, match="round 3 would raise epsilon"):
        run(fixed(max_epsilon=(eps(2) + eps(3)) / 2, on_exhausted="raise"), 5)


class StopAfter(RoundCallback):
    def __init__(self, rnd):
        self.rnd = rnd

    def on_round_end(self, engine, record):
        if record["round"] == self.rnd:
            raise KeyboardInterrupt


def test_resume_keeps_epsilon_continuous_and_noise_fresh(tmp_path):
    full = run(fixed(), 4, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(fixed(), 4, tmp_path / "cut", callbacks=[StopAfter(2)])
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    first = run(fixed(), 4, tmp_path / "cut", resume=True)
    second = run(fixed(), 4, tmp_path / "cut2", resume=True)
    expected = [(r, pytest.approx(eps(r))) for r in (1, 2, 3, 4)]
    for history in (full, first, second):
        assert history.metrics_distributed_fit["epsilon"] == expected
        assert history.metrics_distributed_fit["dp_rounds"] == [(r, r) for r in (1, 2, 3, 4)]
    a = load_npz(tmp_path / "cut" / "final_model.npz")[0]
    b = load_npz(tmp_path / "cut2" / "final_model.npz")[0]
    assert not np.array_equal(a, b)  # secure noise is never replayed after a resume


def test_seeded_noise_resumes_to_the_uninterrupted_run_and_says_not_private(tmp_path, caplog):
    def strategy():
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner(), noise_multiplier=Z, num_sampled_clients=M, initial_clipping_norm=0.05,
            clipped_count_stddev=2.0, accounting=Accounting(delta=DELTA), noise_seed=42,
        )  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="fedhive.privacy"):
        full = run(strategy(), 4, tmp_path / "full")
    assert any("NOT private" in m for m in caplog.messages)
    with pytest.raises(KeyboardInterrupt):
        run(strategy(), 4, tmp_path / "cut", callbacks=[StopAfter(2)])
    resumed = run(strategy(), 4, tmp_path / "cut", resume=True)
    assert resumed.without_timings() == full.without_timings()
    norms = [v for _, v in full.metrics_distributed_fit["dp_clipping_norm"]]
    assert norms[0] == 0.05 and len(set(norms)) == 4  # the adaptive norm is checkpointed too
    assert full.metrics_distributed_fit["dp_not_private"] == [(r, True) for r in (1, 2, 3, 4)]
    assert '"dp_not_private": true' in full.to_json()


def test_progress_bar_shows_epsilon():
    from rich.console import Console

    from fedhive.cli.progress import ProgressBar

    console = Console(record=True, width=160, force_terminal=False)
    run(fixed(), 2, callbacks=[ProgressBar(2, console=console)])
    assert f"eps {eps(2):.3g}" in console.export_text()


class _Crash(BaseException):
    """Stands for the process dying (nothing catches it)."""


def _released_strategy(seen, crash_at):
    """Secure noise; the evaluation function logs every model it is shown and, once,
    dies while evaluating round ``crash_at`` (``crash_at`` is a one-item list)."""

    def evaluate_fn(rnd, params, cfg):
        seen.setdefault(rnd, []).append(np.concatenate([p.ravel() for p in params]).tobytes())
        if crash_at and rnd == crash_at[0]:
            crash_at.clear()
            raise _Crash
        return float(np.abs(params[0]).sum()), {}

    strategy = FedAvg(
        fraction_fit=0.5, fraction_evaluate=0.5, initial_parameters=initial((6,)),
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, Z, 0.5, M, accounting=Accounting(delta=DELTA)
    )


def test_a_crash_during_evaluation_resumes_the_released_model_charged_once(tmp_path):
    seen: dict[int, list[bytes]] = {}
    crash_at = [2]
    with pytest.raises(_Crash):
        run(_released_strategy(seen, crash_at), 3, tmp_path)
    # the model was saved, with the ledger that charged it, before it was evaluated
    assert (tmp_path / "LATEST").read_text() == "round-000002-released"
    history = run(_released_strategy(seen, crash_at), 3, tmp_path, resume=True)
    assert [r["round"] for r in history.rounds] == [0, 1, 2, 3]
    assert len(set(seen[2])) == 1 and len(seen[2]) == 2  # evaluated again, never re-drawn
    fit = [r["fit"]["metrics"] for r in history.rounds[1:]]
    assert [m["dp_rounds"] for m in fit] == [1, 2, 3]
    assert [m["epsilon"] for m in fit] == pytest.approx([eps(1), eps(2), eps(3)])
    final = np.concatenate([a.ravel() for a in load_npz(tmp_path / "final_model.npz")])
    assert final.tobytes() == seen[3][-1]
    # the finished round superseded its release; the previous round is kept as a fallback
    assert (tmp_path / "LATEST").read_text() == "round-000003"
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-000002", "round-000003"]
