"""A server that wants one client's update, built on the project's own server-side SecAgg+
round: five ways to open the target's masked input, each of which every honest client
must refuse (the round aborts, the model is kept, the failure names the check).

Each adversary subclasses :class:`fedhive.secagg.server_round.SecureRound`, tampers with what
it sends and reads what comes back. Whenever it holds the target's self-mask seed and
mask key together with the target's masked input, it removes the masks and compares the
result with the target's real update: ``recovered`` is then the largest error, which is
within one quantization step when the attack works.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import MessageType
from fedhive.common.errors import ConfigError
from fedhive.common.records import RecordDict
from fedhive.secagg import SecAggConfig, SecAggPlusMod, SecAggPlusWorkflow
from fedhive.secagg import primitives as p
from fedhive.secagg.client import (
    SHARE_PREFIX,
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_SHARE,
    STAGE_UNMASK,
    advert_bytes,
    pair_seed,
    share_associated,
    share_key,
    survivors_bytes,
)
from fedhive.secagg.client_checks import check_plan
from fedhive.secagg.server_round import RoundAborted, SecureRound
from test_secagg import SHAPES, run, updates

TARGET = "0"  # the node whose update the server is after
COLLUDER = "mallory"  # an enrolled site that works with the server


def _secret_of(share: bytes) -> bytes:
    """A Shamir share at x = 0 is the secret itself."""
    return int.from_bytes(share, "big").to_bytes(p.SECRET_BYTES, "big")


class Adversary(SecureRound):
    """The project's server round, with hooks to tamper and to read."""

    last: ClassVar[Adversary | None] = None
    identities: ClassVar[dict[str, bytes]] = {}  # identity secrets the server holds
    leaked: ClassVar[dict[str, dict[str, Any]]] = {}  # colluders' round state

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).last = self
        self.recovered: float | None = None
        self.target_sid = -1
        self.sent_threshold = self.threshold
        self.target_seed: bytes | None = None
        self.target_key: bytes | None = None
        self.target_masked: np.ndarray | None = None
        self.target_mask_keys: dict[int, bytes] = {}  # sid -> s_pk the target was given
        self.target_inbox: list[int] = []
        self.target_c_pk = b""
        self.target_s_pk = b""

    # hooks ----------------------------------------------------------------------------------

    def tamper(self, stage: str, contents: dict[int, Any]) -> dict[int, Any]:
        return contents

    def read(self, stage: str, peer: Any, content: Any) -> None:
        pass

    def _exchange(self, stage, contents):
        contents = self.tamper(stage, dict(contents))
        for sid, content in contents.items():
            if self.peers[sid].cid == TARGET:
                self.target_sid = sid
                if stage == STAGE_SHARE:
                    for name, advert in content.config_records.items():
                        if name.startswith("peer."):
                            self.target_mask_keys[int(name[5:])] = advert["s_pk"]
                if stage == MessageType.FIT:
                    self.target_inbox = [
                        int(k[len(SHARE_PREFIX) :])
                        for k in content.config
                        if k.startswith(SHARE_PREFIX)
                    ]
        for peer, content in super()._exchange(stage, contents):
            if peer.cid == TARGET:
                if stage == STAGE_ADVERTISE:
                    self.target_c_pk = content.config_records["secagg"]["c_pk"]
                    self.target_s_pk = content.config_records["secagg"]["s_pk"]
                if stage == MessageType.FIT:
                    self.target_masked = fl.common.parameters_to_ndarrays(content.parameters)[0]
            self.read(stage, peer, content)
            self._try_recover()
            yield peer, content

    # opening the target's input ------------------------------------------------------------

    def _try_recover(self) -> None:
        if self.recovered is not None or self.target_seed is None or self.target_key is None:
            return
        if self.target_masked is None:
            return
        masks = p.MaskExpander(self.length, self.config.ring)
        vector = self.target_masked.copy()
        vector -= masks.expand(self.target_seed)
        s_sk = p.KeyPair.from_secret(self.target_key)
        for j in self.target_inbox:
            mask = masks.expand(pair_seed(s_sk, self.target_mask_keys[j], self.run_id, self.rnd))
            if self.target_sid < j:
                vector -= mask
            else:
                vector += mask
        weight = int(vector[-1])
        flat = p.dequantize(vector[:-1], weight, self.config.clip, self.config.bits)
        want = np.concatenate([u.reshape(-1) for u in updates(64)[int(TARGET)]])
        self.recovered = float(np.max(np.abs(flat - want)))

    def combine(self, shares: dict[int, bytes]) -> bytes | None:
        if len(shares) < self.sent_threshold:
            return None
        return p.combine_shares(shares, self.sent_threshold)

    def decrypt_to(self, c_secret: bytes, sender_sid: int, receiver_sid: int, blob: bytes) -> bytes:
        """A share the target encrypted for ``receiver_sid`` under a key the server knows."""
        key = share_key(c_secret, self.target_c_pk, self.run_id, self.rnd)
        ad = share_associated(self.run_id, self.rnd, sender_sid, receiver_sid)
        return p.decrypt_share(key, blob, ad)

    def fake_advert(self, sid: int, node: str, identity: bytes) -> tuple[dict, p.KeyPair]:
        c, s = p.KeyPair(), p.KeyPair()
        signed = advert_bytes(self.run_id, self.rnd, sid, node, c.public, s.public)
        advert = {
            "c_pk": c.public,
            "s_pk": s.public,
            "id_pk": p.identity_public(identity),
            "sig": p.sign(identity, signed),
            "node": node,
        }
        return advert, c

    def _remove_masks(self, total, u2, u3, u5):
        raise RoundAborted("the adversary stops here")


