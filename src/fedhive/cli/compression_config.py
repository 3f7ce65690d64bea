"""The ``[compression]`` table of ``fedhive run`` and ``fedhive server``::

    [compression]
    uplink = "topk"          # none | fp16 | bf16 | qsgd | topk | randomk | sign | eden
    ratio = 0.01             # topk/randomk (eden: share of rotated coordinates kept)
    # bits = 4               # qsgd/eden (a key the uplink codec does not take is refused)
    error_feedback = true
    downlink = "none"        # none | fp16 | bf16 | qsgd

Validated here with the other tables (bad values are named at their key), and built into
a :class:`fedhive.compression.Compression` by :meth:`CompressionConfig.build`.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedhive.common.errors import ConfigError

__all__ = ["CompressionConfig", "check_compression_secure"]


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uplink: Literal["none", "fp16", "bf16", "qsgd", "topk", "randomk", "sign", "eden"] = "none"
    ratio: float = Field(
        0.01,
        gt=0,
        le=1,
        description="topk/randomk: share of elements sent; eden: of coordinates kept",
    )
    bits: int = Field(4, ge=1, le=8, description="qsgd/eden: bits per element (qsgd: + sign)")
    scale: float | None = Field(
        None, gt=0, description="qsgd: one scale shared by every client (secure aggregation)"
    )
    shared_seed: bool = Field(
        False, description="randomk: one support from the round's seed (secure aggregation)"
    )
    error_feedback: bool = False
    downlink: Literal["none", "fp16", "bf16", "qsgd"] = "none"

    @model_validator(mode="after")
    def _check(self) -> Self:
        try:
            self.build()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def build(self) -> Any:
        """The :class:`fedhive.compression.Compression` this table describes."""
        from fedhive.compression.config import Compression

        return Compression.from_table(self.model_dump(exclude_unset=True))


def check_compression_secure(compression: CompressionConfig | None, secure: object) -> None:
    """Refuse a codec that secure aggregation cannot add (named, with the reason)."""
    if compression is None or secure is None:
        return
    from fedhive.compression.config import check_secure_aggregation

    try:
        check_secure_aggregation(compression.build())
    except ConfigError as exc:
        raise ValueError(f"[compression] with secure_aggregation: {exc}") from None
