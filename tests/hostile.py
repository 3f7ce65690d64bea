"""Hostile peers of a fedhive gRPC server: raw streams that break the protocol on purpose.

Used by the hostile-input tests (each attack against a real server process) and by the
soak test, which runs ``python tests/hostile.py ADDRESS ATTACK --repeat N`` in processes of
its own. Every attack returns a short outcome string: how the server answered it.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fedhive.common import Message  # noqa: E402
from fedhive.common.records import FitIns, FitRes, Parameters, Status  # noqa: E402
from fedhive.transport.codec import decode_wire, encode_wire  # noqa: E402
from fedhive.transport.frames import PROTOCOL_VERSION, Assembler  # noqa: E402
from fedhive.transport.proto import fleet_pb2_grpc  # noqa: E402
from fedhive.transport.proto.fleet_pb2 import Frame  # noqa: E402
from fedhive.transport.wire import message_frame_bytes  # noqa: E402

_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, as another host has
]


class RawPeer:
    """One hand-driven ``Join`` stream: frames go in with :meth:`put`, come out of a queue."""

    def __init__(self, address: str, node_id: str = "", token: str = "", *, hello: bool = True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:  # fmt: skip
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=_OPTIONS)
        self.outbox: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()
        self.inbox: queue.SimpleQueue[Frame | BaseException | None] = queue.SimpleQueue()
        self.call = fleet_pb2_grpc.FleetStub(self.channel).Join(self._requests())
        self.assembler = Assembler(1 << 30)
        threading.Thread(target=self._read, daemon=True).start()
        if hello:
            self.put(Frame(kind=Frame.HELLO, protocol_version=PROTOCOL_VERSION,
                           node_id=node_id, token=token))  # fmt: skip

    def _requests(self):
        while True:
            item = self.outbox.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for frame in self.call:
                self.inbox.put(frame)
            self.inbox.put(None)
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def put(self, frame: Frame | bytes) -> None:
        self.outbox.put(frame if isinstance(frame, Frame) else Frame.FromString(frame))

    def next(self, timeout: float) -> Frame | BaseException | str | None:
        """The next frame, the error that ended the stream, ``None`` at its end, or
        ``"timeout"``."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return "timeout"

    def welcome(self, timeout: float = 10.0) -> str:
        """``"welcome"`` or how the server refused the HELLO."""
        return outcome(self.next(timeout))

    def task(self, timeout: float = 30.0) -> Message | str:
        """The next complete task, or how the stream ended."""
        end = time.monotonic() + timeout
        while True:
            item = self.next(max(0.01, end - time.monotonic()))
            if not isinstance(item, Frame):
                return outcome(item)
            if item.kind == Frame.BYE:
                return "bye: " + item.text
            if item.kind != Frame.MESSAGE:
                continue
            done = self.assembler.add(item)
            if done is not None:
                return decode_wire(done[1])

    def send(self, message: Message, chunk: int = 1 << 20) -> None:
        for raw in message_frame_bytes("u-" + message.metadata.message_id,
                                       encode_wire(message), chunk):  # fmt: skip
            self.put(raw)

    def heartbeat(self) -> None:
        self.put(Frame(kind=Frame.HEARTBEAT))

    def end(self, timeout: float = 10.0) -> str:
        """How the stream ends (waits up to ``timeout``; frames in between are skipped)."""
        stop = time.monotonic() + timeout
        while time.monotonic() < stop:
            item = self.next(max(0.01, stop - time.monotonic()))
            if not isinstance(item, Frame):
                return outcome(item)
        return "timeout"

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()
        self.channel.close()


def outcome(item: object) -> str:
    if isinstance(item, Frame):
        return "welcome" if item.kind == Frame.WELCOME else f"frame {item.kind}"
    if isinstance(item, grpc.RpcError):
        return f"{item.code().name}: {item.details()}"
    return "closed" if item is None else str(item)


def _fit_reply(task: Message, *, num_examples: int = 1, metrics=None, arrays=None) -> Message:
    content = task.content
    params = content.parameters if isinstance(content, FitIns) else Parameters(arrays=[])
    return task.reply(FitRes(Status(), params if arrays is None else Parameters(arrays=arrays),
                             num_examples, metrics or {}))  # fmt: skip


# -- the attacks (each takes an enrolled or unenrolled identity and returns an outcome) ------


