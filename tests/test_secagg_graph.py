"""The neighbour graph of a SecAgg+ round is derived from every client's committed
randomness (``secagg.graph``): a server that chooses it, skips the stage, or drops or
changes a commitment or a reveal between stages is refused by the clients."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, ClassVar

import numpy as np
import pytest

from fedhive.common import MessageType
from fedhive.common.errors import ProtocolError
from fedhive.secagg import SecAggConfig, SecAggPlusWorkflow
from fedhive.secagg import graph as g
from fedhive.secagg.client import STAGE_GRAPH, STAGE_SHARE
from test_secagg import dropout_mod, plain_mean, run
from test_secagg_attacks import (
    TARGET,
    Adversary,
    Leaky,
    SplitViews,
    _assert_refused,
    _enrolled,
    _run_against,
)

# -- 6. a neighbour graph the server chose ----------------------------------------------------

SURROUND = tuple(str(i) for i in range(14, 20))  # six colluding sites of twenty


def _surrounding_graph(peers: dict[int, Any], degree: int) -> dict[int, list[int]]:
    """A Harary graph of the right shape whose cycle puts the target between the
    colluders, so that every one of its neighbours is a colluder."""
    from fedhive.secagg.graph import harary_graph

    by_cid = {peer.cid: sid for sid, peer in peers.items()}
    colluders = [by_cid[c] for c in SURROUND]
    rest = [sid for sid in sorted(peers) if sid not in colluders and sid != by_cid[TARGET]]
    half = degree // 2
    order = [*colluders[:half], by_cid[TARGET], *colluders[half:], *rest]
    return harary_graph(order, degree)


class Surround(SplitViews):
    """Draws the neighbour graph itself, with the target surrounded by colluders (within
    every shape rule: the degree, distinct share indices, one identity each); the
    colluders hand over their round secrets, so the server holds t shares of both of the
    target's secrets."""

    forged: ClassVar[tuple[str, ...]] = SURROUND

    def _neighbour_graph(self, *args: Any) -> dict[int, list[int]]:
        return _surrounding_graph(self.peers, self.degree)

    def read(self, stage, peer, content):
        if stage == MessageType.FIT and peer.cid == TARGET:
            seeds, keys = self.colluder_shares(peer.sid)
            self.target_seed, self.target_key = self.combine(seeds), self.combine(keys)


def test_attack_6_a_graph_the_server_chose_is_refused(monkeypatch):
    """corrupt_fraction 0.3 of 20 clients, degree 6, t = 6: a random graph gives the
    target six colluding neighbours with probability 1/27132 (below the failure bound);
    a server that draws the graph itself surrounds it with them. With the graph derived
    from every client's committed randomness, the target refuses the announced one."""
    Adversary.leaked = {}
    n = 20
    mods = _enrolled(n, colluders=SURROUND)
    leaky = {node: Leaky() for node in SURROUND}
    for node, mod in leaky.items():
        mod.identity = Adversary.identities[node]

    def per_node(message, context, call_next):
        if context.node_id in leaky:
            return leaky[context.node_id](message, context, call_next)
        return mods(message, context, call_next)

    config = SecAggConfig(
        degree=6, threshold=6, bits=16, clip=0.05,
        corrupt_fraction=0.3, failure_probability=0.01,
    )  # fmt: skip
    assert config.plan(n) == (6, 6)
    result = _run_against(Surround, monkeypatch, n, SecAggPlusWorkflow(config), per_node)
    _assert_refused(*result, check="graph check")


# -- the derivation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(7, 3), (10, 4), (10, 5), (40, 8), (101, 31)])
def test_every_client_derives_its_part_of_one_regular_graph(n, k):
    seed = secrets.token_bytes(32)
    graph = g.derived_graph(n, k, seed)
    want = k + 1 if k % 2 and n % 2 else k  # an odd k with odd n is raised by one
    assert sorted(graph) == list(range(1, n + 1))
    assert all(len(v) == want and i not in v for i, v in graph.items())
    assert all(i in graph[j] for i, v in graph.items() for j in v)
    assert all(g.derived_neighbours(n, k, seed, i) == graph[i] for i in graph)
    # another seed gives another graph: with n = 7 only a few hundred graphs exist, so one
    # fresh seed repeats this one now and then; five in a row practically never do
    assert any(g.derived_graph(n, k, secrets.token_bytes(32)) != graph for _ in range(5))


def test_a_clients_neighbours_are_a_uniform_subset_of_the_others():
    """Over 3000 seeds, each other client is among client 1's k neighbours with
    frequency k / (n - 1) (a chi-square test, 19 degrees of freedom)."""
    n, k, draws = 21, 6, 3000
    counts = np.zeros(n + 1)
    for i in range(draws):
        seed = hashlib.sha256(b"%d" % i).digest()
        counts[g.derived_neighbours(n, k, seed, 1)] += 1
    expected = draws * k / (n - 1)
    chi2 = float(((counts[2:] - expected) ** 2 / expected).sum())
    assert chi2 < 45  # p < 1e-3 at 19 dof is 43.8


