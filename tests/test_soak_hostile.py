"""Soak: a real server and honest clients train while hostile processes attack it.

Slow (about a minute). The honest run must end with the model of the same seeded run
without attackers, bit for bit; the server's memory must stay within a stated bound; and
every hostile client must be refused with a reason. Prints the "faults survived" table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from grpc_helpers import ROOT, client_process, finish
from test_hostile import ServerProcess

HOSTILE = ROOT / "tests" / "hostile.py"
ENROLLED = {  # attacks that need an enrolled identity (they answer tasks badly)
    "huge_num_examples": "evil-n",
    "bigint_metric": "evil-i",
    "declare_huge": "evil-d",
    "header_bomb": "evil-h",
    "stall": "evil-s",
    "junk": "evil-j",
}
UNENROLLED = ["silent", "nonascii_token", "impostor"]
TOKENS = {"h0": "token-h0", "h1": "token-h1", **{n: f"token-{n}" for n in ENROLLED.values()}}
RSS_BOUND_MIB = 200  # server peak RSS growth over its start, with every attack running
REFUSED = ("UNAUTHENTICATED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
           "FAILED_PRECONDITION")  # fmt: skip


def _run(tmp_path, attackers: bool, seconds: float = 25.0):
    args = ["--rounds", "8", "--round-timeout", "3", "--size", "65536", "--hello-timeout", "2",
            "--pause", "2.5"]  # fmt: skip
    server = ServerProcess(tmp_path, *args, tokens=TOKENS)
    procs: dict[str, subprocess.Popen] = {}
    try:
        honest = [
            client_process(
                server.address, "--pid", str(i), "--node-id", f"h{i}", "--token", TOKENS[f"h{i}"]
            )
            for i in range(2)
        ]
        if attackers:
            env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
            until = str(time.time() + seconds)
            plan = [(a, n, TOKENS[n]) for a, n in ENROLLED.items()]
            plan += [(a, "h0", TOKENS["h0"]) for a in UNENROLLED]
            # round 1 has the honest clients only: then they are in every round
            assert server.proc.stdout.readline().strip() == "round 1 done"
            for attack, node, token in plan:
                procs[attack] = subprocess.Popen(
                    [sys.executable, str(HOSTILE), server.address, attack, "--node", node,
                     "--token", token, "--repeat", "1000", "--until", until],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
        result = server.result(120)
        finish(honest, timeout=30)
        outcomes = {}
        for attack, proc in procs.items():
            out, err = proc.communicate(timeout=90)
            outcomes[attack] = json.loads(out.strip().splitlines()[-1]) if out.strip() else [err]
        return result, outcomes
    finally:
        server.kill()
        for proc in procs.values():
            proc.kill()


@pytest.mark.slow
def test_honest_training_survives_every_attack_bit_for_bit(tmp_path):
    (tmp_path / "quiet").mkdir()
    baseline, _ = _run(tmp_path / "quiet", attackers=False)
    assert baseline["rc"] == 0, baseline["stderr"][-3000:]
    attacked, outcomes = _run(tmp_path, attackers=True)
    assert attacked["rc"] == 0, attacked["stderr"][-3000:]
    honest_failures = [f for r in attacked["history"]["rounds"] for f in r.get("failures", [])
                       if f["client_id"] in ("h0", "h1")]  # fmt: skip
    assert honest_failures == []
    assert attacked["model"] == baseline["model"]  # bit for bit
    growth = attacked["rss_peak_mib"] - attacked["rss_base_mib"]
    assert growth < RSS_BOUND_MIB, growth
    failures = [f for r in attacked["history"]["rounds"] for f in r.get("failures", [])]
    refused_ids = {f["client_id"] for f in failures} | {
        r["client_id"] for r in attacked["refusals"] if r["client_id"]
    }
    rows = []
    for attack, results in outcomes.items():
        assert results, attack
        assert not any(r.startswith("attack error") for r in results), (attack, results[:3])
        if attack in ENROLLED:
            node = ENROLLED[attack]
            assert node in refused_ids, (attack, results[:3])
            reasons = [f["reason"] for f in failures if f["client_id"] == node]
            reasons += [r["reason"] for r in attacked["refusals"] if r["client_id"] == node]
            assert all(reasons), attack
        else:
            assert all(r.startswith(REFUSED) for r in results), (attack, results[:3])
        rows.append((attack, len(results), results[0][:70]))
    with_reason = sum(1 for r in attacked["refusals"] if r["reason"])
    print("\nfaults survived (loopback, 2 honest clients, 8 rounds, model 64k float32)")
    print(f"{'attack':<20} {'runs':>5}  first outcome")
    for attack, count, first in rows:
        print(f"{attack:<20} {count:>5}  {first}")
    print(f"transport refusals recorded: {len(attacked['refusals'])} ({with_reason} with reason)")
    print(f"fit failures recorded: {len(failures)}")
    print(
        f"server RSS: base {attacked['rss_base_mib']:.0f} MiB, peak {attacked['rss_peak_mib']:.0f}"
        f" MiB (quiet run: peak {baseline['rss_peak_mib']:.0f} MiB); bound +{RSS_BOUND_MIB} MiB"
    )
    print("final model equal to the quiet run: bit for bit")
