"""The in-process transport holds a bounded number of undelivered replies.

FedAvg streams results into one accumulator, so a round should cost the server the model,
the accumulator and a few replies in flight, not one reply per client. Cheap clients
finish faster than the engine folds; the transport must then wait for the engine instead
of filling the mailbox. Peak memory is measured in a fresh interpreter (the high-water
mark of its resident set), against a baseline taken once the model exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedhive.common import Message, MessageType, RecordDict
from fedhive.transport import InProcessTransport, Replies
from fedhive.transport.inprocess import reply_nbytes

CLIENTS = 200
MODEL_BYTES = 4 << 20

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import fedhive as fl
    from fedhive.common.records import ndarrays_to_parameters

    clients, model_bytes, workers = (int(a) for a in sys.argv[1:4])

    def high_water_mark():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    class Echo(fl.client.NumPyClient):
        # The cheapest client there is: it returns its private copy of the model.
        def fit(self, parameters, config):
            return parameters, 1, {}

    model = [np.ones(model_bytes // 4, dtype=np.float32)]
    strategy = fl.server.strategy.FedAvg(
        initial_parameters=ndarrays_to_parameters(model),
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
    )
    # Warm up imports and code paths on a tiny model first, so the baseline holds them.
    fl.simulation.start_simulation(
        client_fn=lambda cid: Echo().to_client(),
        num_clients=2,
        num_workers=workers,
        strategy=fl.server.strategy.FedAvg(
            initial_parameters=ndarrays_to_parameters([np.ones(4, np.float32)]),
            fraction_evaluate=0.0,
        ),
        seed=0,
    )
    baseline = high_water_mark()
    history = fl.simulation.start_simulation(
        client_fn=lambda cid: Echo().to_client(),
        num_clients=clients,
        num_workers=workers,
        strategy=strategy,
        seed=0,
    )
    fit = history.rounds[-1]["fit"]
    print(json.dumps({"extra": high_water_mark() - baseline, "results": fit["num_results"]}))
    """
)


def peak_extra_bytes(clients: int, model_bytes: int, workers: int) -> int:
    """Peak resident memory a one-round FedAvg simulation adds over the built model."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(clients), str(model_bytes), str(workers)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["results"] != clients:
        raise AssertionError(f"{result['results']} of {clients} clients were folded")
    return int(result["extra"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("workers", [1, 4])
def test_fedavg_round_memory_stays_a_small_multiple_of_the_model(workers: int) -> None:
    all_updates = CLIENTS * MODEL_BYTES
    extra = peak_extra_bytes(CLIENTS, MODEL_BYTES, workers)
    assert extra < all_updates / 4, (
        f"a FedAvg round over {CLIENTS} clients x {MODEL_BYTES >> 20} MiB added "
        f"{extra / 2**20:.0f} MiB at peak; holding every update would be "
        f"{all_updates / 2**20:.0f} MiB"
    )


def _counting_transport(workers: int = 2, **bounds):
    started: list[str] = []

    def runner(task: Message) -> Message:
        started.append(task.metadata.node_id)
        arrays = {"x": np.zeros(1000, np.uint8)}
        return task.reply(RecordDict(array_records={"update": arrays}))

    return InProcessTransport(runner, num_workers=workers, window=50, **bounds), started


def _tasks(count: int) -> list[Message]:
    return [
        Message.task(run_id=1, node_id=str(i), server_round=1, model_version=0,
                     message_type=MessageType.FIT, content=None)
        for i in range(count)
    ]  # fmt: skip


def _settled(started: list[str], expected: int) -> bool:
    """Whether ``started`` reaches ``expected`` and stays there for a moment."""
    deadline = time.monotonic() + 5.0
    while len(started) < expected and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    return len(started) == expected


def test_workers_wait_until_the_engine_releases_replies():
    transport, started = _counting_transport(max_pending=4)
    replies = Replies()
    try:
        transport.send(_tasks(20), replies)
        assert _settled(started, 4)  # four answered, none taken: the others wait
        assert replies.get(time.monotonic() + 5) is not None
        assert _settled(started, 4)  # taken but still in use
        assert replies.get(time.monotonic() + 5) is not None
        assert _settled(started, 4)  # one released: three held, more than half the bound
        assert replies.get(time.monotonic() + 5) is not None
        assert _settled(started, 6)  # two held: the workers refill up to the bound
        for _ in range(17):
            assert replies.get(time.monotonic() + 5) is not None
        assert len(started) == 20
    finally:
        replies.cancel()
        transport.close()


def test_reply_bytes_bound_the_replies_held_beyond_the_first():
    transport, started = _counting_transport(workers=1, max_pending_bytes=1500)
    replies = Replies()
    try:
        transport.send(_tasks(10), replies)
        assert _settled(started, 2)  # 1000 bytes held let one more start; 2000 do not
        replies.get(time.monotonic() + 5)
        replies.get(time.monotonic() + 5)  # releases the first: 1000 bytes, over half
        assert _settled(started, 2)
        replies.get(time.monotonic() + 5)  # none held: two more start, 2000 bytes again
        assert _settled(started, 4)
    finally:
        replies.cancel()
        transport.close()
    assert reply_nbytes(_tasks(1)[0].reply(RecordDict())) == 0


def test_small_replies_are_counted_when_done_and_large_ones_released():
    # 1000-byte replies are small under the default bounds, large under 1500 bytes.
    for bounds, small in (({}, True), ({"max_pending_bytes": 1500}, False)):
        transport, _ = _counting_transport(workers=1, **bounds)
        replies = Replies()
        try:
            transport.send(_tasks(3), replies)
            for done in range(3):
                assert replies.get(time.monotonic() + 5) is not None
                assert replies.consumed == (done if small else 0)
            replies.done()
            assert replies.consumed == (3 if small else 0)
        finally:
            replies.cancel()
            transport.close()


def test_a_woken_mailbox_stops_waking_once_the_transport_clears_it():
    replies = Replies()
    calls: list[int] = []
    replies.wake_when_consumed(2, lambda: calls.append(replies.consumed))
    for _ in range(3):
        replies.put(_tasks(1)[0].reply(RecordDict()))
    for _ in range(3):
        replies.get(time.monotonic() + 1)
    replies.done()
    assert calls == [2, 3]  # at and beyond the count, until cleared
    replies.wake_when_consumed(float("inf"), None)
    replies.put(_tasks(1)[0].reply(RecordDict()))
    replies.get(time.monotonic() + 1)
    replies.done()
    assert calls == [2, 3]


if __name__ == "__main__":
    for n in (1, 2, 4, 8, 16):
        print(f"workers={n}: {peak_extra_bytes(CLIENTS, MODEL_BYTES, n) / 2**20:.0f} MiB extra")