def test_the_seed_depends_on_every_reveal():
    sids = np.arange(1, 6, dtype="<i8").tobytes()
    reveals = bytearray(secrets.token_bytes(5 * 32))
    seed = g.graph_seed(1, 2, 5, sids, bytes(reveals))
    for at in range(5):
        changed = bytearray(reveals)
        changed[at * 32] ^= 1
        assert g.graph_seed(1, 2, 5, sids, bytes(changed)) != seed
    assert g.graph_seed(1, 3, 5, sids, bytes(reveals)) != seed  # bound to the round


def test_the_commitment_list_and_the_reveals_are_checked():
    values = [secrets.token_bytes(32) for _ in range(4)]
    sids = np.array([1, 2, 4, 5], "<i8").tobytes()
    commits = b"".join(g.commitment(7, 1, s, v) for s, v in zip([1, 2, 4, 5], values, strict=True))
    g.check_commitments(sids, commits, 5, 2, commits[32:64])
    with pytest.raises(ProtocolError, match="leaves out or changes this client's own"):
        g.check_commitments(sids, commits, 5, 3, g.commitment(7, 1, 3, b"x" * 32))
    with pytest.raises(ProtocolError, match="leaves out or changes this client's own"):
        g.check_commitments(sids, commits, 5, 2, commits[:32])
    with pytest.raises(ProtocolError, match="ascend"):
        g.check_commitments(np.array([2, 1, 4, 5], "<i8").tobytes(), commits, 5, 2, commits[:32])
    with pytest.raises(ProtocolError, match="bytes of commitments"):
        g.check_commitments(sids, commits[:-1], 5, 2, commits[32:64])
    reveals = b"".join(values)
    g.check_reveals(7, 1, sids, commits, reveals)
    with pytest.raises(ProtocolError, match="dropped or added"):
        g.check_reveals(7, 1, sids, commits, reveals[:-32])
    with pytest.raises(ProtocolError, match="does not match its commitment"):
        g.check_reveals(7, 1, sids, commits, reveals[:32] + secrets.token_bytes(32) + reveals[64:])
    with pytest.raises(ProtocolError, match="does not match its commitment"):
        g.check_reveals(8, 1, sids, commits, reveals)  # another run


# -- the honest path --------------------------------------------------------------------------

WORKFLOW = {"degree": 4, "threshold": 3, "bits": 16, "clip": 0.05}


def test_an_honest_round_on_a_derived_graph_gives_the_plain_mean():
    workflow = SecAggPlusWorkflow(**WORKFLOW)
    hist, capture = run(8, workflow, rounds=2, secagg_mod=_enrolled(8))
    seeds = []
    for record in hist.rounds[1:]:
        assert record["fit"]["updated"], record["fit"].get("note")
        assert record["fit"]["secagg"]["graph"] == "derived"
        seeds.append(record["fit"]["secagg"]["graph_seed"])
    assert len(set(seeds)) == 2  # each round draws its own graph
    want = plain_mean(range(8), 8)
    for rnd in (1, 2):
        delta = [
            a - b
            for a, b in zip(capture.models[rnd], capture.models.get(rnd - 1, [0, 0]), strict=True)
        ]
        for got, ref in zip(delta, want, strict=True):
            assert np.max(np.abs(got - ref)) <= 2 * workflow.config.quantization_error + 1e-6


def test_a_client_dropping_at_the_graph_stage_ends_the_round_before_any_secret_is_shared():
    workflow = SecAggPlusWorkflow(**WORKFLOW)
    hist, capture = run(8, workflow, mods=[dropout_mod({STAGE_GRAPH: {"3"}})])
    record = hist.rounds[-1]
    assert not record["fit"]["updated"]
    assert "did not reveal" in record["fit"]["note"]
    assert [(f["client_id"], f["stage"]) for f in record["failures"]] == [("3", STAGE_GRAPH)]
    assert record["fit"]["secagg"].get(f"after_{STAGE_SHARE.split('.')[-1]}") is None
    assert all(np.all(a == 0) for a in capture.models[1])


def test_a_complete_graph_has_no_graph_stage():
    seen: set[str] = set()

    def spy(message, context, call_next):
        seen.add(message.metadata.message_type)
        return call_next(message, context)

    hist, _ = run(5, SecAggPlusWorkflow(degree="complete", threshold=3, bits=16, clip=0.05),
                  mods=[spy])  # fmt: skip
    assert hist.rounds[-1]["fit"]["updated"]
    assert hist.rounds[-1]["fit"]["secagg"]["graph"] == "complete"
    assert STAGE_GRAPH not in seen and STAGE_SHARE in seen


