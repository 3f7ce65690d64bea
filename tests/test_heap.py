"""gc_frozen: the objects alive at a run's start are out of the collector's way during it."""

from __future__ import annotations

import gc

from fedhive.common.heap import gc_frozen


def test_objects_alive_before_are_frozen_during_and_thawed_after():
    keep = [object() for _ in range(100)]
    assert gc.get_freeze_count() == 0
    with gc_frozen():
        assert gc.get_freeze_count() >= len(keep)
        made = [[] for _ in range(10)]  # made during the run: still collected
        made[0].append(made)
        del made
        assert gc.get_freeze_count() >= len(keep)
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_elsewhere_or_a_disabled_collector_is_left_alone(monkeypatch):
    # The frozen count is not a fixed number (a frozen object that dies leaves it), so
    # what is checked is that gc_frozen neither freezes again nor thaws the other freeze.
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 1000)
    with gc_frozen():
        pass
    assert calls == []
    monkeypatch.undo()
    gc.disable()
    try:
        with gc_frozen():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_a_run_leaves_nothing_frozen():
    from conftest import initial, noisy_client_fn
    from fedhive.server import ServerConfig
    from fedhive.server.engine import RoundCallback
    from fedhive.server.strategy import FedAvg
    from fedhive.simulation import start_simulation

    seen = []

    class Probe(RoundCallback):
        def on_round_end(self, engine, record):
            seen.append(gc.get_freeze_count())

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, initial_parameters=initial((4,)))
    start_simulation(
        client_fn=noisy_client_fn, num_clients=3, config=ServerConfig(num_rounds=2),
        strategy=strategy, seed=1, callbacks=[Probe()],
    )  # fmt: skip
    assert len(seen) == 2 and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0