def _run_against(adversary, monkeypatch, n, workflow, mods):
    import fedhive.secagg.server as server_module

    monkeypatch.setattr(server_module, "SecureRound", adversary)
    adversary.last = None
    hist, capture = run(n, workflow, secagg_mod=mods)
    record = hist.rounds[-1]
    reasons = " | ".join(f["reason"] for f in record["failures"])
    return adversary.last, record, reasons, capture


def _enrolled(n: int, colluders: tuple[str, ...] = (COLLUDER,), cls=SecAggPlusMod):
    """Per-node mods that pin every enrolled key; the server holds the colluders' keys."""
    identities = {str(i): p.new_identity() for i in range(n)}
    identities.update({c: identities.get(c, p.new_identity()) for c in colluders})
    peers = {node: p.identity_public(secret) for node, secret in identities.items()}
    mods = {
        node: cls(trusted_identities=peers, identity=secret) for node, secret in identities.items()
    }
    Adversary.identities = {c: identities[c] for c in colluders}

    def per_node(message, context, call_next):
        return mods[context.node_id](message, context, call_next)

    return per_node


def _assert_refused(adversary, record, reasons, capture, check):
    assert adversary is not None
    assert adversary.recovered is None, (
        f"the server recovered client {TARGET}'s update (error {adversary.recovered:.2e})"
    )
    assert not record["fit"].get("updated", True)
    assert check in reasons, reasons
    assert all(np.all(a == 0) for a in capture.models.get(1, [np.zeros(1)]))


# -- 1. threshold downgrade ------------------------------------------------------------------


