"""One SecAgg+ round on the server, stage by stage (:class:`SecureRound`), run by
:class:`fedhive.secagg.server.SecAggPlusWorkflow`: advertise keys, derive the neighbour
graph from the clients' committed randomness, share keys, collect masked inputs, check
consistency, unmask. Protocol: Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"; Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" for the complete graph and the consistency check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedhive.common.errors import ClientFailure, ConfigError, ProtocolError
from fedhive.common.message import MessageType, derive_seed
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArrays,
    RecordDict,
    Scalar,
    parameters_to_ndarrays,
)
from fedhive.secagg import graph as g
from fedhive.secagg import primitives as p
from fedhive.secagg.config import SecAggConfig
from fedhive.secagg.messages import (
    MASK_KEY,
    PARAMS,
    SHARE_PREFIX,
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_GRAPH,
    STAGE_SHARE,
    STAGE_UNMASK,
    advert_bytes,
    pair_seed,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.engine import RoundDriver
from fedhive.server.stages import RoundAborted as _StageAborted
from fedhive.server.strategy.composed import cast_like

__all__ = ["CLIPPING_NORM_KEY", "MAX_ROUNDING_RATIO", "RoundAborted", "SecureRound"]

log = logging.getLogger("fedhive.secagg")

#: The most the rounding bound beta may be against the DP clipping norm C.
MAX_ROUNDING_RATIO = 0.1
#: The fit config key of the DP wrappers' clipping norm (fedhive.privacy.central).
CLIPPING_NORM_KEY = "dp_clipping_norm"


class RoundAborted(_StageAborted):
    """The secure round cannot finish; the model stays as it was."""


@dataclass
class _Peer:
    """What the server knows of one client in this round."""

    cid: str
    sid: int
    ins: FitIns
    neighbours: list[int]
    advert: dict[str, Scalar] = field(default_factory=dict)
    shares_out: dict[str, Scalar] = field(default_factory=dict)
    metrics: dict[str, Scalar] = field(default_factory=dict)
    s_pk: bytes = b""  # its mask public key, once its advertisement checked out
    commit: bytes = b""  # its commitment to its share of the graph's randomness
    signature: bytes = b""
    revealed: dict[str, dict[str, Scalar]] = field(default_factory=dict)


class SecureRound:
    """One round of the protocol, stage by stage."""

    def __init__(
        self,
        config: SecAggConfig,
        driver: RoundDriver,
        instructions: list[tuple[ClientProxy, FitIns]],
        weighting: str,
        codec: Any = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.rnd = driver.server_round
        self.run_id = driver.engine.run_id
        self.weighting = weighting
        self.failures: list[ClientFailure] = []
        self.survivors: list[_Peer] = []
        n = len(instructions)
        self.stats: dict[str, Any] = {"clients": n}
        self.peers: dict[int, _Peer] = {}
        self.seconds: dict[str, float] = {}
        self.degree, self.threshold = 0, 1
        # Round sizes are known only now; a size the config cannot serve ends the round.
        self._unusable = "secure aggregation needs at least 2 clients in a round" if n < 2 else ""
        self.dp_bound: float | None = None  # C + beta when the DP wrappers clip to C
        self.dp_rounding = 0.0
        self.enrolled: dict[str, bytes] | None = None
        if config.peers:
            from fedhive.secagg.identity import load_peers

            try:
                self.enrolled = load_peers(config.peers)
            except ConfigError as exc:
                self._unusable = str(exc)
                return
        if not self._unusable:
            try:
                self.degree, self.threshold = config.plan(n)
            except ConfigError as exc:
                self._unusable = str(exc)
        if self._unusable:
            return
        # The graph comes from every client's committed randomness (secagg.graph), unless
        # it is complete: then there is nothing to choose.
        self.complete = self.degree >= n - 1
        self.reveals = b""
        self.peers = {
            sid: _Peer(client.cid, sid, ins, [j for j in range(1, n + 1) if j != sid])
            for sid, (client, ins) in enumerate(instructions, start=1)
        }
        self.stats.update(degree=self.degree, threshold=self.threshold)
        self.stats["graph"] = "complete" if self.complete else "derived"
        self.stats["ring_bits"], self.stats["bits"] = config.ring, config.bits
        self.reference = parameters_to_ndarrays(driver.engine.parameters)
        self.length = sum(int(r.size) for r in self.reference) + 1
        norm = instructions[0][1].config.get(CLIPPING_NORM_KEY)
        self.codec: Any = None
        if codec is not None:
            self._use_codec(codec, n, has_dp=isinstance(norm, int | float) and norm > 0)
            if self._unusable:
                return
        if isinstance(norm, int | float) and not isinstance(norm, bool) and norm > 0:
            beta = p.rounding_bound(self.length - 1, config.clip, config.bits)
            self.stats["dp_rounding_bound"] = beta
            if beta > MAX_ROUNDING_RATIO * norm:
                self._unusable = (
                    f"the rounding error of secure aggregation (beta = {beta:.3g} in L2 norm "
                    f"for {self.length - 1} parameters, bits={config.bits}, clip="
                    f"{config.clip}) is not small against the DP clipping norm C = {norm:g} "
                    f"(at most {MAX_ROUNDING_RATIO:g} C); raise bits or lower clip (|x_i| <= "
                    "C anyway, so clip = C is safe)"
                )
                return
            self.dp_rounding = beta
            self.dp_bound = float(norm) + beta

    def _use_codec(self, codec: Any, n: int, has_dp: bool) -> None:
        """Encode with ``codec`` this round: its ring integers are what is masked."""
        from fedhive.secagg.coded import server_codec

        if has_dp:
            self._unusable = (
                "compression with secure aggregation and DP clipping: the rounding bound of "
                "the codec's grid is not accounted; drop one of the three"
            )
            return
        seed = derive_seed(self.driver.engine.seed, self.rnd, "", "codec")
        weighted = self.weighting == "num_examples"
        try:
            self.codec, self.codec_params = server_codec(
                codec, self.config, n, weighted, seed, self.length - 1
            )
        except ConfigError as exc:
            self._unusable = str(exc)
            return
        self.length = self.codec.length
        self.stats["codec"] = codec.id

    # -- plumbing -------------------------------------------------------------------------

    def _exchange(self, stage: str, contents: Mapping[int, Any]) -> Iterable[tuple[_Peer, Any]]:
        """Send each peer its content; yield (peer, reply content) for good replies."""
        by_cid = {self.peers[sid].cid: self.peers[sid] for sid in contents}
        sent = [(ClientProxy(self.peers[sid].cid), content) for sid, content in contents.items()]
        # replies may come in any order (deployment folds them as they arrive)
        for reply in self.driver.exchange(stage, sent):
            peer = by_cid[reply.metadata.node_id]
            if reply.error is not None:
                self._fail(peer, stage, reply.error)
                continue
            yield peer, reply.content

    def _fail(self, peer: _Peer, stage: str, reason: str) -> None:
        self.failures.append(ClientFailure(peer.cid, self.rnd, stage, reason))

    def _need(self, alive: Iterable[_Peer], stage: str) -> list[_Peer]:
        alive = list(alive)
        self.stats[f"after_{stage.split('.')[-1]}"] = len(alive)
        if len(alive) < max(2, self.threshold):
            raise RoundAborted(
                f"{len(alive)} clients left after {stage}, fewer than the threshold "
                f"{self.threshold}"
            )
        return alive

    def _timed(self, part: str, start: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    # -- the stages -----------------------------------------------------------------------

    def run(self) -> NDArrays:
        if self._unusable:
            raise RoundAborted(self._unusable)
        try:
            u1 = self._need(self._advertise(), STAGE_ADVERTISE)
            if not self.complete:
                u1 = self._need(self._graph(u1), STAGE_GRAPH)
            u2 = self._need(self._share_keys(u1), STAGE_SHARE)
            total, u3 = self._masked_input(u2)
            u3 = self._need(u3, "masked_input")
            u4 = self._need(self._consistency(u3), STAGE_CONSISTENCY)
            u5 = self._need(self._unmask(u2, u3, u4), STAGE_UNMASK)
            start = time.perf_counter()
            self._remove_masks(total, u2, u3, u5)
            self._timed("unmask", start)
            self.survivors = u3
            return self._dequantize(total)
        finally:
            self.stats["server_seconds"] = dict(self.seconds)

    def _advertise(self) -> list[_Peer]:
        common: dict[str, Scalar] = {
            "threshold": self.threshold,
            "bits": self.config.bits,
            "ring_bits": self.config.ring,
            "clip": float(self.config.clip),
            "max_weight": self.config.max_weight,
            "weighted": self.weighting == "num_examples",
            # what the clients need to check the threshold and the degree themselves
            "n": len(self.peers),
            "degree": _degree_option(self.config.degree),
            "corrupt_fraction": float(self.config.corrupt_fraction),
            "dropout_fraction": float(self.config.dropout_fraction),
            "failure_probability": float(self.config.failure_probability),
        }
        cap = getattr(
            getattr(self.driver.strategy, "sampling", self.driver.strategy),
            "max_num_examples",
            None,
        )
        if isinstance(cap, int):
            common["max_num_examples"] = cap
        if self.dp_bound is not None:
            common["dp_norm_bound"] = self.dp_bound
        if self.codec is not None:
            common.update(self.codec_params)
        contents = {
            sid: RecordDict(config_records={PARAMS: {**common, "sid": sid}}) for sid in self.peers
        }
        alive = []
        for peer, content in self._exchange(STAGE_ADVERTISE, contents):
            advert = _record(content, PARAMS)
            s_pk = None if advert is None else self._mask_key(peer, advert)
            if advert is None or s_pk is None:
                self._fail(peer, STAGE_ADVERTISE, "malformed or unsigned key advertisement")
                continue
            peer.advert, peer.s_pk = dict(advert), s_pk
            peer.commit = _commit(advert)
            alive.append(peer)
        return alive

    def _graph(self, u1: list[_Peer]) -> list[_Peer]:
        """Commit, then reveal: every client that advertised must reveal its value; the
        graph is derived from all of them (a missing one would let colluders choose
        between graphs by withholding theirs), so a missing reveal ends the round."""
        committed = sorted(u1, key=lambda peer: peer.sid)
        sids = np.asarray([peer.sid for peer in committed], "<i8").tobytes()
        commits = b"".join(peer.commit for peer in committed)
        contents = {
            peer.sid: RecordDict(config_records={PARAMS: {"sids": sids, "commits": commits}})
            for peer in committed
        }
        values: dict[int, bytes] = {}
        for peer, content in self._exchange(STAGE_GRAPH, contents):
            value = (_record(content, PARAMS) or {}).get("reveal")
            if not isinstance(value, bytes) or (
                g.commitment(self.run_id, self.rnd, peer.sid, value) != peer.commit
            ):
                self._fail(peer, STAGE_GRAPH, "no reveal, or not the committed value")
                continue
            values[peer.sid] = value
        missing = [peer.cid for peer in committed if peer.sid not in values]
        if missing:
            raise RoundAborted(
                f"{len(missing)} clients committed to the neighbour graph and did not reveal "
                f"(first: {missing[0]!r}); the graph needs every committed value, so the round "
                "stops before any secret is shared"
            )
        start = time.perf_counter()
        self.reveals = b"".join(values[peer.sid] for peer in committed)
        seed = g.graph_seed(self.run_id, self.rnd, len(self.peers), sids, self.reveals)
        self.stats["graph_seed"] = seed.hex()  # public: every reveal is relayed
        graph = self._neighbour_graph(seed)
        for sid, peer in self.peers.items():
            peer.neighbours = graph[sid]
        self._timed("graph", start)
        return committed

    def _neighbour_graph(self, seed: bytes) -> dict[int, list[int]]:
        """The graph every client derives from the seed of the reveals."""
        return g.derived_graph(len(self.peers), self.degree, seed)

    def _mask_key(self, peer: _Peer, advert: Mapping[str, Scalar]) -> bytes | None:
        """The mask public key of a well-formed advertisement signed by its identity key."""
        c_pk, s_pk, id_pk, sig = (advert.get(k) for k in ("c_pk", "s_pk", "id_pk", "sig"))
        commit = _commit(advert)
        if not (
            isinstance(c_pk, bytes)
            and isinstance(s_pk, bytes)
            and isinstance(id_pk, bytes)
            and isinstance(sig, bytes)
            and len(c_pk) == len(s_pk) == len(id_pk) == 32
            and len(commit) == (0 if self.complete else g.VALUE_BYTES)
        ):
            return None
        if self.enrolled is not None and self.enrolled.get(peer.cid) != id_pk:
            return None  # not enrolled, or not under the key in the peers file
        signed = advert_bytes(self.run_id, self.rnd, peer.sid, peer.cid, c_pk, s_pk, commit)
        return s_pk if p.verify(id_pk, sig, signed) else None

    def _share_keys(self, u1: list[_Peer]) -> list[_Peer]:
        alive = {peer.sid for peer in u1}
        contents, sent = {}, {}
        for peer in u1:
            live = [j for j in peer.neighbours if j in alive]
            if len(live) < self.threshold:
                self._fail(
                    peer,
                    STAGE_SHARE,
                    f"{len(live)} neighbours advertised keys, fewer than the threshold",
                )
                continue
            records: dict[str, dict[str, Scalar]] = {
                f"peer.{j}": {**self.peers[j].advert, "node": self.peers[j].cid} for j in live
            }
            records[PARAMS] = {
                "neighbours": np.asarray(peer.neighbours, "<i8").tobytes(),
                "reveals": self.reveals,
            }
            contents[peer.sid] = RecordDict(config_records=records)
            sent[peer.sid] = {str(j) for j in live}
        out = []
        for peer, content in self._exchange(STAGE_SHARE, contents):
            shares = _record(content, "shares")
            if (
                not isinstance(shares, dict)
                or set(shares) != sent[peer.sid]
                or not all(isinstance(v, bytes) for v in shares.values())
            ):
                self._fail(peer, STAGE_SHARE, "shares missing or addressed to non-neighbours")
                continue
            peer.shares_out = dict(shares)
            out.append(peer)
        return out

    def _masked_input(self, u2: list[_Peer]) -> tuple[np.ndarray, list[_Peer]]:
        dtype = p.ring_dtype(self.config.ring)
        total = np.zeros(self.length, dtype)
        alive = {peer.sid: peer for peer in u2}
        contents = {}
        for peer in u2:
            config: dict[str, Scalar] = {**peer.ins.config, MASK_KEY: "mask"}
            for j in peer.neighbours:
                sender = alive.get(j)
                if sender is not None:
                    config[f"{SHARE_PREFIX}{j}"] = sender.shares_out[str(peer.sid)]
            contents[peer.sid] = FitIns(peer.ins.parameters, config, peer.ins.extras)
        out = []
        for peer, res in self._exchange(MessageType.FIT, contents):
            vector = self._masked_vector(res)
            if vector is None:
                self._fail(
                    peer,
                    MessageType.FIT,
                    f"masked input must be one {dtype} vector of length {self.length}",
                )
                continue
            start = time.perf_counter()
            total += vector
            self._timed("fold", start)
            peer.metrics = dict(res.metrics)
            out.append(peer)
        return total, out

    def _masked_vector(self, res: Any) -> np.ndarray | None:
        if not isinstance(res, FitRes):
            return None
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception:  # a malformed payload is that client's failure
            return None
        if len(arrays) != 1:
            return None
        (vector,) = arrays
        if vector.dtype != p.ring_dtype(self.config.ring) or vector.shape != (self.length,):
            return None
        return vector

    def _consistency(self, u3: list[_Peer]) -> list[_Peer]:
        survivors = np.array(sorted(peer.sid for peer in u3), "<i8")
        self.survivor_ids = survivors
        contents = {
            peer.sid: RecordDict(array_records={PARAMS: {"survivors": survivors}}) for peer in u3
        }
        out = []
        for peer, content in self._exchange(STAGE_CONSISTENCY, contents):
            record = _record(content, PARAMS)
            sig = record.get("sig") if record else None
            if not isinstance(sig, bytes):
                self._fail(peer, STAGE_CONSISTENCY, "no consistency signature")
                continue
            peer.signature = sig
            out.append(peer)
        return out

    def _unmask(self, u2: list[_Peer], u3: list[_Peer], u4: list[_Peer]) -> list[_Peer]:
        alive3 = {peer.sid for peer in u3}
        dropped = np.array(sorted(peer.sid for peer in u2 if peer.sid not in alive3), "<i8")
        self.stats["dropped_after_sharing"] = len(dropped)
        signers = {peer.sid: peer for peer in u4}
        contents = {}
        for peer in u4:
            sigs = {str(j): signers[j].signature for j in peer.neighbours if j in signers}
            contents[peer.sid] = RecordDict(
                array_records={PARAMS: {"survivors": self.survivor_ids, "dropped": dropped}},
                config_records={"sigs": sigs},
            )
        out = []
        for peer, content in self._exchange(STAGE_UNMASK, contents):
            if not isinstance(content, RecordDict):
                self._fail(peer, STAGE_UNMASK, "no shares")
                continue
            for kind in ("seed_shares", "key_shares"):
                peer.revealed[kind] = content.config_records.get(kind, {})
            out.append(peer)
        return out

    # -- unmasking ------------------------------------------------------------------------

    def _collect(self, target: _Peer, u5: dict[int, _Peer], kind: str) -> bytes:
        shares: dict[int, bytes] = {}
        for sid in target.neighbours:
            holder = u5.get(sid)
            if holder is not None:
                share = holder.revealed.get(kind, {}).get(str(target.sid))
                if isinstance(share, bytes):
                    shares[sid] = share
        if len(shares) < self.threshold:
            raise RoundAborted(
                f"{len(shares)} shares of client {target.cid!r}'s "
                f"{'self-mask seed' if kind == 'seed_shares' else 'mask key'}, "
                f"{self.threshold} needed"
            )
        start = time.perf_counter()
        try:
            secret = p.combine_shares(shares, self.threshold)
        except ProtocolError as exc:
            raise RoundAborted(f"client {target.cid!r}: {exc}") from exc
        self._timed("shamir", start)
        return secret

    def _remove_masks(
        self, total: np.ndarray, u2: list[_Peer], u3: list[_Peer], u5: list[_Peer]
    ) -> None:
        masks = p.MaskExpander(self.length, self.config.ring)
        alive3 = {peer.sid for peer in u3}
        holders = {peer.sid: peer for peer in u5}
        for peer in u3:
            seed = self._collect(peer, holders, "seed_shares")
            start = time.perf_counter()
            total -= masks.expand(seed)
            self._timed("mask_expansion", start)
        for dead in (peer for peer in u2 if peer.sid not in alive3):
            secret = p.KeyPair.from_secret(self._collect(dead, holders, "key_shares"))
            if secret.public != dead.s_pk:
                raise RoundAborted(
                    f"the mask key rebuilt for dropped client {dead.cid!r} does not match the "
                    "key it advertised (a neighbour revealed a bad share)"
                )
            for j in dead.neighbours:
                if j not in alive3:
                    continue
                start = time.perf_counter()
                mask = masks.expand(pair_seed(secret, self.peers[j].s_pk, self.run_id, self.rnd))
                # j added +mask if j < dead, else -mask: take j's contribution back out
                if j < dead.sid:
                    total -= mask
                else:
                    total += mask
                self._timed("mask_expansion", start)

    def _dequantize(self, total: np.ndarray) -> NDArrays:
        weight_sum = int(total[-1])
        levels = (1 << self.config.bits) - 1
        limit = len(self.survivor_ids) * self.config.max_weight
        if (
            weight_sum <= 0
            or weight_sum > limit
            or not (
                self.codec.in_range(total, weight_sum)
                if self.codec is not None
                else int(total[:-1].max(initial=0)) <= levels * weight_sum
            )
        ):
            raise RoundAborted(
                "the unmasked sum is out of range (total weight "
                f"{weight_sum}): a client sent inconsistent masks or shares"
            )
        self.stats["total_weight"] = weight_sum
        if self.codec is not None:  # the codec's sum, decoded once
            flat = self.codec.mean(total, weight_sum)
        else:
            flat = p.dequantize(total[:-1], weight_sum, self.config.clip, self.config.bits)
        out, at = [], 0
        for ref in self.reference:
            out.append(ref.astype(np.float64) + flat[at : at + ref.size].reshape(ref.shape))
            at += ref.size
        return cast_like(out, self.reference)


def _degree_option(degree: int | str | None) -> int:
    """``SecAggConfig.degree`` as one int for the clients: 0 unset, -1 complete."""
    if degree is None:
        return 0
    if degree == "complete":
        return -1
    return int(degree)


def _commit(advert: Mapping[str, Scalar]) -> bytes:
    """The graph commitment in an advertisement (none with the complete graph)."""
    value = advert.get("commit", b"")
    return value if isinstance(value, bytes) else b"\x00"


def _record(content: Any, name: str) -> dict[str, Scalar] | None:
    """A config record of a reply's RecordDict, or None."""
    return content.config_records.get(name) if isinstance(content, RecordDict) else None
