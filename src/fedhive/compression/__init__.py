"""Update compression: codecs with error feedback, on the uplink and the downlink.

Pick a codec for ``start_simulation``/``start_server`` (``compression=``), or a
``[compression]`` table for ``fedhive run``/``fedhive server``::

    import fedhive as fl

    fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=100,
        compression=fl.compression.TopK(ratio=0.01, error_feedback=True),
    )

The server's :class:`CompressionStage` asks each fit task for an encoding and decodes
each reply; the client's :func:`compression_mod` (in every ``start_client`` stack by
default) encodes the update, client model minus received model. Codecs are in
:mod:`fedhive.compression.codecs`; payload records in :mod:`fedhive.compression.payload`;
encodings that secure aggregation can add in :mod:`fedhive.compression.secure`.
"""

from __future__ import annotations

from fedhive.compression.codecs import BF16, CODECS, EDEN, FP16, QSGD, Codec, RandomK, Sign, TopK
from fedhive.compression.config import Compression, as_compression
from fedhive.compression.mod import RESIDUAL_RECORD, compression_mod, with_compression_mod
from fedhive.compression.stage import CompressionStage

__all__ = [
    "BF16",
    "CODECS",
    "EDEN",
    "FP16",
    "QSGD",
    "RESIDUAL_RECORD",
    "Codec",
    "Compression",
    "CompressionStage",
    "RandomK",
    "Sign",
    "TopK",
    "as_compression",
    "compression_mod",
    "with_compression_mod",
]