class SplitViews(Adversary):
    """Shows the target alive to group A and dropped to group B; the others of each group
    confirm their own view only. ``forged`` colluders sign both views."""

    group_b: ClassVar[set[str]] = set()
    forged: ClassVar[tuple[str, ...]] = ()

    def _consistency(self, u3):
        self.view_a = np.array(sorted(peer.sid for peer in u3), "<i8")
        self.view_b = self.view_a[self.view_a != self._sid(TARGET)]
        contents = {}
        for peer in u3:
            view = self.view_b if peer.cid in self.group_b else self.view_a
            contents[peer.sid] = RecordDict(array_records={"secagg": {"survivors": view}})
        out = []
        for peer, content in self._exchange(STAGE_CONSISTENCY, contents):
            peer.signature = content.config_records["secagg"]["sig"]
            out.append(peer)
        self.survivor_ids = self.view_a
        return out

    def _sid(self, node: str) -> int:
        return next(sid for sid, peer in self.peers.items() if peer.cid == node)

    def _unmask(self, u2, u3, u4):
        target = self._sid(TARGET)
        signers = {peer.sid: peer for peer in u4}
        forged = {self._sid(c) for c in self.forged}
        contents = {}
        for peer in u4:
            if peer.sid in forged:
                continue
            in_b = peer.cid in self.group_b
            view = self.view_b if in_b else self.view_a
            dropped = np.array([target] if in_b else [], "<i8")
            data = survivors_bytes(self.run_id, self.rnd, view)
            sigs = {}
            for j in peer.neighbours:
                other = signers.get(j)
                if other is None:
                    continue
                if j in forged:
                    secret = self.identities[other.cid]
                    sigs[str(j)] = p.sign(secret, data)
                elif ((other.cid in self.group_b) == in_b and other.sid != target) or (
                    other.sid == target and not in_b
                ):
                    sigs[str(j)] = other.signature
            contents[peer.sid] = RecordDict(
                array_records={"secagg": {"survivors": view, "dropped": dropped}},
                config_records={"sigs": sigs},
            )
        seeds, keys = self.colluder_shares(target)
        for peer, content in self._exchange(STAGE_UNMASK, contents):
            share = content.config_records.get("seed_shares", {}).get(str(target))
            if share is not None:
                seeds[peer.sid] = share
            share = content.config_records.get("key_shares", {}).get(str(target))
            if share is not None:
                keys[peer.sid] = share
        self.target_seed, self.target_key = self.combine(seeds), self.combine(keys)
        self._try_recover()
        return list(u4)

    def colluder_shares(self, target: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Both shares of the target held by colluding participants."""
        seeds, keys = {}, {}
        for node in self.forged:
            sid = self._sid(node)
            blob = self.peers[target].shares_out.get(str(sid))
            state = self.leaked.get(node)
            if blob is None or state is None:
                continue
            plain = self.decrypt_to(state["c_sk"], target, sid, blob)
            seeds[sid], keys[sid] = plain[: len(plain) // 2], plain[len(plain) // 2 :]
        return seeds, keys


class Downgrade(SplitViews):
    """The config says t = 4; the clients are told t = 1."""

    group_b: ClassVar[set[str]] = {"3", "4", "5"}

    def tamper(self, stage, contents):
        if stage == STAGE_ADVERTISE:
            self.sent_threshold = 1
            for content in contents.values():
                content.config_records["secagg"]["threshold"] = 1
        return contents


def test_attack_1_threshold_downgrade_is_refused(monkeypatch):
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    result = _run_against(Downgrade, monkeypatch, 6, workflow, _enrolled(6))
    _assert_refused(*result, check="threshold")


# -- 2. a share at x = 0 ---------------------------------------------------------------------


class ZeroIndex(Adversary):
    """Adds a neighbour with share index 0 under the colluder's enrolled identity."""

    fakes: ClassVar[list[int]] = [0]

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            self.fake_c = {}
            for sid, content in contents.items():
                if self.peers[sid].cid == TARGET:
                    params = content.config_records["secagg"]
                    ids = np.frombuffer(params["neighbours"], "<i8").tolist() + self.fakes
                    params["neighbours"] = np.asarray(ids, "<i8").tobytes()
                    for fake in self.fakes:
                        advert, c = self.fake_advert(fake, COLLUDER, self.identities[COLLUDER])
                        content.config_records[f"peer.{fake}"] = advert
                        self.fake_c[fake] = c.secret
        return contents

    def read(self, stage, peer, content):
        if stage != STAGE_SHARE or peer.cid != TARGET:
            return
        shares = content.config_records["shares"]
        seeds, keys = {}, {}
        for fake in self.fakes:
            blob = shares.pop(str(fake), None)  # the real round never sees them
            if blob is None:
                continue
            plain = self.decrypt_to(self.fake_c[fake], peer.sid, fake, blob)
            seeds[fake], keys[fake] = plain[: len(plain) // 2], plain[len(plain) // 2 :]
        if 0 in seeds:
            self.target_seed, self.target_key = _secret_of(seeds[0]), _secret_of(keys[0])
        elif seeds:
            self.target_seed, self.target_key = self.combine(seeds), self.combine(keys)


def test_attack_2_share_index_zero_is_refused(monkeypatch):
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    result = _run_against(ZeroIndex, monkeypatch, 6, workflow, _enrolled(6))
    _assert_refused(*result, check="share index")


# -- 3. Sybil neighbours ---------------------------------------------------------------------


class Sybils(ZeroIndex):
    """Replaces t of the target's neighbours (their share indices kept, so the neighbour
    list looks right) by keys the server made, all presented as the one colluder."""

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            self.fake_c = {}
            for sid, content in contents.items():
                if self.peers[sid].cid != TARGET:
                    continue
                names = sorted(n for n in content.config_records if n.startswith("peer."))
                self.fakes = [int(n[5:]) for n in names[: self.sent_threshold]]
                for fake in self.fakes:
                    advert, c = self.fake_advert(fake, COLLUDER, self.identities[COLLUDER])
                    content.config_records[f"peer.{fake}"] = advert
                    self.fake_c[fake] = c.secret
        return contents

    def read(self, stage, peer, content):
        if stage == STAGE_SHARE and peer.cid == TARGET:
            shares = content.config_records["shares"]
            seeds, keys = {}, {}
            for fake in self.fakes:
                plain = self.decrypt_to(self.fake_c[fake], peer.sid, fake, shares[str(fake)])
                seeds[fake], keys[fake] = plain[: len(plain) // 2], plain[len(plain) // 2 :]
            self.target_seed, self.target_key = self.combine(seeds), self.combine(keys)


def test_attack_3_sybil_neighbours_are_refused(monkeypatch):
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    result = _run_against(Sybils, monkeypatch, 6, workflow, _enrolled(6))
    _assert_refused(*result, check="same node id")


# -- 4. the default threshold against a view split plus two colluders --------------------------


class Leaky(SecAggPlusMod):
    """A colluding site: runs the protocol honestly and hands its round secrets over."""

    def __call__(self, message, context, call_next):
        reply = super().__call__(message, context, call_next)
        state = context.state.config_records.get("secagg.round")
        if state is not None:
            Adversary.leaked[context.node_id] = dict(state)
        return reply


class DefaultSplit(SplitViews):
    """n = 32 with the defaults: 14 honest neighbours see the target alive, 15 dropped,
    and the two colluders confirm both views and reveal both shares."""

    group_b: ClassVar[set[str]] = {str(i) for i in range(16, 30)} | {"1"}
    forged: ClassVar[tuple[str, ...]] = ("30", "31")


def test_attack_4_default_threshold_survives_a_split_plus_two_colluders(monkeypatch):
    Adversary.leaked = {}
    mods = _enrolled(32, colluders=DefaultSplit.forged)
    leaky = {node: Leaky() for node in DefaultSplit.forged}

    def per_node(message, context, call_next):
        if context.node_id in leaky:
            mod = leaky[context.node_id]
            mod.trusted = {}  # its identity is the enrolled one (below)
            return mod(message, context, call_next)
        return mods(message, context, call_next)

    # the colluders sign with the enrolled keys the server holds
    for node, mod in leaky.items():
        mod.identity = Adversary.identities[node]
    workflow = SecAggPlusWorkflow(bits=16, clip=0.05)  # the defaults: complete graph at n = 32
    result = _run_against(DefaultSplit, monkeypatch, 32, workflow, per_node)
    _assert_refused(*result, check="threshold")


# -- 5. identity keys the server chose -------------------------------------------------------


class SwapKeys(Adversary):
    """Relays to the target neighbour keys (and identity keys) that the server made."""

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            self.fake_c = {}
            for sid, content in contents.items():
                if self.peers[sid].cid != TARGET:
                    continue
                for name in list(content.config_records):
                    if not name.startswith("peer."):
                        continue
                    j = int(name[5:])
                    node = content.config_records[name]["node"]
                    advert, c = self.fake_advert(j, node, p.new_identity())
                    content.config_records[name] = advert
                    self.fake_c[j] = c.secret
        return contents

    def read(self, stage, peer, content):
        if stage != STAGE_SHARE or peer.cid != TARGET:
            return
        seeds, keys = {}, {}
        for sid_text, blob in content.config_records["shares"].items():
            j = int(sid_text)
            plain = self.decrypt_to(self.fake_c[j], peer.sid, j, blob)
            seeds[j], keys[j] = plain[: len(plain) // 2], plain[len(plain) // 2 :]
        self.target_seed, self.target_key = self.combine(seeds), self.combine(keys)


def test_attack_5_unpinned_identities_claim_no_malicious_server_protection(monkeypatch, caplog):
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    # Without pinned identities the server can swap keys: that is the documented
    # honest-but-curious model, which the client says when it runs.
    with caplog.at_level(logging.WARNING, logger="fedhive.secagg"):
        adversary, _, _, _ = _run_against(SwapKeys, monkeypatch, 6, workflow, SecAggPlusMod())
    assert adversary.recovered is not None
    assert "honest-but-curious" in caplog.text
    # A client asked for protection against a malicious server needs pinned identities,
    # and so does a server config that asks for that model.
    with pytest.raises(ConfigError, match="pinned identities"):
        SecAggPlusMod(threat_model="malicious")
    with pytest.raises(ConfigError, match="pinned identities"):
        SecAggConfig(threat_model="malicious")
    # With them, the same swap is refused by the target.
    result = _run_against(SwapKeys, monkeypatch, 6, workflow, _enrolled(6))
    _assert_refused(*result, check="not enrolled")


# -- the honest path is unchanged ------------------------------------------------------------


def test_the_honest_server_with_pinned_identities_gives_the_plain_mean(monkeypatch):
    from test_secagg import plain_mean

    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    hist, capture = run(6, workflow, secagg_mod=_enrolled(6))
    assert hist.rounds[-1]["fit"]["updated"], hist.rounds[-1]["fit"].get("note")
    for got, want in zip(capture.models[1], plain_mean(range(6), 6), strict=True):
        assert np.max(np.abs(got - want)) <= workflow.config.quantization_error + 1e-6
    assert len(SHAPES) == 2


def test_the_malicious_model_with_a_peers_file_runs_and_the_server_checks_enrollment(tmp_path):
    from fedhive.secagg.identity import format_peer

    identities = {str(i): p.new_identity() for i in range(6)}
    mods = {
        node: SecAggPlusMod(
            trusted_identities={n: p.identity_public(s) for n, s in identities.items()},
            identity=secret,
        )
        for node, secret in identities.items()
    }
    peers = tmp_path / "peers.toml"
    lines = [format_peer(n, p.identity_public(s)) for n, s in identities.items() if n != "5"]
    peers.write_text("[identities]\n" + "\n".join(lines) + "\n")

    def per_node(message, context, call_next):
        return mods[context.node_id](message, context, call_next)

    config = SecAggConfig(
        degree="complete", threshold=4, bits=16, clip=0.05,
        threat_model="malicious", peers=str(peers),
    )  # fmt: skip
    assert mods["0"].threat_model == "malicious"
    hist, _ = run(6, SecAggPlusWorkflow(config), secagg_mod=per_node)
    record = hist.rounds[-1]
    # node 5 is not in the server's peers file: the server drops it at advertise, and its
    # neighbours (who pin it) never see it; the other five go through
    assert record["fit"]["updated"], record["fit"].get("note")
    assert [f["client_id"] for f in record["failures"]] == ["5"]
    assert "unsigned" in record["failures"][0]["reason"]


def _params(n, threshold, degree=-1):
    return {
        "n": n,
        "degree": degree,
        "corrupt_fraction": 0.1,
        "dropout_fraction": 0.1,
        "failure_probability": 1e-6,
    }


@pytest.mark.parametrize(
    "n, threshold, degree",
    [
        (6, 3, -1),  # safe bound 4 at k = 5
        (6, 6, -1),  # above k
        (32, 16, -1),  # the old default
    ],
)
def test_the_threshold_check_refuses_and_names_itself(n, threshold, degree):
    from fedhive.common.errors import ProtocolError

    with pytest.raises(ProtocolError, match="threshold check"):
        check_plan(_params(n, threshold, degree), 1, threshold, 0.0)
    k = n - 1  # the same round with an honest threshold passes
    assert check_plan(_params(n, threshold, degree), 1, (2 * k) // 3 + 1, 0.0) == k


@pytest.mark.parametrize(
    "n, announced, derived, check",
    [
        (6, [0, 2, 3, 4, 5], [2, 3, 4, 5, 6], "share index check"),
        (6, [1, 2, 3, 4, 5], [2, 3, 4, 5, 6], "share index check"),  # its own index
        (6, [2, 2, 3, 4, 5], [2, 3, 4, 5, 6], "share index check"),
        (6, [2, 3, 4, 5, 9], [2, 3, 4, 5, 6], "share index check"),  # beyond n
        (10, [2, 3, 4, 5], [2, 3, 4, 5, 6, 7], "degree check"),  # degree 6 implied, 4 given
        (10, [2, 3, 4, 5, 6, 8], [2, 3, 4, 5, 6, 7], "graph check"),  # not the derived one
    ],
)
def test_each_neighbour_check_refuses_and_names_itself(n, announced, derived, check):
    from fedhive.common.errors import ProtocolError
    from fedhive.secagg.graph import check_announced

    with pytest.raises(ProtocolError, match=check):
        check_announced(announced, derived, n, 1)
    check_announced(derived[::-1], derived, n, 1)  # the derived list, in any order, passes


def test_a_client_with_its_own_corrupt_fraction_asks_for_more():
    from fedhive.common.errors import ProtocolError

    params = _params(100, 23, degree=33)
    check_plan(params, 1, 23, SecAggPlusMod().corrupt_fraction)
    with pytest.raises(ProtocolError, match="threshold check"):
        check_plan(params, 1, 23, SecAggPlusMod(corrupt_fraction=0.4).corrupt_fraction)


class OneIdentityTwice(Adversary):
    """Relays two of the target's neighbours under one identity key the server holds."""

    def tamper(self, stage, contents):
        if stage == STAGE_SHARE:
            shared = p.new_identity()
            for sid, content in contents.items():
                if self.peers[sid].cid != TARGET:
                    continue
                names = sorted(n for n in content.config_records if n.startswith("peer."))
                for name in names[:2]:
                    node = content.config_records[name]["node"]
                    content.config_records[name] = self.fake_advert(int(name[5:]), node, shared)[0]
        return contents


def test_two_neighbours_with_one_identity_key_are_refused(monkeypatch):
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    result = _run_against(OneIdentityTwice, monkeypatch, 6, workflow, SecAggPlusMod())
    _assert_refused(*result, check="same identity key")