def _answer_fit(address: str, node: str, token: str, make_reply) -> str:
    """Join as an enrolled client and answer the first fit task with ``make_reply(task)``."""
    peer = RawPeer(address, node, token)
    try:
        hello = peer.welcome()
        if hello != "welcome":
            return hello
        while True:
            task = peer.task(60.0)
            if isinstance(task, str):
                return task
            if task.metadata.message_type == "fit":
                break
            peer.send(task.error_reply("not answering that"))
        make_reply(peer, task)
        return "sent " + peer.end(5.0)
    finally:
        peer.close()


def huge_num_examples(address: str, node: str, token: str) -> str:
    return _answer_fit(address, node, token,
                       lambda p, t: p.send(_fit_reply(t, num_examples=1 << 60)))  # fmt: skip


def bigint_metric(address: str, node: str, token: str) -> str:
    return _answer_fit(address, node, token,
                       lambda p, t: p.send(_fit_reply(t, metrics={"x": 10**5000})))  # fmt: skip


def declare_huge(address: str, node: str, token: str, declared: int = 10**12) -> str:
    """A reply that declares ``declared`` bytes and then streams 64 MiB towards it."""

    def attack(peer: RawPeer, task: Message) -> None:
        block = b"\x00" * (1 << 20)
        for i in range(64):
            peer.put(Frame(kind=Frame.MESSAGE, message_id="big", total_size=declared,
                           offset=i << 20, data=block))  # fmt: skip

    return _answer_fit(address, node, token, attack)


def header_bomb(address: str, node: str, token: str, entries: int = 200_000) -> str:
    """A reply listing ``entries`` empty arrays (a large JSON header, no data)."""
    empty = np.zeros(0, np.float32)

    def attack(peer: RawPeer, task: Message) -> None:
        peer.send(_fit_reply(task, arrays=[empty] * entries))

    return _answer_fit(address, node, token, attack)


def stall(address: str, node: str, token: str, seconds: float = 8.0) -> str:
    """Take a task and only ever heartbeat."""
    peer = RawPeer(address, node, token)
    try:
        hello = peer.welcome()
        if hello != "welcome":
            return hello
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            peer.heartbeat()
            item = peer.next(1.0)
            if item is None or isinstance(item, BaseException):
                return outcome(item)
        return "stalled"
    finally:
        peer.close()


def junk(address: str, node: str, token: str) -> str:
    """Join, then send frames of the wrong kind until the server hangs up."""
    peer = RawPeer(address, node, token)
    try:
        hello = peer.welcome()
        if hello != "welcome":
            return hello
        for i in range(200):
            peer.put(Frame(kind=Frame.WELCOME, text="\x1b[31m" + "junk" * i))
        return peer.end(10.0)
    finally:
        peer.close()


def silent(address: str, node: str, token: str, streams: int = 50, seconds: float = 30.0) -> str:
    """Open ``streams`` streams that never say HELLO; how the first one ended."""
    peers = [RawPeer(address, hello=False) for _ in range(streams)]
    try:
        return peers[0].end(seconds)
    finally:
        for peer in peers:
            peer.close()


def nonascii_token(address: str, node: str, token: str) -> str:
    peer = RawPeer(address, node, "tök\u00e9n-\u2603")
    try:
        return peer.welcome()
    finally:
        peer.close()


def impostor(address: str, node: str, token: str) -> str:
    """Claim ``node`` (somebody else's id) with a wrong token."""
    peer = RawPeer(address, node, token + "-guess")
    try:
        return peer.welcome()
    finally:
        peer.close()


ATTACKS = {
    "huge_num_examples": huge_num_examples,
    "bigint_metric": bigint_metric,
    "declare_huge": declare_huge,
    "header_bomb": header_bomb,
    "stall": stall,
    "junk": junk,
    "silent": silent,
    "nonascii_token": nonascii_token,
    "impostor": impostor,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--node", default="hostile")
    parser.add_argument("--token", default="")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--until", type=float, default=None, help="stop at this time.time()")
    args = parser.parse_args()
    outcomes = []
    for _ in range(args.repeat):
        if args.until is not None and time.time() > args.until:
            break
        try:
            outcomes.append(ATTACKS[args.attack](args.address, args.node, args.token))
        except Exception as exc:  # an attack that cannot even run is an outcome too
            outcomes.append(f"attack error {type(exc).__name__}: {exc}")
    print(json.dumps(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
