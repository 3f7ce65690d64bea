"""What a run compresses: the uplink codec, the downlink codec, server-side error feedback.

Chosen in Python (``compression=TopK(ratio=0.01, error_feedback=True)``, or a
:class:`Compression` for both directions) or in TOML::

    [compression]
    uplink = "topk"          # none | fp16 | bf16 | qsgd | topk | randomk | sign | eden
    ratio = 0.01             # topk/randomk (eden: share of rotated coordinates kept)
    # bits = 4               # qsgd/eden (a key the uplink codec does not take is refused)
    # scale = 0.5            # qsgd: one scale shared by every client (secure aggregation)
    # shared_seed = true     # randomk: one support from the round's seed (secure aggregation)
    error_feedback = true
    downlink = "none"        # none | fp16 | bf16 | qsgd
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedhive.common.errors import ConfigError
from fedhive.compression.codecs import BF16, CODECS, FP16, QSGD, Codec

__all__ = ["DOWNLINK_CODECS", "TABLE_KEYS", "Compression", "as_compression"]

#: The keys of the ``[compression]`` table.
TABLE_KEYS = ("uplink", "ratio", "bits", "scale", "shared_seed", "error_feedback", "downlink")
#: Codecs the broadcast model may be sent with (by id).
DOWNLINK_CODECS: dict[str, type[Codec]] = {"fp16": FP16, "bf16": BF16, "qsgd": QSGD}


@dataclass(frozen=True)
class Compression:
    """``uplink``: the codec of each client's update (``None``: plain). ``downlink``: the
    codec of the broadcast model (:class:`FP16`, :class:`BF16` or :class:`QSGD`;
    ``None``: plain). ``server_error_feedback``: the server adds what the previous
    broadcast's encoding lost to the next one, so that the models clients receive do not
    drift from the server's (it keeps the exact model and applies each decoded update to
    it); it needs a downlink codec.
    """

    uplink: Codec | None = None
    downlink: Codec | None = None
    server_error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.uplink is not None and not isinstance(self.uplink, Codec):
            raise ConfigError(
                f"uplink must be a fedhive.compression codec, got {type(self.uplink).__name__}"
            )
        if self.downlink is not None and not isinstance(
            self.downlink, tuple(DOWNLINK_CODECS.values())
        ):
            raise ConfigError(
                f"downlink must be FP16, BF16 or QSGD (or None), got {type(self.downlink).__name__}"
            )
        if not isinstance(self.server_error_feedback, bool):
            raise ConfigError("server_error_feedback must be a bool")
        if self.server_error_feedback and self.downlink is None:
            raise ConfigError("server_error_feedback needs a downlink codec")

    @property
    def active(self) -> bool:
        return self.uplink is not None or self.downlink is not None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Compression:
        """The ``[compression]`` table (keys :data:`TABLE_KEYS`); ``ratio`` and ``bits``
        apply to the codecs that take them."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"[compression] must be a table, got {type(table).__name__}")
        unknown = sorted(set(table) - set(TABLE_KEYS))
        if unknown:
            raise ConfigError(
                f"[compression] has unknown keys {unknown}; allowed: {', '.join(TABLE_KEYS)}"
            )
        uplink = _name(table, "uplink", ("none", *CODECS))
        downlink = _name(table, "downlink", ("none", *DOWNLINK_CODECS))
        feedback = table.get("error_feedback", False)
        if not isinstance(feedback, bool):
            raise ConfigError(
                f"[compression] error_feedback must be true or false, got {feedback!r}"
            )
        _check_applies(table, uplink)
        up = None
        if uplink != "none":
            options: dict[str, Any] = {"error_feedback": feedback}
            takes = CODECS[uplink].__dataclass_fields__
            for key in _CODEC_KEYS:
                if key in table and key in takes:
                    options[key] = table[key]
            try:
                up = CODECS[uplink](**options)
            except ConfigError as exc:
                raise ConfigError(f"[compression] uplink = {uplink!r}: {exc}") from None
        elif feedback:
            raise ConfigError("[compression] error_feedback = true needs an uplink codec")
        down = None if downlink == "none" else downlink_codec(downlink)
        return cls(uplink=up, downlink=down)


_CODEC_KEYS = ("ratio", "bits", "scale", "shared_seed")


