"""The engine's extension points: multi-stage exchanges, asynchronous folding, refusals."""

from __future__ import annotations

import time

import numpy as np

import fedhive as fl
from conftest import AddClient, initial
from fedhive.client import ClientApp, Context
from fedhive.client.state import StateStore
from fedhive.common import FitIns, Message, MessageType, RecordDict, parameters_to_ndarrays
from fedhive.server import Engine, RoundCallback, ServerConfig, SimpleClientManager
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from fedhive.simulation.runner import VirtualClientRunner
from fedhive.transport import InProcessTransport

# -- (a) a two-stage exchange inside one round: the shape secure aggregation needs --------


def _mask(seed_a: int, seed_b: int, shape) -> np.ndarray:
    lo, hi = sorted((seed_a, seed_b))
    return np.random.default_rng([lo, hi]).normal(size=shape)


def pairwise_mask_mod(message: Message, context: Context, call_next) -> Message:
    """Client side of a toy masking protocol: stage 1 shares a seed, stage 2 masks fit."""
    if message.metadata.message_type == "toy.share_seed":
        seed = int(np.random.default_rng(int(context.node_id) + 1000).integers(1, 2**31))
        context.state.config_records["toy"] = {"seed": seed}
        return message.reply(RecordDict(config_records={"seed": {"value": seed}}))
    reply = call_next(message, context)
    if message.metadata.message_type != MessageType.FIT or reply.error:
        return reply
    mine = int(context.state.config_records["toy"]["seed"])
    peers = [int(s) for s in str(message.content.config["peer_seeds"]).split(",")]
    update = parameters_to_ndarrays(reply.content.parameters)[0].astype(np.float64)
    for peer in peers:
        if peer != mine:
            sign = 1.0 if mine < peer else -1.0
            update = update + sign * _mask(mine, peer, update.shape)
    reply.content.parameters = fl.common.ndarrays_to_parameters([update])
    return reply


def masked_sum_workflow(driver):
    """Stage 1: collect seeds. Stage 2: fit with everyone's seeds; masks cancel in the sum."""
    clients = driver.engine.client_manager.sample(4)
    seeds = []
    for reply in driver.exchange("toy.share_seed", [(c, RecordDict()) for c in clients]):
        seeds.append(int(reply.content.config_records["seed"]["value"]))
    config = {"peer_seeds": ",".join(map(str, seeds))}
    fit_ins = FitIns(driver.parameters, config)
    total = None
    replies = list(driver.exchange(MessageType.FIT, [(c, fit_ins) for c in clients]))
    for reply in replies:
        update = parameters_to_ndarrays(reply.content.parameters)[0]
        total = update if total is None else total + update
    driver.record["masked_updates"] = [
        parameters_to_ndarrays(r.content.parameters)[0].tolist() for r in replies
    ]
    driver.update_parameters(fl.common.ndarrays_to_parameters([total]))


def test_two_stage_exchange_in_one_round_masks_cancel():
    strategy = FedAvg(fraction_evaluate=0.0, initial_parameters=initial((5,)))
    hist = start_simulation(
        client_fn=lambda cid: AddClient(int(cid)),
        num_clients=4,
        strategy=strategy,
        mods=[pairwise_mask_mod],
        fit_workflow=masked_sum_workflow,
        seed=3,
        num_workers=2,
    )
    record = hist.rounds[-1]
    plain = [np.full(5, 1.0 + pid) for pid in range(4)]  # AddClient adds 1 + pid
    masked = [np.array(u) for u in record["masked_updates"]]
    assert all(not np.allclose(m, p) for m, p in zip(sorted(masked, key=sum), plain, strict=True))
    assert record["model_version"] == 1
    # the sum of masked updates equals the sum of the plain ones
    np.testing.assert_allclose(sum(masked), sum(plain), atol=1e-9)


# -- (b) fold every K results with no round barrier: the shape FedBuff needs ---------------


