"""Checkpoints after every round; resuming gives exactly the uninterrupted history."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import initial, noisy_client_fn
from fedhive.common import CheckpointError
from fedhive.server import RoundCallback, ServerConfig, load_npz
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation


def strategy():
    return FedAvg(
        fraction_fit=0.5,
        fraction_evaluate=0.5,
        min_fit_clients=2,
        min_evaluate_clients=2,
        initial_parameters=initial((6,)),
        evaluate_fn=lambda rnd, params, cfg: (float(np.abs(params[0]).sum()), {"r": rnd}),
    )


def go(directory, rounds, resume=False, callbacks=(), seed=11, workers=2):
    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=8,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy(),
        seed=seed,
        num_workers=workers,
        checkpoint_dir=directory,
        resume=resume,
        callbacks=callbacks,
    )


class StopAfter(RoundCallback):
    def __init__(self, rnd):
        self.rnd = rnd

    def on_round_end(self, engine, record):
        if record["round"] == self.rnd:
            raise KeyboardInterrupt


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    full = go(tmp_path / "full", 5)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", 5, callbacks=[StopAfter(2)])
    assert (tmp_path / "cut" / "LATEST").read_text() == "round-000002"
    resumed = go(tmp_path / "cut", 5, resume=True, workers=1)
    assert resumed.without_timings() == full.without_timings()
    assert resumed.losses_centralized == full.losses_centralized
    for a, b in zip(
        load_npz(tmp_path / "full" / "final_model.npz"),
        load_npz(tmp_path / "cut" / "final_model.npz"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "cut" / "best_model.npz").exists()


def test_client_state_is_part_of_the_checkpoint(tmp_path):
    go(tmp_path, 3)
    latest = tmp_path / (tmp_path / "LATEST").read_text()
    index = (latest / "clients" / "index.tsv").read_text().splitlines()
    assert index and all("\t" in line for line in index)
    # only the newest rounds are kept
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-000002", "round-000003"]


def test_resume_with_another_seed_is_refused(tmp_path):
    go(tmp_path, 2)
    with pytest.raises(CheckpointError, match="seed"):
        go(tmp_path, 3, resume=True, seed=12)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    go(tmp_path, 1)
    (tmp_path / "round-000001" / "parameters.fhv").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot resume"):
        go(tmp_path, 2, resume=True)
    (tmp_path / "LATEST").write_text("round-000099")
    with pytest.raises(CheckpointError, match="incomplete or missing"):
        go(tmp_path, 2, resume=True)


def test_resume_of_a_finished_run_runs_nothing_more(tmp_path):
    first = go(tmp_path, 2)
    again = go(tmp_path, 2, resume=True)
    assert again.without_timings() == first.without_timings()


def test_checkpoint_and_spilled_client_state_are_owner_only(tmp_path):
    import stat

    from fedhive.client.state import StateStore
    from fedhive.common.records import RecordDict

    go(tmp_path, 2)
    latest = tmp_path / (tmp_path / "LATEST").read_text()
    files = [f for f in latest.rglob("*") if f.is_file()]
    assert any(f.parent.name == "clients" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    store = StateStore(tmp_path / "spill", memory_limit_bytes=0)
    state = RecordDict()
    state.config_records["secagg.identity"] = {"secret": b"\x01" * 32}
    state.array_records["big"] = {"a": np.zeros(100)}
    store.put("n1", state)
    assert store.is_on_disk("n1")
    (spilled,) = [f for f in (tmp_path / "spill").iterdir() if f.is_file()]
    assert stat.S_IMODE(spilled.stat().st_mode) == 0o600


def test_saving_a_round_again_never_writes_over_the_checkpoint_latest_names(tmp_path):
    """A policy may save the same round twice (an open asynchronous buffer): the second
    save goes under a name of its own, so no moment passes with LATEST naming nothing."""
    from fedhive.server import Checkpointer

    class Keep(RoundCallback):
        def on_run_end(self, engine, history):
            self.engine = engine

    keep = Keep()
    go(tmp_path / "run", 2, callbacks=[keep])
    checkpointer = Checkpointer(tmp_path / "again")
    first = checkpointer.save(keep.engine)
    second = checkpointer.save(keep.engine)
    assert (first.name, second.name) == ("round-000002", "round-000002-again")
    assert (tmp_path / "again" / "LATEST").read_text() == "round-000002-again"
    assert (first / "meta.json").exists()  # the one LATEST named was left alone
    third = checkpointer.save(keep.engine)
    assert third.name == "round-000002"
    assert sorted(p.name for p in (tmp_path / "again").glob("round-*")) == ["round-000002"]


def test_a_finished_round_links_the_files_its_release_already_wrote(tmp_path, monkeypatch):
    import fedhive.server.checkpoint as checkpoint_module

    written = []
    write = checkpoint_module.atomic_write_bytes

    def spy(path, data, *args, **kwargs):
        written.append((path.parent.name, path.name))
        return write(path, data, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", spy)
    go(tmp_path, 2)
    # the model and the strategy state (unchanged by evaluation) are written once per
    # round, in the release, and hard-linked into the finished round
    for rnd in (1, 2):
        assert (f".round-00000{rnd}-released.tmp", "parameters.fhv") in written
        assert (f".round-00000{rnd}-released.tmp", "strategy.fhv") in written
        assert (f".round-00000{rnd}.tmp", "parameters.fhv") not in written
        assert (f".round-00000{rnd}.tmp", "strategy.fhv") not in written
        assert (f".round-00000{rnd}.tmp", "meta.json") in written
    assert load_npz(tmp_path / "final_model.npz")[0].shape == (6,)
    assert not (tmp_path / "round-000002-released").exists()  # superseded, pruned
    assert (tmp_path / "round-000002" / "parameters.fhv").stat().st_nlink == 1


@pytest.mark.parametrize("devices", ["lognormal", "trace"])
def test_resume_on_the_virtual_clock_continues_simulated_time_exactly(tmp_path, devices):
    from fedhive.simulation import SystemModel

    system = SystemModel(sigma=1.5, jitter=0.3, bandwidth_mbps=0.01)
    if devices == "trace":  # who is online depends on the simulated time
        trace = tmp_path / "trace.csv"
        rows = [
            f"{i},{20 + 10 * i},0.02,0.05,0-{3 + i};{9 + i}-{25 + 2 * i};36-99" for i in range(8)
        ]
        trace.write_text("client,speed,up_mbps,down_mbps,availability\n" + "\n".join(rows))
        system = SystemModel(latency="trace", trace=str(trace))

    def sim(directory, callbacks=(), resume=False):
        return start_simulation(
            client_fn=noisy_client_fn,
            num_clients=8,
            config=ServerConfig(num_rounds=6),
            strategy=strategy(),
            seed=3,
            num_workers=1,
            checkpoint_dir=directory,
            resume=resume,
            callbacks=callbacks,
            system=system,
        )

    full = sim(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        sim(tmp_path / "cut", callbacks=[StopAfter(3)])
    resumed = sim(tmp_path / "cut", resume=True)
    times = [r["virtual_time_s"] for r in full.rounds if "virtual_time_s" in r]
    assert len(times) == 6 and times[-1] > 0
    # timings on the virtual clock included, bit for bit: the clock goes on from the
    # checkpoint's time instead of starting again at 0
    assert resumed.to_dict()["rounds"] == full.to_dict()["rounds"]
