"""The client side of SecAgg+: a mod that answers the protocol's stages.

Put it first in the client's mods (``mods=[secaggplus_mod, ...]``): everything inside it
(clipping for client-side DP, local DP noise) runs on the update before it is quantized
and masked, which is the order clip -> noise -> quantize -> mask.

Stages (message types), for round r of run R:

1. ``secagg.advertise``: check the threshold against the safe bound for the degree
   (:func:`fedhive.secagg.client_checks.check_plan`); make two X25519 key pairs (share encryption,
   mask agreement), a self-mask seed and, unless the graph is complete, a commitment to
   a random value for the neighbour graph; reply with the public keys and the
   commitment, signed with the client's long-term Ed25519 identity key (kept in its
   state) so they are bound to the client.
1b. ``secagg.graph`` (not with the complete graph): check that the list of commitments
   holds this client's own, keep it, and reveal the value (:mod:`fedhive.secagg.graph`).
2. ``secagg.share_keys``: check every reveal against the kept commitments, derive the
   graph from them and refuse neighbours the server announces that differ from it;
   check the neighbours' signed keys (which cover their commitments), and that no node
   id or identity key appears twice among them; Shamir-share the self-mask seed and the mask
   secret key among them; each pair of shares travels AES-GCM encrypted under a key only
   the two of them can derive.
3. ``fit`` (with ``secagg.*`` config keys): train through the mods inside, then clip,
   quantize, weight, and add the self mask and one pairwise mask per neighbour.
4. ``secagg.consistency``: sign the set of survivors the server announced.
5. ``secagg.unmask``: verify every signature received (one over another set aborts) and
   that at least t distinct neighbours signed that same set, then reveal self-mask
   shares of surviving neighbours and mask-key shares of dropped ones; never both for
   one neighbour, and only once per round.

Any check that fails raises :class:`~fedhive.common.errors.ProtocolError`; the client
then reveals nothing more in this round. Secrets live in the client's state only for the
round and are wiped when it unmasks (or when the next round begins).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedhive.client.app import Mod
from fedhive.client.context import Context
from fedhive.common.errors import ConfigError, ProtocolError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    FitIns,
    FitRes,
    RecordDict,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.secagg import graph as g
from fedhive.secagg import primitives as p
from fedhive.secagg.client_checks import check_peer, check_plan
from fedhive.secagg.coded import client_codec
from fedhive.secagg.config import THREAT_MODELS
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
    share_associated,
    share_key,
    survivors_bytes,
)
from fedhive.secagg.messages import field_bytes as _bytes
from fedhive.secagg.messages import field_float as _float
from fedhive.secagg.messages import field_int as _int
from fedhive.secagg.messages import params_of as _params
from fedhive.secagg.messages import records_of as _content
from fedhive.secagg.messages import survivors_of as _survivors

__all__ = ["SecAggPlusMod", "secaggplus_mod", "with_secagg_mod"]

_ROUND_STATE = "secagg.round"
_PEERS = "secagg.peers"
_INBOX = "secagg.inbox"
_IDENTITY = "secagg.identity"

Handler = Callable[[Message, Context], Message]
log = logging.getLogger("fedhive.secagg")


def _neighbours(state: Mapping[str, Scalar]) -> set[int]:
    """The secure ids of this client's neighbours, as it derived them."""
    return set(np.frombuffer(_bytes(state, "neighbours"), "<i8").tolist())