class Slow(fl.client.NumPyClient):
    def __init__(self, cid, release):
        self.cid, self.release = cid, release

    def fit(self, parameters, config):
        if self.cid == "0":
            self.release.wait(30)
        else:
            time.sleep(0.02)  # the others are quick, but not instantaneous
        return [p + 1 for p in parameters], 1, {}


class ReleaseAfter(RoundCallback):
    def __init__(self, event, after):
        self.event, self.after = event, after

    def on_round_end(self, engine, record):
        if record["round"] >= self.after:
            self.event.set()


def _engine(client_fn, num_clients, callbacks=(), workers=4, **kw):
    ids = [str(i) for i in range(num_clients)]
    store = StateStore()
    runner = VirtualClientRunner(
        ClientApp(client_fn), store, {c: {"partition-id": int(c)} for c in ids}, {}
    )
    transport = InProcessTransport(runner, num_workers=workers)
    strategy = kw.pop("strategy", FedAvg(initial_parameters=initial((3,))))
    engine = Engine(
        strategy=strategy,
        transport=transport,
        client_manager=SimpleClientManager(ids, seed=0),
        seed=0,
        callbacks=callbacks,
        **kw,
    )
    return engine, transport, store


def test_buffered_async_folds_without_waiting_for_a_straggler(release):
    engine, transport, store = _engine(
        lambda cid: Slow(cid, release), 4, callbacks=[ReleaseAfter(release, after=3)]
    )
    try:
        hist = BufferedAsync(buffer_size=2, concurrency=4).run(engine, num_updates=10)
    finally:
        transport.close()
        store.close()
    assert [r["model_version"] for r in hist.rounds] == list(range(1, 11))
    folded_early = [s["client_id"] for r in hist.rounds[:3] for s in r["staleness"]]
    assert "0" not in folded_early  # three versions were published while client 0 trained
    late = [s for r in hist.rounds[3:] for s in r["staleness"] if s["client_id"] == "0"]
    assert late and late[0]["staleness"] >= 3  # dispatched at version 0, folded at >= 3


# -- replies that do not belong are refused -----------------------------------------------


def forging(runner):
    """Answers each task with four forged replies in front of the real one."""
    from dataclasses import replace

    def answer(task):
        meta = task.reply(None).metadata
        return [
            Message(replace(meta, run_id=meta.run_id + 1), None),
            Message(replace(meta, server_round=meta.server_round + 5), None),
            Message(replace(meta, reply_to="nope"), None),
            Message(replace(meta, node_id="intruder"), None),
            runner(task),
        ]

    return answer


def test_foreign_and_stale_replies_are_refused():
    from fedhive.testing import FakeTransport

    store = StateStore()
    ids = ["0", "1"]
    runner = VirtualClientRunner(
        ClientApp(lambda cid: AddClient(int(cid))), store, {c: {} for c in ids}, {}
    )
    transport = FakeTransport(forging(runner))
    engine = Engine(
        strategy=FedAvg(fraction_evaluate=0.0, initial_parameters=initial((4,))),
        transport=transport,
        client_manager=SimpleClientManager(ids, seed=0),
        config=ServerConfig(num_rounds=1),
        seed=0,
        run_id=5,
    )
    try:
        hist = engine.run()
    finally:
        transport.close()
        store.close()
    record = hist.rounds[-1]
    assert record["fit"]["num_results"] == 2
    assert len(record["refused"]) == 8
    reasons = " ".join(record["refused"])
    for expected in ("run 6", "round 6", "unknown", "intruder"):
        assert expected in reasons


def test_callbacks_see_every_round():
    seen = []

    class Spy(RoundCallback):
        def on_run_start(self, engine):
            seen.append("start")

        def on_round_end(self, engine, record):
            seen.append(record["round"])

        def on_run_end(self, engine, history):
            seen.append("end")

    start_simulation(
        client_fn=lambda cid: AddClient(0),
        num_clients=2,
        config=ServerConfig(num_rounds=3),
        strategy=FedAvg(initial_parameters=initial((4,)), fraction_evaluate=0.0),
        callbacks=[Spy()],
        seed=0,
    )
    assert seen == ["start", 1, 2, 3, "end"]
