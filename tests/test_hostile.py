"""One hostile client or a hostile network cannot crash, stall or exhaust the server.

Each test runs a real deployment server process (``tests/apps/hostile_server.py``) on
127.0.0.1, an honest client process, and an attack from ``tests/hostile.py``; the run must
finish with the honest client's model, and the hostile client is refused with a reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hostile
from grpc_helpers import ROOT, client_process, finish

SERVER = ROOT / "tests" / "apps" / "hostile_server.py"
TOKENS = {"h0": "token-h0", "h1": "token-h1", "evil": "token-evil", "evil2": "token-evil2"}


class ServerProcess:
    """``hostile_server.py`` in a process: ``address`` once listening, ``result()`` at the end."""

    def __init__(self, tmp_path: Path, *args: str, tokens=TOKENS) -> None:
        self.out = tmp_path / f"server-{time.monotonic_ns()}.json"
        cmd = [sys.executable, str(SERVER), "--out", str(self.out), *args]
        if tokens is not None:
            tokens_file = tmp_path / "tokens.json"
            tokens_file.write_text(json.dumps(tokens))
            cmd += ["--tokens", str(tokens_file)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()[-3000:]}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def result(self, timeout: float = 60.0) -> dict:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the server did not finish: {err[-3000:]}") from None
        assert self.out.exists(), f"the server crashed (rc {self.proc.returncode}): {err[-3000:]}"
        data = json.loads(self.out.read_text())
        data["rc"], data["stderr"] = self.proc.returncode, err
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def honest(address: str, node: str = "h0", pid: int = 0) -> subprocess.Popen:
    return client_process(address, "--pid", str(pid), "--node-id", node, "--token", TOKENS[node])


def in_thread(fn, *args) -> list:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    out.append(thread)
    return out


def fit_failures(result: dict) -> list[dict]:
    return [f for r in result["history"]["rounds"] for f in r.get("failures", [])]


def honest_model(size: int = 4) -> list[str]:
    return [np.ones(size, np.float32).tobytes().hex()]  # h0 sends parameters + 1


def run_one_attack(tmp_path, attack, *server_args):
    server = ServerProcess(tmp_path, "--rounds", "1", "--round-timeout", "20", *server_args)
    try:
        client = honest(server.address)
        evil = in_thread(attack, server.address, "evil", TOKENS["evil"])
        result = server.result(60)
        finish([client])
        return result, evil
    finally:
        server.kill()


# -- item 1: an exception while folding one reply is that client's failure ---------------


@pytest.mark.parametrize(
    ("attack", "reason"),
    [(hostile.huge_num_examples, "num_examples"), (hostile.bigint_metric, "int")],
    ids=["num_examples_2**60", "metric_5000_digits"],
)
def test_one_bad_reply_is_that_clients_failure_and_the_run_goes_on(tmp_path, attack, reason):
    ckpt = tmp_path / "ckpt"
    result, _ = run_one_attack(tmp_path, attack, "--checkpoint", str(ckpt))
    assert result["rc"] == 0, result["stderr"][-3000:]
    (record,) = [r for r in result["history"]["rounds"] if r["round"] == 1]
    assert record["fit"]["num_results"] == 1
    failures = fit_failures(result)
    assert [f["client_id"] for f in failures] == ["evil"], failures
    assert failures[0]["round"] == 1 and failures[0]["stage"] == "fit"
    assert reason in failures[0]["reason"], failures[0]
    assert result["model"] == honest_model()
    assert (ckpt / "LATEST").read_text() == "round-000001"  # the checkpoint was written


def test_integers_are_bounded_when_decoded():
    from fedhive.common.errors import SerdeError
    from fedhive.common.serde import decode_scalars, encode_scalars

    for fine in (0, -(1 << 63), (1 << 64) - 1, 12345):
        assert decode_scalars(encode_scalars({"x": fine})) == {"x": fine}
    for bad in (1 << 64, -(1 << 63) - 1, 10**5000):
        with pytest.raises(SerdeError, match="64-bit"):
            decode_scalars(encode_scalars({"x": bad}))


def test_history_with_any_decoded_metric_can_be_written():
    from fedhive.server.history import History

    history = History()
    history.add_round({"round": 1, "fit": {"metrics": {"a": float("nan"), "b": (1 << 64) - 1}}})
    assert json.loads(history.to_json())["rounds"][0]["fit"]["metrics"]["b"] == (1 << 64) - 1


def test_any_exception_while_folding_a_reply_is_that_clients_failure():
    from types import SimpleNamespace

    from fedhive.common import Message, MessageType, ndarrays_to_parameters
    from fedhive.common.records import FitRes, Status
    from fedhive.server.stages import fold_fit_reply
    from fedhive.server.strategy import FedAvg

    class Broken:
        def add(self, client, res):
            raise RuntimeError("boom")

    model = [np.zeros(3, np.float32)]
    task = Message.task(run_id=1, node_id="c1", server_round=3, model_version=0,
                        message_type=MessageType.FIT, content=None)  # fmt: skip
    driver = SimpleNamespace(server_round=3, strategy=FedAvg())
    good = task.reply(FitRes(Status(), ndarrays_to_parameters(model), 5, {}))
    failure = fold_fit_reply(driver, good, Broken(), model)
    assert (failure.client_id, failure.server_round, failure.stage) == ("c1", 3, "fit")
    assert "RuntimeError: boom" in failure.reason
    huge = task.reply(FitRes(Status(), ndarrays_to_parameters(model), 1 << 70, {}))
    aggregator = FedAvg().fit_aggregator(3, ndarrays_to_parameters(model))
    failure = fold_fit_reply(driver, huge, aggregator, model)
    assert "num_examples" in failure.reason


# -- item 3: an upload is bounded by what its task can need ---------------------------------


@pytest.mark.parametrize(
    ("declared", "spill"), [(10**12, "1"), (4 << 30, "0")], ids=["1e12-on-disk", "4GiB-in-memory"]
)
def test_declared_upload_size_is_bounded_by_the_task(tmp_path, declared, spill):
    attack = functools.partial(hostile.declare_huge, declared=declared)
    result, _ = run_one_attack(
        tmp_path, attack, "--spill-bytes", spill, "--spill-dir", str(tmp_path)
    )
    assert result["rc"] == 0, result["stderr"][-3000:]
    failures = fit_failures(result)
    assert [f["client_id"] for f in failures] == ["evil"], failures
    match = re.search(r"declares (\d+) bytes, over the limit of (\d+)", failures[0]["reason"])
    assert match, failures[0]
    assert int(match.group(2)) < 4 << 20  # a 16-byte model: about the margin, no more
    assert result["model"] == honest_model()
    assert result["rss_peak_mib"] - result["rss_base_mib"] < 120


# -- item 5: the header of a reply is bounded by the model's layout -------------------------


def test_header_amplification_is_refused_by_the_model_layout(tmp_path):
    # a 1M-element model lets an upload of ~8 MiB through; its header may not list 100k arrays
    attack = functools.partial(hostile.header_bomb, entries=100_000)
    result, _ = run_one_attack(tmp_path, attack, "--size", str(1 << 20))
    assert result["rc"] == 0, result["stderr"][-3000:]
    failures = fit_failures(result)
    assert [f["client_id"] for f in failures] == ["evil"], failures
    assert re.search(
        r"header (of \d+ bytes is over the limit|lists 100000 arrays)", failures[0]["reason"]
    ), failures[0]
    assert result["model"] == honest_model(1 << 20)
    assert result["rss_peak_mib"] - result["rss_base_mib"] < 150


def test_total_spill_bytes_are_bounded(tmp_path, monkeypatch):
    from fedhive.common import Message
    from fedhive.common.records import FitRes, Status, ndarrays_to_parameters
    from fedhive.common.records import parameters_to_ndarrays as arrays_of
    from fedhive.transport.uploads import SpillBudget as _SpillBudget
    from grpc_helpers import engine_over_sessions

    on_disk: list[int] = []
    take = _SpillBudget._take

    def tracking(self, nbytes):
        take(self, nbytes)
        on_disk.append(self.bytes)

    monkeypatch.setattr(_SpillBudget, "_take", tracking)

    def handler(node):
        def handle(task: Message) -> Message:
            params = [p + 1.0 for p in arrays_of(task.content.parameters)]
            return task.reply(FitRes(Status(), ndarrays_to_parameters(params), 1, {}))

        return handle

    model = [np.zeros(100_000, np.float32)]
    history, _, _ = engine_over_sessions(
        model, handler, ["a", "b", "c"], spill_bytes=1, spill_dir=tmp_path, max_spill_bytes=1
    )
    assert [r["fit"]["num_results"] for r in history.rounds] == [3, 3]
    assert len(on_disk) == 6 and max(on_disk) < 2 * 400_000  # one upload on disk at a time


# -- item 4: streams that never say HELLO are closed, and only so many at once ---------------


def test_streams_that_never_say_hello_are_closed_and_limited(tmp_path):
    server = ServerProcess(
        tmp_path, "--rounds", "1", "--hello-timeout", "3", "--max-handshakes", "20"
    )
    try:
        start = time.monotonic()
        peers = [hostile.RawPeer(server.address, hello=False) for _ in range(30)]
        ends = [peer.end(15.0) for peer in peers]
        took = time.monotonic() - start
        for peer in peers:
            peer.close()
        assert all(e != "timeout" for e in ends), ends
        assert sum("RESOURCE_EXHAUSTED" in e for e in ends) >= 10, ends
        assert sum("no HELLO within" in e for e in ends) >= 1, ends
        assert took < 10
        clients = [honest(server.address, "h0", 0), honest(server.address, "h1", 1)]
        result = server.result(60)
        finish(clients)
    finally:
        server.kill()
    assert result["rc"] == 0 and result["history"]["rounds"][-1]["fit"]["num_results"] == 2
    stages = {r["stage"] for r in result["refusals"]}
    assert "hello" in stages, result["refusals"][:3]
    assert all(set(r) == {"client_id", "round", "stage", "reason"} for r in result["refusals"])


def test_the_server_sets_connection_idle_and_age_limits():
    from fedhive.transport.grpc_server import GrpcServer

    options = dict(GrpcServer("127.0.0.1:0")._options())
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_connection_idle_ms"] > 0
    assert options["grpc.server_handshake_timeout_ms"] > 0
    assert options["grpc.max_concurrent_streams"] >= 1


# -- item 8: a second server on a port in use fails --------------------------------------------


def test_a_second_server_on_a_port_in_use_fails(tmp_path):
    first = ServerProcess(tmp_path, "--rounds", "1")
    try:
        out = tmp_path / "second.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        second = subprocess.run(
            [sys.executable, str(SERVER), "--port", str(first.port), "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "listening" not in second.stdout
        assert second.returncode != 0
        assert "address already in use" in json.loads(out.read_text())["error"]
    finally:
        first.kill()


# -- item 9: tokens compared as bytes; refusals bounded, escaped; repeat offenders dropped -----


def test_a_non_ascii_token_is_refused_not_a_crash(tmp_path):
    server = ServerProcess(tmp_path, "--rounds", "1")
    try:
        outcome = hostile.nonascii_token(server.address, "h0", "")
        assert outcome.startswith("UNAUTHENTICATED"), outcome
        assert hostile.impostor(server.address, "h0", TOKENS["h0"]).startswith("UNAUTHENTICATED")
    finally:
        server.kill()


def test_refused_frames_are_bounded_escaped_and_repeat_offenders_dropped(caplog):
    from fedhive.transport.grpc_server import GrpcServer

    server = GrpcServer("127.0.0.1:0").start()
    address = f"127.0.0.1:{server.port}"
    try:
        with caplog.at_level("INFO", logger="fedhive.server"):
            ends = []
            for i in range(4):
                peer = hostile.RawPeer(address, f"evil\x1b[2J\nINFO forged line {i}")
                assert peer.welcome() == "welcome"
                for _ in range(300):
                    peer.put(hostile.Frame(kind=hostile.Frame.WELCOME))
                ends.append(peer.end(5.0))
                peer.close()
        assert all("too many refused frames" in e for e in ends), ends
        assert len(server.refused) <= server.max_refused_kept
        assert len(server.refusals) <= server.max_refused_kept
        assert all("\x1b" not in r and "\n" not in r for r in server.refused)
        logged = [r.getMessage() for r in caplog.records]
        assert all("\x1b" not in m and "\n" not in m for m in logged)
        assert len(logged) < 4 * 40  # rate-limited: not one line per refused frame
    finally:
        server.close()


# -- item 6: work the engine gave up on is dropped; deployments have a round timeout --------


def test_abandoned_tasks_are_dropped_and_free_their_model():
    import gc
    import weakref

    from fedhive.common import Message, MessageType, ndarrays_to_parameters
    from fedhive.common.records import FitIns
    from fedhive.transport import Replies
    from fedhive.transport.grpc_server import GrpcServer

    server = GrpcServer("127.0.0.1:0").start()
    peer = hostile.RawPeer(f"127.0.0.1:{server.port}", "staller")
    try:
        assert peer.welcome() == "welcome"
        freed = []
        for rnd in range(1, 6):
            model = [np.full(1 << 20, rnd, np.float32)]
            weakref.finalize(model[0], freed.append, rnd)
            task = Message.task(run_id=1, node_id="staller", server_round=rnd, model_version=rnd,
                                message_type=MessageType.FIT,
                                content=FitIns(ndarrays_to_parameters(model), {}))  # fmt: skip
            replies = Replies()
            server.send([task], replies)
            del task, model
            time.sleep(0.2)
            replies.cancel()  # the engine gave up on it (deadline)
        time.sleep(2.5)
        gc.collect()
        conn = server._connections["staller"]
        assert conn.pending == {}
        assert sorted(freed) == [1, 2, 3, 4, 5]
    finally:
        peer.close()
        server.close()


def test_deployments_get_a_default_round_timeout():
    import fedhive as fl
    from fedhive.server import RoundCallback, ServerConfig
    from fedhive.server.start import DEFAULT_ROUND_TIMEOUT
    from fedhive.server.strategy import FedAvg
    from grpc_helpers import ServerThread

    seen = []

    class Seen(RoundCallback):
        def on_run_start(self, engine):
            seen.append(engine.config.round_timeout)

    model = fl.common.ndarrays_to_parameters([np.zeros(4)])
    strategy = FedAvg(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0,
                      initial_parameters=model)  # fmt: skip
    server = ServerThread(config=ServerConfig(num_rounds=1), strategy=strategy, callbacks=[Seen()])
    server.start()
    client = client_process(server.address)
    server.join(60)
    finish([client])
    assert seen == [DEFAULT_ROUND_TIMEOUT] and 0 < DEFAULT_ROUND_TIMEOUT <= 3600


# -- item 7: node ids bound to credentials -------------------------------------------------


def test_with_mutual_tls_and_no_tokens_the_node_id_is_the_certificates(tmp_path):
    import grpc

    from fedhive.transport.grpc_server import GrpcServer, ServerSecurity
    from grpc_helpers import make_certificates

    certs = {k: v.read_bytes() for k, v in make_certificates(tmp_path).items()}
    security = ServerSecurity((certs["ca"], certs["server"], certs["server_key"]), True)
    server = GrpcServer("127.0.0.1:0", security=security).start()
    creds = grpc.ssl_channel_credentials(certs["ca"], certs["client_key"], certs["client"])
    try:
        squatter = hostile.RawPeer(f"127.0.0.1:{server.port}", "alice", credentials=creds)
        outcome = squatter.welcome()
        squatter.close()
        assert outcome.startswith("UNAUTHENTICATED") and "certificate" in outcome, outcome
        owner = hostile.RawPeer(f"127.0.0.1:{server.port}", "client-0", credentials=creds)
        assert owner.welcome() == "welcome"  # the id its certificate names (CN)
        owner.close()
    finally:
        server.close()


def test_with_mutual_tls_and_tokens_the_certificate_and_token_name_the_same_node(tmp_path):
    """One site's certificate with another site's token does not get in: under mutual TLS
    the node id must be a name of the certificate, tokens or not."""
    import grpc

    from fedhive.transport.grpc_server import GrpcServer, ServerSecurity
    from grpc_helpers import make_certificates

    certs = {k: v.read_bytes() for k, v in make_certificates(tmp_path).items()}
    tokens = {"client-0": "token-0", "site-b": "token-b"}
    security = ServerSecurity((certs["ca"], certs["server"], certs["server_key"]), True, tokens)
    server = GrpcServer("127.0.0.1:0", security=security).start()
    creds = grpc.ssl_channel_credentials(certs["ca"], certs["client_key"], certs["client"])
    try:
        # certified as client-0, holding site-b's token
        impostor = hostile.RawPeer(f"127.0.0.1:{server.port}", "site-b", "token-b",
                                   credentials=creds)  # fmt: skip
        outcome = impostor.welcome()
        impostor.close()
        assert outcome.startswith("UNAUTHENTICATED") and "certificate" in outcome, outcome
        owner = hostile.RawPeer(f"127.0.0.1:{server.port}", "client-0", "token-0",
                                credentials=creds)  # fmt: skip
        assert owner.welcome() == "welcome"
        owner.close()
    finally:
        server.close()


def test_a_server_without_client_authentication_says_so_loudly(caplog):
    import fedhive as fl
    from fedhive.server import ServerConfig
    from grpc_helpers import ServerThread

    model = fl.common.ndarrays_to_parameters([np.zeros(2)])
    strategy = fl.server.strategy.FedAvg(min_available_clients=1, initial_parameters=model)
    with caplog.at_level("WARNING", logger="fedhive.server"):
        server = ServerThread(config=ServerConfig(num_rounds=1, round_timeout=1),
                              strategy=strategy, wait_timeout=0.5).start()  # fmt: skip
        server.join(60)
    assert any("NO CLIENT AUTHENTICATION" in r.getMessage() for r in caplog.records)