# -- a server that cheats around the graph stage ----------------------------------------------


class SkipGraph(Adversary):
    """Never runs the graph stage and draws the graph from its own seed."""

    def _graph(self, u1):
        graph = g.derived_graph(len(self.peers), self.degree, b"\0" * 32)
        for sid, peer in self.peers.items():
            peer.neighbours = graph[sid]
        return u1


class DropReveal(Adversary):
    """Leaves the last reveal out of what it relays."""

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            for content in contents.values():
                params = content.config_records["secagg"]
                params["reveals"] = params["reveals"][:-32]
        return contents


class ChangeReveal(Adversary):
    """Replaces the first reveal by a value of its own."""

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            fake = secrets.token_bytes(32)
            for content in contents.values():
                params = content.config_records["secagg"]
                params["reveals"] = fake + params["reveals"][32:]
        return contents


class DropOwnCommitment(Adversary):
    """Leaves the target's own commitment out of the list it is shown."""

    def tamper(self, stage, contents):
        if stage == STAGE_GRAPH:
            for sid, content in contents.items():
                if self.peers[sid].cid == TARGET:
                    params = content.config_records["secagg"]
                    ids = np.frombuffer(params["sids"], "<i8")
                    keep = ids != sid
                    params["sids"] = ids[keep].tobytes()
                    chunks = [params["commits"][i * 32 : i * 32 + 32] for i in range(len(ids))]
                    params["commits"] = b"".join(c for c, k in zip(chunks, keep, strict=True) if k)
        return contents


class Equivocate(Adversary):
    """Shows the target a list where every other commitment is the server's own, then
    relays reveals that open them and the neighbours the target will derive from them:
    the target's graph is still random (its own value is in the seed), and the
    neighbours' signed keys carry their real commitments, which the target compares."""

    def tamper(self, stage, contents):
        for sid, content in contents.items():
            if self.peers[sid].cid != TARGET:
                continue
            params = content.config_records["secagg"]
            if stage == STAGE_GRAPH:
                ids = np.frombuffer(params["sids"], "<i8").tolist()
                self.fakes = {j: secrets.token_bytes(32) for j in ids if j != sid}
                self.commits = {
                    j: g.commitment(self.run_id, self.rnd, j, v) for j, v in self.fakes.items()
                }
                own = self.peers[sid].commit
                params["commits"] = b"".join(own if j == sid else self.commits[j] for j in ids)
                self.target_ids = params["sids"]
            if stage == STAGE_SHARE:
                ids = np.frombuffer(self.target_ids, "<i8").tolist()
                own = self.reveals[ids.index(sid) * 32 : ids.index(sid) * 32 + 32]
                reveals = b"".join(own if j == sid else self.fakes[j] for j in ids)
                params["reveals"] = reveals
                seed = g.graph_seed(
                    self.run_id, self.rnd, len(self.peers), self.target_ids, reveals
                )
                mine = g.derived_neighbours(len(self.peers), self.degree, seed, sid)
                params["neighbours"] = np.asarray(mine, "<i8").tobytes()
                for name in [n for n in content.config_records if n.startswith("peer.")]:
                    del content.config_records[name]
                for j in mine:
                    peer = self.peers[j]
                    content.config_records[f"peer.{j}"] = {**peer.advert, "node": peer.cid}
        return contents


@pytest.mark.parametrize(
    "liar, check",
    [
        (SkipGraph, "skipped the graph stage"),
        (DropReveal, "dropped or added"),
        (ChangeReveal, "does not match its commitment"),
        (DropOwnCommitment, "leaves out or changes this client's own"),
        (Equivocate, "is not the one the server listed"),
    ],
)
def test_a_server_that_cheats_around_the_graph_stage_is_refused(monkeypatch, liar, check):
    result = _run_against(liar, monkeypatch, 8, SecAggPlusWorkflow(**WORKFLOW), _enrolled(8))
    _assert_refused(*result, check=check)
    assert "graph check" in result[2]


@pytest.mark.parametrize("n", [31, 33, 51, 101, 999])
def test_the_default_degree_for_an_odd_round_is_the_degree_of_its_graph(n):
    """A Harary graph on an odd number of clients needs an even degree; the planned
    degree, whose threshold the clients check, must be the one the graph has."""
    config = SecAggConfig(max_clients=1000)
    k, t = config.plan(n)
    assert config.implied_degree(n) == k
    assert len(g.derived_neighbours(n, k, secrets.token_bytes(32), 1)) == k
    assert t >= config.safe_threshold(k, n)


def test_a_default_round_with_an_odd_number_of_clients_goes_through():
    hist, _ = run(31, SecAggPlusWorkflow(bits=16, clip=0.05), num_workers=1)
    fit = hist.rounds[-1]["fit"]
    assert fit["updated"], fit.get("note")
    assert fit["secagg"]["degree"] % 2 == 0