def _check_applies(table: Mapping[str, Any], uplink: str) -> None:
    """Refuse ``ratio``/``bits``/``scale``/``shared_seed`` where the uplink codec has no
    such parameter (they would otherwise be ignored without a word)."""
    takes = () if uplink == "none" else CODECS[uplink].__dataclass_fields__
    own = [k for k in _CODEC_KEYS if k in takes]
    for key in _CODEC_KEYS:
        if key not in table or key in takes:
            continue
        where = f"{key} = {table[key]!r} is not a parameter of uplink = {uplink!r}"
        if uplink == "none":
            raise ConfigError(
                f"[compression] {where} (ratio and bits, like scale and shared_seed, "
                "configure the uplink codec; "
                'downlink = "qsgd" always sends 8 bits per weight): set uplink or drop it'
            )
        which = (
            f"takes {' and '.join(own)}"
            if own
            else ("takes neither ratio nor bits (nor scale, shared_seed)")
        )
        raise ConfigError(f"[compression] {where}, which {which}: drop {key}")


def downlink_codec(name: str) -> Codec:
    """The downlink codec by name: casts, or 8-bit QSGD with a scale per 1024 weights."""
    if name == "qsgd":
        return QSGD(bits=8, block=1024)
    return DOWNLINK_CODECS[name]()


def _name(table: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = table.get(key, "none")
    if value not in allowed:
        raise ConfigError(f"[compression] {key} = {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def as_compression(value: object) -> Compression | None:
    """``compression=`` as given to ``start_simulation``/``start_server``: a codec (the
    uplink), a :class:`Compression`, a ``[compression]``-style mapping, or ``None``."""
    if value is None:
        return None
    if isinstance(value, Compression):
        return value if value.active else None
    if isinstance(value, Codec):
        return Compression(uplink=value)
    if isinstance(value, Mapping):
        out = Compression.from_table(value)
        return out if out.active else None
    raise ConfigError(
        "compression must be a codec (e.g. fedhive.compression.TopK(ratio=0.01)), a "
        f"Compression, or a [compression] table; got {type(value).__name__}"
    )


def check_secure_aggregation(compression: Compression, workflow: Any = None) -> None:
    """Refuse, with the reason, compression that secure aggregation cannot carry; with
    ``workflow`` (an exchange stage that encodes updates itself, such as
    :class:`~fedhive.secagg.SecAggPlusWorkflow`) attach the codec to it.

    Per-client top-k, sign, EDEN and QSGD with per-client scales encode each update on
    its own support or scale: the masked sum of their encodings is not the encoding of
    the sum. Shared-scale QSGD and shared-seed random-k are linear over integers
    (:mod:`fedhive.compression.secure`): the SecAgg+ client encodes to ring integers
    before masking and the server decodes the unmasked sum once. The ring must hold
    every sum at ``max_clients`` x ``max_weight`` (checked now). Error feedback and a
    downlink codec are not carried by a secure round.
    """
    codec = compression.uplink
    if codec is not None and codec.secagg_reason:
        raise ConfigError(
            f"compression {codec.id!r} cannot be combined with secure aggregation: "
            f"{codec.secagg_reason}"
        )
    if compression.downlink is not None or compression.server_error_feedback:
        raise ConfigError(
            "a secure aggregation round sends the model as it is: drop the downlink codec "
            '(downlink = "none") or secure_aggregation'
        )
    if codec is None:
        return
    if codec.error_feedback:
        raise ConfigError(
            f"compression {codec.id!r} with error_feedback under secure aggregation: the "
            "SecAgg+ client keeps no residual; use error_feedback=False (shared-scale QSGD "
            "and shared-seed random-k are unbiased without it)"
        )
    if workflow is not None:
        workflow.attach_codec(codec)


def compression_setup(
    compression: object, stages: list[Any], mods: list[Any], *, secure: bool, policy: object
) -> tuple[list[Any], list[Any], Compression | None]:
    """``stages`` and client ``mods`` with compression's stage and mod added, checked.

    The :class:`~fedhive.compression.CompressionStage` goes right after the exchange
    stage (first of the reply stages), the mod in front of the client's mods (so local DP
    mods after it clip and noise before it encodes). What ``start_simulation`` and
    ``start_server`` call. ``policy`` is not restricted: the asynchronous policy runs
    the stage's instructions at every dispatch and checks the stage itself.
    """
    del policy
    from fedhive.compression.mod import with_compression_mod
    from fedhive.compression.stage import CompressionStage
    from fedhive.server.stages import ExchangeStage

    chosen = as_compression(compression)
    if chosen is None:
        return stages, mods, None
    if secure:
        workflow = next(
            (s for s in stages if isinstance(s, ExchangeStage) and s.encodes_updates), None
        )
        check_secure_aggregation(chosen, workflow)
    if secure:  # the SecAgg+ mod and workflow encode and decode
        return stages, mods, chosen
    at = 1 if stages and isinstance(stages[0], ExchangeStage) else 0
    out = [*stages[:at], CompressionStage(chosen), *stages[at:]]
    return out, with_compression_mod(mods), chosen
