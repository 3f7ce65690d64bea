"""Faults and bad input over real gRPC: killed servers, abusive peers, many clients."""

from __future__ import annotations

import gc
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import Message, MessageType, RecordDict, ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.transport import Replies
from fedhive.transport.codec import encode_wire
from fedhive.transport.frames import PROTOCOL_VERSION
from fedhive.transport.grpc_client import ClientSecurity, ClientSession
from fedhive.transport.grpc_server import GrpcServer
from fedhive.transport.proto import fleet_pb2_grpc
from fedhive.transport.proto.fleet_pb2 import Frame
from grpc_helpers import ROOT, ServerThread, client_process, finish, message_frames

SERVER = ROOT / "tests" / "apps" / "grpc_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_process(port, checkpoint, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(
        [sys.executable, str(SERVER), "--port", str(port), "--checkpoint", str(checkpoint), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_server_killed_with_sigkill_resumes_without_losing_a_round(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    ckpt = tmp_path / "ckpt"
    first = server_process(port, ckpt, "--rounds", "3", "--pause", "30")
    clients = [
        client_process(address, "--pid", str(i), "--node-id", f"n{i}", "--persistent")
        for i in range(2)
    ]
    try:
        line = first.stdout.readline()
        assert line.strip() == "round 1 done"
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        assert (ckpt / "LATEST").read_text() == "round-000001"
        out = tmp_path / "history.json"
        second = server_process(port, ckpt, "--rounds", "3", "--resume", "--history", str(out))
        second.communicate(timeout=60)
        assert second.returncode == 0
    finally:
        for proc in clients:
            proc.kill()
        finish(clients)
    history = json.loads(out.read_text())
    rounds = [r["round"] for r in history["rounds"]]
    assert rounds == [0, 1, 2, 3]  # round 1 came from before the kill
    losses = [r["centralized"]["loss"] for r in history["rounds"]]
    assert losses == pytest.approx([0.0, 5 / 3, 10 / 3, 5.0])  # deltas 1, 2 weighted 1, 2


def raw_stream(address: str, node_id: str):
    """A hand-driven connection: returns (outbox queue, responses iterator, channel)."""
    import grpc

    channel = grpc.insecure_channel(address)
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def requests():
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    responses = fleet_pb2_grpc.FleetStub(channel).Join(requests())
    outbox.put(Frame(kind=Frame.HELLO, protocol_version=PROTOCOL_VERSION, node_id=node_id))
    assert next(responses).kind == Frame.WELCOME
    return outbox, responses, channel


def _task(node: str) -> Message:
    return Message.task(
        run_id=1, node_id=node, server_round=1, model_version=0,
        message_type=MessageType.FIT,
        content=fl.common.FitIns(ndarrays_to_parameters([np.ones(3)]), {}),
    )  # fmt: skip


def _good_session(address: str, node: str) -> threading.Thread:
    def handle(task):
        return task.reply(RecordDict(config_records={"ok": {"node": node}}))

    session = ClientSession(address, node, handle, security=ClientSecurity(insecure=True))
    thread = threading.Thread(target=session.run, daemon=True)
    thread.start()
    return thread


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("spill_bytes", [None, 1], ids=["in-memory", "on-disk"])
def test_abusive_frames_are_refused_and_everyone_else_is_served(spill_bytes):
    fds = _open_fds()
    server = GrpcServer("127.0.0.1:0", max_message_bytes=10_000, spill_bytes=spill_bytes).start()
    address = f"127.0.0.1:{server.port}"
    try:
        _good_session(address, "good")
        outbox, _responses, channel = raw_stream(address, "evil")
        assert server.client_manager.wait_for(2, timeout=10)
        # give "evil" one task so replies can be checked against it
        evil_task = _task("evil")
        mailbox = Replies()
        server.send([evil_task], mailbox)
        time.sleep(0.2)
        stray = _task("evil").reply(RecordDict())  # a reply to a task never given
        for frame in message_frames("x1", encode_wire(stray), 32):
            outbox.put(frame)
        spoof = _replace_node(evil_task.reply(RecordDict()), "good")
        for frame in message_frames("x5", encode_wire(spoof), 64):
            outbox.put(frame)
        time.sleep(0.2)
        assert mailbox.get(time.monotonic() + 5).error == "reply carried another node's id"

        def abuse(*frames):
            server.send([_task("evil")], Replies())  # a task, so an upload is expected
            time.sleep(0.1)
            for frame in frames:
                outbox.put(frame)
            time.sleep(0.1)

        abuse(Frame(kind=Frame.MESSAGE, message_id="x2", total_size=10**9, data=b"a"))
        abuse(Frame(kind=Frame.MESSAGE, message_id="x3", total_size=10, offset=5, data=b"a"))
        abuse(Frame(kind=Frame.WELCOME))
        abuse(*message_frames("x4", [b"\x05" * 200], 64))
        outbox2, _r2, channel2 = raw_stream(address, "evil2")  # no task was given to it
        for frame in message_frames("x6", [b"\x00" * 100], 64):
            outbox2.put(frame)
        time.sleep(0.5)
        reasons = " | ".join(server.refused)
        for expected in ("not given", "over the limit", "does not follow", "unexpected frame",
                         "malformed", "claims to come from", "without a task"):  # fmt: skip
            assert expected in reasons, expected
        assert all("'evil'" in r or "'evil2'" in r for r in server.refused)
        assert any("'evil2': upload without a task" in r for r in server.refused)
        outbox2.put(None)
        channel2.close()
        # the good client is still served
        replies = Replies()
        server.send([_task("good")], replies)
        reply = replies.get(time.monotonic() + 10)
        assert reply is not None and reply.error is None
        outbox.put(None)
        channel.close()
    finally:
        server.close()
    gc.collect()
    assert _open_fds() <= fds + 8  # no spill file left open (gRPC may keep a few)


def _open_upload(outbox, mid: str, declared: int = 4000) -> None:
    """The first 100 bytes of an upload of ``declared`` bytes, and then nothing more."""
    outbox.put(Frame(kind=Frame.MESSAGE, message_id=mid, total_size=declared, data=b"\0" * 100))


def test_stalled_uploads_give_their_slots_up_when_others_wait():
    # two clients open uploads and stop: with the default two staging slots they held both
    # for as long as they heartbeat, and every other client's reply waited behind them
    server = GrpcServer("127.0.0.1:0", upload_grace_s=1.0).start()
    address = f"127.0.0.1:{server.port}"
    streams = []
    try:
        _good_session(address, "good")
        streams = [raw_stream(address, f"slow{i}") for i in range(2)]
        assert server.client_manager.wait_for(3, timeout=10)
        slow = [Replies() for _ in streams]
        for i, box in enumerate(slow):
            server.send([_task(f"slow{i}")], box)
        time.sleep(0.3)
        for i, (outbox, _responses, _channel) in enumerate(streams):
            _open_upload(outbox, f"s{i}")
        deadline = time.monotonic() + 5
        while server._staging.held < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._staging.held == 2  # both slots held by uploads that do not move
        replies = Replies()
        server.send([_task("good")], replies)
        reply = replies.get(time.monotonic() + 15)
        assert reply is not None and reply.error is None  # served once the slots were freed
        for box in slow:  # the slow tasks are answered with the reason, not left waiting
            failed = box.get(time.monotonic() + 5)
            assert failed is not None and "upload" in failed.error and "slow" in failed.error
        reasons = " | ".join(server.refused)
        assert "'slow0'" in reasons and "'slow1'" in reasons and "too slow" in reasons
        for _outbox, responses, _channel in streams:  # and their streams are ended
            with pytest.raises(Exception, match=r"RESOURCE_EXHAUSTED|too slow"):
                for _ in responses:
                    pass
    finally:
        for outbox, _responses, channel in streams:
            outbox.put(None)
            channel.close()
        server.close()


def test_a_slow_upload_keeps_its_slot_while_nobody_waits():
    server = GrpcServer("127.0.0.1:0", upload_grace_s=0.5).start()
    address = f"127.0.0.1:{server.port}"
    outbox, _responses, channel = raw_stream(address, "slow")
    try:
        assert server.client_manager.wait_for(1, timeout=10)
        box = Replies()
        server.send([_task("slow")], box)
        time.sleep(0.3)
        _open_upload(outbox, "s0")
        time.sleep(2.5)  # well past the grace, but no upload waits for the slot
        assert server._staging.held == 1
        assert not server.refused
        assert box.get(time.monotonic() + 0.1) is None  # still waiting for the reply
    finally:
        outbox.put(None)
        channel.close()
        server.close()


def test_upload_rate_settings_are_checked():
    for bad in ({"upload_grace_s": 0}, {"min_upload_rate": -1.0}, {"upload_grace_s": float("nan")}):
        with pytest.raises(fl.common.errors.TransportError):
            GrpcServer("127.0.0.1:0", **bad)


def _replace_node(message: Message, node: str) -> Message:
    from dataclasses import replace

    message.metadata = replace(message.metadata, node_id=node)
    return message


@pytest.mark.parametrize("spill_bytes", [None, 1], ids=["in-memory", "on-disk"])
def test_fuzzed_frames_never_stop_the_server(spill_bytes):
    fds = _open_fds()
    server = GrpcServer("127.0.0.1:0", max_message_bytes=4096, spill_bytes=spill_bytes).start()
    address = f"127.0.0.1:{server.port}"
    rng = random.Random(1234)
    try:
        _good_session(address, "good")
        outbox, _responses, channel = raw_stream(address, "fuzzer")
        for i in range(150):
            task = _task("fuzzer")
            mailbox = Replies()
            server.send([task], mailbox)  # the fuzzer may upload one reply to this task
            data = bytearray(b"".join(encode_wire(task.reply(RecordDict()))))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
            if rng.random() < 0.2:  # a junk frame of any kind
                outbox.put(
                    Frame(
                        kind=rng.choice([0, 1, 2, 3, 4, 5, 6, 7]),
                        message_id=f"j{i}",
                        total_size=rng.randrange(10_000),
                        offset=rng.choice([0, rng.randrange(100)]),
                        data=bytes(data[:50]),
                        last=rng.random() < 0.5,
                    )
                )
            for frame in message_frames(task.metadata.message_id, [bytes(data)], 97):
                outbox.put(frame)
            mailbox.get(time.monotonic() + 0.2)
            mailbox.cancel()
        time.sleep(1.0)
        assert server.refused
        replies = Replies()
        server.send([_task("good")], replies)
        reply = replies.get(time.monotonic() + 10)
        assert reply is not None and reply.error is None
        outbox.put(None)
        channel.close()
    finally:
        server.close()
    gc.collect()
    assert _open_fds() <= fds + 8  # no spill file left open (gRPC may keep a few)


def test_one_hundred_concurrent_clients_complete_rounds():
    strategy = FedAvg(
        min_fit_clients=100, min_available_clients=100, fraction_evaluate=0.1,
        min_evaluate_clients=10,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
    )  # fmt: skip
    server = ServerThread(config=ServerConfig(num_rounds=2), strategy=strategy).start()
    procs = [
        client_process(server.address, "--sessions", "25", "--node-id", f"p{p}") for p in range(4)
    ]
    history = server.join(timeout=120)
    results = finish(procs, timeout=60)
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    assert [r["fit"]["num_results"] for r in history.rounds] == [100, 100]
    assert history.rounds[-1]["distributed"]["num_results"] == 10