class SecAggPlusMod:
    """The SecAgg+ client mod.

    ``trusted_identities`` (node id -> raw Ed25519 public key) pins peers' identity keys,
    e.g. from enrollment (:mod:`fedhive.secagg.identity`); without it a client trusts the
    identity keys the server relays, which protects against a server that lies about
    survivors but not against one that swaps keys (see docs/secure_aggregation.md).
    ``identity`` is this site's raw Ed25519 identity secret, the one its peers enrolled;
    without it each client makes one and keeps it in its state. ``timings`` (if given)
    accumulates the seconds spent per stage part, for benchmarks.

    ``threat_model``: ``"malicious"`` (the default with ``trusted_identities``) or
    ``"honest-but-curious"`` (the default without; a warning says so in the first round);
    ``"malicious"`` without pinned identities is a :class:`ConfigError`.
    ``corrupt_fraction``: this client's own assumption of the share of colluding clients;
    the threshold it accepts is the safe bound for the larger of it and the server's.
    Whatever the server says, the client refuses (naming the check) a threshold below
    the safe bound for its degree, a degree other than the one its config implies, share
    indices that are 0, repeated or its own, two neighbours with one node id or one
    identity key, and neighbours other than those of the graph it derives from every
    client's committed randomness (:mod:`fedhive.secagg.graph`); it verifies every
    consistency signature it receives.
    """

    def __init__(
        self,
        trusted_identities: Mapping[str, bytes] | None = None,
        timings: dict[str, float] | None = None,
        identity: bytes | None = None,
        threat_model: str | None = None,
        corrupt_fraction: float = 0.0,
    ) -> None:
        self.trusted = dict(trusted_identities or {})
        self.timings = timings
        if threat_model is None:
            threat_model = "malicious" if self.trusted else "honest-but-curious"
        if threat_model not in THREAT_MODELS:
            raise ConfigError(
                f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}"
            )
        if threat_model == "malicious" and not self.trusted:
            raise ConfigError(
                "threat_model='malicious' needs pinned identities (trusted_identities, e.g. "
                "from fedhive.secagg.identity.load_peers): without them the identity keys "
                "come from the server, which protects against an honest-but-curious server only"
            )
        self.threat_model = threat_model
        if isinstance(corrupt_fraction, bool) or not 0 <= corrupt_fraction < 0.5:
            raise ConfigError(f"corrupt_fraction must be in [0, 0.5), got {corrupt_fraction!r}")
        self.corrupt_fraction = float(corrupt_fraction)
        self._warned = False
        if identity is not None:  # a malformed secret fails here, not in a round
            try:
                p.identity_public(identity)
            except (TypeError, ValueError):
                raise ConfigError("identity must be a raw 32-byte Ed25519 secret") from None
        self.identity = identity

    def __repr__(self) -> str:
        return f"SecAggPlusMod(trusted_identities={len(self.trusted)} keys)"

    def _time(self, part: str, start: float) -> None:
        if self.timings is not None:
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - start

    def __call__(self, message: Message, context: Context, call_next: Handler) -> Message:
        mtype = message.metadata.message_type
        if mtype == STAGE_ADVERTISE:
            return message.reply(self._advertise(message, context))
        if mtype == STAGE_GRAPH:
            return message.reply(self._graph(message, context))
        if mtype == STAGE_SHARE:
            return message.reply(self._share_keys(message, context))
        if mtype == MessageType.FIT and isinstance(message.content, FitIns):
            if message.content.config.get(MASK_KEY) == "mask":
                return self._masked_fit(message, context, call_next)
            return call_next(message, context)
        if mtype == STAGE_CONSISTENCY:
            return message.reply(self._consistency(message, context))
        if mtype == STAGE_UNMASK:
            return message.reply(self._unmask(message, context))
        return call_next(message, context)

    # -- state ---------------------------------------------------------------------------

    @staticmethod
    def _wipe(context: Context) -> None:
        for name in (_ROUND_STATE, _PEERS, _INBOX):
            context.state.config_records.pop(name, None)

    @staticmethod
    def _round_state(message: Message, context: Context, stage: str) -> dict[str, Scalar]:
        state = context.state.config_records.get(_ROUND_STATE)
        meta = message.metadata
        if (
            state is None
            or state.get("run") != meta.run_id
            or state.get("round") != meta.server_round
        ):
            raise ProtocolError(
                f"{stage} for round {meta.server_round} before this client advertised keys "
                "for it (or after it unmasked)"
            )
        return state

    @staticmethod
    def _advance(state: dict[str, Scalar], expected: str, stage: str) -> None:
        if state.get("stage") != expected:
            raise ProtocolError(
                f"{stage} out of order: this client is at stage {state.get('stage')!r}"
            )
        state["stage"] = stage

    def _identity(self, context: Context) -> bytes:
        if self.identity is not None:
            return self.identity
        record = context.state.config_records.setdefault(_IDENTITY, {})
        secret = record.get("secret")
        if not isinstance(secret, bytes):
            secret = p.new_identity()
            record["secret"] = secret
        return secret

    # -- 1. advertise keys ---------------------------------------------------------------

    def _advertise(self, message: Message, context: Context) -> RecordDict:
        start = time.perf_counter()
        meta = message.metadata
        params = _params(message)
        sid = _int(params, "sid")
        threshold = _int(params, "threshold")
        bits, ring = _int(params, "bits"), _int(params, "ring_bits")
        clip = params.get("clip")
        if not isinstance(clip, float) or not (math.isfinite(clip) and clip > 0):
            raise ProtocolError("secure aggregation parameter 'clip' must be a positive float")
        if ring not in (32, 64) or not 1 <= bits < ring or threshold < 1 or sid < 1:
            raise ProtocolError(f"invalid secure aggregation parameters {dict(params)!r}")
        degree = check_plan(params, sid, threshold, self.corrupt_fraction)
        client_codec(params)  # the codec the server asks for, checked before any key
        if not self._warned and self.threat_model != "malicious":
            self._warned = True
            log.warning(
                "secure aggregation without pinned identities: the identity keys come from "
                "the server, so this protects against an honest-but-curious server only "
                "(pin identities with trusted_identities / --secagg-peers)"
            )
        self._wipe(context)
        c_pair, s_pair = p.KeyPair(), p.KeyPair()
        identity = self._identity(context)
        complete = degree >= _int(params, "n") - 1
        value = b"" if complete else secrets.token_bytes(g.VALUE_BYTES)
        commit = b"" if complete else g.commitment(meta.run_id, meta.server_round, sid, value)
        context.state.config_records[_ROUND_STATE] = {
            **params,
            "run": meta.run_id,
            "round": meta.server_round,
            "stage": STAGE_ADVERTISE,
            "c_sk": c_pair.secret,
            "s_sk": s_pair.secret,
            "seed": secrets.token_bytes(p.SECRET_BYTES),
            "k": degree,
            "complete": complete,
            "value": value,
            "commit": commit,
        }
        signed = advert_bytes(
            meta.run_id,
            meta.server_round,
            sid,
            context.node_id,
            c_pair.public,
            s_pair.public,
            commit,
        )
        reply: dict[str, Scalar] = {
            "c_pk": c_pair.public,
            "s_pk": s_pair.public,
            "id_pk": p.identity_public(identity),
            "sig": p.sign(identity, signed),
        }
        if commit:
            reply["commit"] = commit
        self._time("key_agreement", start)
        return RecordDict(config_records={PARAMS: reply})

    # -- 1b. the neighbour graph ---------------------------------------------------------

    def _graph(self, message: Message, context: Context) -> RecordDict:
        state = self._round_state(message, context, STAGE_GRAPH)
        self._advance(state, STAGE_ADVERTISE, STAGE_GRAPH)
        if state.get("complete"):
            raise ProtocolError("graph check: a graph stage in a round with the complete graph")
        start = time.perf_counter()
        params = _params(message)
        sids, commits = _bytes(params, "sids"), _bytes(params, "commits")
        n, me = _int(state, "n"), _int(state, "sid")
        g.check_commitments(sids, commits, n, me, _bytes(state, "commit"))
        state["sids"], state["commits"] = sids, commits
        self._time("graph", start)
        return RecordDict(config_records={PARAMS: {"reveal": _bytes(state, "value")}})

    # -- 2. share keys -------------------------------------------------------------------

    def _share_keys(self, message: Message, context: Context) -> RecordDict:
        meta = message.metadata
        state = self._round_state(message, context, STAGE_SHARE)
        if not state.get("complete") and state.get("stage") == STAGE_ADVERTISE:
            raise ProtocolError(
                "graph check: the server skipped the graph stage; this client derives its "
                "neighbours from every client's committed randomness and refuses a graph "
                "it cannot check"
            )
        self._advance(state, STAGE_ADVERTISE if state.get("complete") else STAGE_GRAPH, STAGE_SHARE)
        content = _content(message)
        me = _int(state, "sid")
        start = time.perf_counter()
        allowed = set(g.client_neighbours(meta.run_id, meta.server_round, state, _params(message)))
        self._time("graph", start)
        listed = None
        if not state.get("complete"):
            listed = (_bytes(state, "sids"), _bytes(state, "commits"))
        peers: dict[str, Scalar] = {}
        seen: set[bytes] = set()
        nodes: set[str] = {context.node_id}
        identities: set[bytes] = {p.identity_public(self._identity(context))}
        start = time.perf_counter()
        for name, advert in content.config_records.items():
            if not name.startswith("peer."):
                continue
            text = name[len("peer.") :]
            sid = int(text) if text.isdigit() else -1
            if sid < 1 or str(sid) != text or sid == me:
                raise ProtocolError(
                    f"share index check: {text!r} is not a valid share index (>= 1, "
                    "canonical, not this client's own)"
                )
            node = advert.get("node")
            if sid not in allowed or not isinstance(node, str):
                raise ProtocolError(f"the server relayed keys of {sid}, not a neighbour")
            if node in nodes:
                raise ProtocolError(
                    f"duplicate neighbour check: two neighbours (or this client) have the "
                    f"same node id {node!r}; refusing the round"
                )
            nodes.add(node)
            commit = g.commitment_of(*listed, sid) if listed else b""
            c_pk, s_pk, id_pk = check_peer(self.trusted, meta, sid, node, advert, commit or b"")
            if id_pk in identities:
                raise ProtocolError(
                    "duplicate neighbour check: two neighbours (or this client) have the "
                    "same identity key; refusing the round"
                )
            identities.add(id_pk)
            if c_pk in seen or s_pk in seen:
                raise ProtocolError("two neighbours advertised the same public key")
            seen.update((c_pk, s_pk))
            peers[str(sid)] = c_pk + s_pk + id_pk + node.encode()
        self._time("key_agreement", start)
        threshold = _int(state, "threshold")
        if len(peers) < threshold:
            raise ProtocolError(
                f"{len(peers)} neighbours advertised keys, fewer than the threshold {threshold}"
            )
        context.state.config_records[_PEERS] = peers
        start = time.perf_counter()
        xs = [int(s) for s in peers]
        seed_shares = p.split_secret(_bytes(state, "seed"), xs, threshold)
        key_shares = p.split_secret(_bytes(state, "s_sk"), xs, threshold)
        self._time("shamir", start)
        start = time.perf_counter()
        c_sk = p.KeyPair.from_secret(_bytes(state, "c_sk"))  # loaded once for every peer
        out: dict[str, Scalar] = {}
        for sid_text in list(peers):
            packed = _bytes(peers, sid_text)
            sid = int(sid_text)
            key = share_key(c_sk, packed[:32], meta.run_id, meta.server_round)
            peers[sid_text] = key + packed[32:]  # keep the derived key for unmasking
            plain = seed_shares[sid] + key_shares[sid]
            ad = share_associated(meta.run_id, meta.server_round, me, sid)
            out[sid_text] = p.encrypt_share(key, plain, ad)
        self._time("key_agreement", start)
        return RecordDict(config_records={"shares": out})

    # -- 3. masked input -----------------------------------------------------------------

    def _masked_fit(self, message: Message, context: Context, call_next: Handler) -> Message:
        meta = message.metadata
        state = self._round_state(message, context, "masked input")
        self._advance(state, STAGE_SHARE, "mask")
        ins: FitIns = message.content
        peers = context.state.config_records.get(_PEERS, {})
        inbox: dict[str, Scalar] = {}
        config: dict[str, Scalar] = {}
        for key, value in ins.config.items():
            if key.startswith(SHARE_PREFIX):
                sid_text = key[len(SHARE_PREFIX) :]
                if sid_text not in peers or not isinstance(value, bytes):
                    raise ProtocolError(f"a share from {sid_text}, who is not a neighbour")
                inbox[sid_text] = value
            elif not key.startswith("secagg."):
                config[key] = value
        threshold = _int(state, "threshold")
        if len(inbox) < threshold:
            raise ProtocolError(
                f"shares from {len(inbox)} neighbours, fewer than the threshold {threshold}"
            )
        context.state.config_records[_INBOX] = inbox
        inner = Message(meta, FitIns(ins.parameters, config, ins.extras))
        reply = call_next(inner, context)
        if reply.error is not None or not isinstance(reply.content, FitRes):
            return reply
        start = time.perf_counter()
        res: FitRes = reply.content
        vector = self._quantized(ins, res, state)
        self._time("quantize", start)
        start = time.perf_counter()
        ring = _int(state, "ring_bits")
        masks = p.MaskExpander(vector.size, ring)
        vector += masks.expand(_bytes(state, "seed"))
        s_sk, me = p.KeyPair.from_secret(_bytes(state, "s_sk")), _int(state, "sid")
        for sid_text in sorted(inbox, key=int):
            packed = _bytes(peers, sid_text)
            mask = masks.expand(pair_seed(s_sk, packed[32:64], meta.run_id, meta.server_round))
            if me < int(sid_text):
                vector += mask
            else:
                vector -= mask
        self._time("mask_expansion", start)
        masked = FitRes(Status(), ndarrays_to_parameters([vector]), 0, dict(res.metrics))
        return Message(reply.metadata, masked)

    @staticmethod
    def _quantized(ins: FitIns, res: FitRes, state: Mapping[str, Scalar]) -> np.ndarray:
        """weight x quantize(clip(update)), then the weight, as one ring vector."""
        reference = parameters_to_ndarrays(ins.parameters)
        new = parameters_to_ndarrays(res.parameters)
        if len(new) != len(reference):
            raise ProtocolError(f"fit returned {len(new)} arrays, the model has {len(reference)}")
        size = sum(int(r.size) for r in reference)
        delta = np.empty(size, np.float64)
        at = 0
        for arr, ref in zip(new, reference, strict=True):
            if arr.shape != ref.shape:
                raise ProtocolError(f"fit returned shape {arr.shape}, the model has {ref.shape}")
            np.subtract(arr.reshape(-1), ref.reshape(-1), out=delta[at : at + ref.size])
            at += ref.size
        if not np.isfinite(delta).all():
            raise ProtocolError("the update contains NaN or Inf; nothing was sent")
        weight = 1
        if state.get("weighted"):
            weight = res.num_examples
            cap = state.get("max_num_examples")
            if isinstance(cap, int) and cap > 0:
                weight = min(weight, cap)
            if not 0 <= weight <= _int(state, "max_weight"):
                raise ProtocolError(
                    f"num_examples={weight} is above secure_aggregation.max_weight="
                    f"{_int(state, 'max_weight')}; raise max_weight (and the ring) on the server"
                )
        clip, bits, rng = _float(state, "clip"), _int(state, "bits"), np.random.default_rng()
        codec = client_codec(state, size)
        if codec is not None:  # the codec's ring integers instead of SecAgg+'s grid
            return codec.encode(delta, weight, rng)
        bound = state.get("dp_norm_bound")
        if isinstance(bound, float):  # DP: what is released stays within C + beta
            q = p.conditional_quantize(delta, clip, bits, rng, bound)
        else:
            q = p.quantize(delta, clip, bits, rng)
        dtype = p.ring_dtype(_int(state, "ring_bits"))
        vector = np.empty(size + 1, dtype)
        np.multiply(q, weight, out=vector[:size], casting="unsafe")
        vector[size] = weight
        return vector

    # -- 4. consistency check ------------------------------------------------------------

    def _consistency(self, message: Message, context: Context) -> RecordDict:
        meta = message.metadata
        state = self._round_state(message, context, STAGE_CONSISTENCY)
        self._advance(state, "mask", STAGE_CONSISTENCY)
        survivors = _survivors(message, "survivors")
        me = _int(state, "sid")
        inbox = context.state.config_records.get(_INBOX, {})
        neighbours = _neighbours(state)
        announced = set(survivors.tolist())
        if me not in announced:
            raise ProtocolError("the announced survivors leave out this client, who sent input")
        strangers = (announced & neighbours) - {int(s) for s in inbox}
        if strangers:
            raise ProtocolError(
                f"announced survivors {sorted(strangers)} never shared keys with this client"
            )
        if len(announced) < _int(state, "threshold"):
            raise ProtocolError("fewer survivors than the threshold; refusing to continue")
        data = survivors_bytes(meta.run_id, meta.server_round, survivors)
        state["signed"] = data
        start = time.perf_counter()
        signature = p.sign(self._identity(context), data)
        self._time("consistency", start)
        return RecordDict(config_records={PARAMS: {"sig": signature}})

    # -- 5. unmask ------------------------------------------------------------------------

    def _unmask(self, message: Message, context: Context) -> RecordDict:
        state = self._round_state(message, context, STAGE_UNMASK)
        try:
            self._advance(state, STAGE_CONSISTENCY, STAGE_UNMASK)
            return self._reveal(message, context, state)
        finally:
            self._wipe(context)  # one unmask per round, whatever happens

    def _reveal(self, message: Message, context: Context, state: dict[str, Scalar]) -> RecordDict:
        meta = message.metadata
        survivors = _survivors(message, "survivors")
        dropped = set(_survivors(message, "dropped").tolist())
        data = survivors_bytes(meta.run_id, meta.server_round, survivors)
        if data != state.get("signed"):
            raise ProtocolError(
                "the server announced a different set of survivors than the one this client "
                "signed; aborting"
            )
        alive = set(survivors.tolist())
        if alive & dropped:
            raise ProtocolError(
                f"the server asks for both shares of clients {sorted(alive & dropped)}; refused"
            )
        peers = context.state.config_records.get(_PEERS, {})
        sigs = _content(message).config_records.get("sigs", {})
        threshold = _int(state, "threshold")
        valid = 0
        signers: set[bytes] = set()
        start = time.perf_counter()
        for sid_text, sig in sigs.items():  # every one: any over another set aborts
            packed = peers.get(sid_text)
            if not isinstance(packed, bytes) or not isinstance(sig, bytes):
                raise ProtocolError(f"a consistency signature from {sid_text}, not a neighbour")
            if int(sid_text) not in alive:
                raise ProtocolError(
                    f"consistency check: neighbour {sid_text} signed but is not a survivor"
                )
            if not p.verify(packed[64:96], sig, data):
                raise ProtocolError(
                    f"neighbour {sid_text} signed a different set of survivors: the server "
                    "is announcing inconsistent views; aborting"
                )
            if packed[64:96] in signers:
                raise ProtocolError("consistency check: one identity signed twice; aborting")
            signers.add(packed[64:96])
            valid += 1
        self._time("consistency", start)
        if valid < threshold:
            raise ProtocolError(
                f"consistency check: {valid} neighbours confirmed the survivors, fewer than "
                f"the threshold {threshold}"
            )
        inbox = context.state.config_records.get(_INBOX, {})
        me = _int(state, "sid")
        seed_shares: dict[str, Scalar] = {}
        key_shares: dict[str, Scalar] = {}
        start = time.perf_counter()
        for sid_text in inbox:
            sid = int(sid_text)
            if sid not in alive and sid not in dropped:
                continue
            key = _bytes(peers, sid_text)[:32]  # derived when sharing keys
            blob = _bytes(inbox, sid_text)
            plain = p.decrypt_share(
                key, blob, share_associated(meta.run_id, meta.server_round, sid, me)
            )
            if sid in alive:
                seed_shares[sid_text] = plain[: len(plain) // 2]
            else:
                key_shares[sid_text] = plain[len(plain) // 2 :]
        self._time("key_agreement", start)
        return RecordDict(config_records={"seed_shares": seed_shares, "key_shares": key_shares})


#: The default instance: peers' identity keys are trusted as relayed.
secaggplus_mod = SecAggPlusMod()


def with_secagg_mod(mods: Sequence[Mod]) -> list[Mod]:
    """``mods`` with :data:`secaggplus_mod` first, unless they hold a SecAgg+ mod already."""
    if any(isinstance(mod, SecAggPlusMod) for mod in mods):
        return list(mods)
    return [secaggplus_mod, *mods]
