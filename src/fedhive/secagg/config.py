"""SecAgg+ parameters: neighbour graph, threshold, quantization and ring size.

Defaults follow Bell et al. 2020 ("Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"): each client talks to k = O(log n) random neighbours, and
the threshold t sits between the number of neighbours the adversary may hold and the
number that may drop. :func:`default_degree` picks the smallest k for which a
t exists with both failure events (an honest client with >= t corrupted neighbours; a
client left with < t live neighbours) below ``failure_probability`` for the whole round
(union bound over the n clients), at the stated corrupted and dropout fractions. When
that k reaches n - 1 the graph is complete: Bonawitz et al. 2017 ("Practical Secure
Aggregation for Privacy-Preserving Machine Learning") is the special case.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from fedhive.common.errors import ConfigError
from fedhive.secagg.graph import harary_graph

#: The threat models of ``SecAggConfig.threat_model`` (docs/secure_aggregation.md).
THREAT_MODELS = ("honest-but-curious", "malicious")

__all__ = [
    "SecAggConfig",
    "corrupt_bound",
    "default_degree",
    "default_threshold",
    "neighbour_graph",
    "safe_threshold",
]


def _tails(k: int, p: float) -> list[float]:
    """``tails[j] = P[Binomial(k, p) >= j]`` for j = 0 .. k + 1 (log-space terms, so any k)."""
    if p <= 0.0:
        return [1.0] + [0.0] * (k + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    head = math.lgamma(k + 1)
    pmf = [
        math.exp(head - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * log_p + (k - i) * log_q)
        for i in range(k + 1)
    ]
    tails = [0.0] * (k + 2)
    for i in range(k, -1, -1):  # smallest terms first
        tails[i] = tails[i + 1] + pmf[i]
    return tails


def _hyper_tail(population: int, marked: int, draws: int) -> list[float]:
    """``tail[j] = P[X >= j]`` for X ~ Hypergeometric(population, marked, draws)."""
    draws = max(0, min(draws, population))
    marked = max(0, min(marked, population))

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    total = log_choose(population, draws)
    pmf = [0.0] * (draws + 1)
    for j in range(max(0, draws - (population - marked)), min(marked, draws) + 1):
        pmf[j] = math.exp(
            log_choose(marked, j) + log_choose(population - marked, draws - j) - total
        )
    tail = [0.0] * (draws + 2)
    for j in range(draws, -1, -1):
        tail[j] = tail[j + 1] + pmf[j]
    return tail


@lru_cache(maxsize=4096)
def corrupt_bound(n: int, degree: int, corrupt_fraction: float, failure: float = 1e-6) -> int:
    """The most corrupted neighbours any honest client has, except with probability
    ``failure`` over the neighbour graph (union bound over the n clients).

    floor(corrupt_fraction x n) of the n clients are corrupted; an honest client's k
    neighbours are a uniform k-subset of the n - 1 others, so the count is
    hypergeometric; with the complete graph it is every corrupted client.
    """
    corrupt = math.floor(corrupt_fraction * n + 1e-9)
    if corrupt <= 0 or degree <= 0:
        return 0
    tail = _hyper_tail(max(n - 1, 1), corrupt, degree)
    per_client = failure / (2 * max(n, 1))
    return next(c for c in range(len(tail) - 1) if tail[c + 1] <= per_client)


def safe_threshold(
    degree: int, n: int = 0, corrupt_fraction: float = 0.0, failure: float = 1e-6
) -> int:
    """The smallest threshold that a lying server plus colluders cannot open.

    A server that shows one client alive to some honest neighbours (who reveal its
    self-mask seed share) and dropped to the others (who reveal its mask-key share), with
    c colluding neighbours that reveal both, collects |A| + c and |B| + c shares with
    |A| + |B| <= k - c: both reach t only if 2t <= k + c. So t must exceed (k + c) / 2
    for the high-probability bound c of :func:`corrupt_bound`, and never be below
    Bonawitz et al.'s floor(2k/3) + 1 (which covers c <= k/3 whatever the fractions).
    """
    if degree <= 0:
        return 1
    c = corrupt_bound(n, degree, corrupt_fraction, failure) if n > 0 else 0
    return max(1, (2 * degree) // 3 + 1, (degree + c) // 2 + 1)


@lru_cache(maxsize=256)
def _plan(n: int, corrupt: float, dropout: float, failure: float) -> tuple[int, int]:
    """(degree, threshold) as described in the module docstring.

    For each k the threshold is :func:`safe_threshold` (the smallest a lying server with
    colluders cannot open; a larger one only makes the dropout event likelier); the first
    k whose clients keep t live neighbours with high probability wins. With odd n only
    even k are tried: that is the degree the graph will have, and t is checked for it.
    """
    if n <= 1:
        return max(n - 1, 0), 1
    per_client = failure / (2 * n)
    dropped = math.ceil(dropout * n - 1e-9)
    start = max(2, 2 * math.ceil(math.log2(n)))
    for k in range(start, n - 1):
        if k % 2 and n % 2:
            continue  # a Harary graph on an odd number of clients has an even degree
        t = safe_threshold(k, n, corrupt, failure)
        if t > k:
            continue
        if _hyper_tail(n - 1, dropped, k)[k - t + 1] <= per_client:
            return k, t
    k = n - 1
    return k, min(k, safe_threshold(k, n, corrupt, failure)) if k > 0 else 1


def default_degree(
    n: int, corrupt_fraction: float = 0.1, dropout_fraction: float = 0.1, failure: float = 1e-6
) -> int:
    """The neighbour count k for n clients (n - 1 means the complete graph)."""
    return _plan(n, corrupt_fraction, dropout_fraction, failure)[0]


def default_threshold(degree: int) -> int:
    """Bonawitz et al.'s choice for an actively lying server: t > 2k/3."""
    return max(1, (2 * degree) // 3 + 1)


def neighbour_graph(ids: list[int], degree: int, rng: random.Random) -> dict[int, list[int]]:
    """A k-regular graph on ``ids``: a Harary graph over a random order of the clients.

    Each client is joined to the k/2 clients on either side of it in a random cycle (for
    odd k and even n, also to the client opposite). ``degree >= len(ids) - 1`` gives the
    complete graph. An odd k with an odd number of clients is raised to k + 1. A round
    derives its order from every client's randomness instead (:mod:`fedhive.secagg.graph`).
    """
    order = list(ids)
    rng.shuffle(order)
    graph = harary_graph(order, degree)
    return {i: graph[i] for i in ids}


@dataclass(frozen=True)
class SecAggConfig:
    """What ``secure_aggregation = { ... }`` in the TOML says, checked at construction.

    - ``threshold``: shares needed to rebuild a client's secrets (default: from the
      degree, see :func:`default_degree`; with an explicit ``degree``, t > 2k/3).
    - ``degree``: neighbours per client; ``None`` picks it from n each round,
      ``"complete"`` (or any k >= n - 1) is the complete graph.
    - ``bits``: quantization levels 2^bits per element (error <= 2 clip / (2^bits - 1)).
    - ``clip``: each update element is clipped to [-clip, clip] before quantization.
    - ``max_weight``: the largest client weight (num_examples); larger ones are refused.
    - ``max_clients``: the most clients in one round; with ``max_weight`` and ``bits`` it
      sizes the ring: ``max_clients * max_weight * 2^bits < 2^ring_bits``.
    - ``ring_bits``: 32 or 64; default the smallest that fits.
    - ``corrupt_fraction``/``dropout_fraction``/``failure_probability``: the threat
      model behind the default degree and threshold; an explicit threshold below
      :func:`safe_threshold` is refused, and clients refuse one too.
    - ``threat_model``: ``"honest-but-curious"`` (default) or ``"malicious"``; the
      malicious-server model needs pinned identities, so it needs ``peers`` (the peers
      file every site pins, see :mod:`fedhive.secagg.identity`).
    - ``peers``: path of that peers file; the server then also refuses clients that are
      not enrolled or advertise another identity key.
    """

    threshold: int | None = None
    degree: int | str | None = None
    bits: int = 12
    clip: float = 1.0
    max_weight: int = 1000
    max_clients: int = 1000
    ring_bits: int | None = None
    corrupt_fraction: float = 0.1
    dropout_fraction: float = 0.1
    failure_probability: float = 1e-6
    threat_model: str = "honest-but-curious"
    peers: str | None = None

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise ConfigError(
                f"secure_aggregation.threat_model must be one of {', '.join(THREAT_MODELS)}, "
                f"got {self.threat_model!r}"
            )
        if self.peers is not None and not isinstance(self.peers, str):
            raise ConfigError(f"secure_aggregation.peers must be a path, got {self.peers!r}")
        if self.threat_model == "malicious" and not self.peers:
            raise ConfigError(
                "secure_aggregation.threat_model = 'malicious' needs pinned identities: set "
                "secure_aggregation.peers to the peers file that every client pins "
                "(fedhive secagg keygen; fedhive client --secagg-peers). Without them the "
                "protection is against an honest-but-curious server only"
            )
        _check_int("bits", self.bits, 1, 62)
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float):
            raise ConfigError(f"secure_aggregation.clip must be a number, got {self.clip!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure_aggregation.clip must be > 0, got {self.clip!r}")
        _check_int("max_weight", self.max_weight, 1, 2**62)
        _check_int("max_clients", self.max_clients, 2, 2**40)
        if self.threshold is not None:
            _check_int("threshold", self.threshold, 1, 2**40)
        if isinstance(self.degree, str):
            if self.degree != "complete":
                raise ConfigError(
                    f"secure_aggregation.degree must be an int >= 1, 'complete' or unset, "
                    f"got {self.degree!r}"
                )
        elif self.degree is not None:
            _check_int("degree", self.degree, 1, 2**40)
            if self.threshold is not None and self.threshold > self.degree:
                raise ConfigError(
                    f"secure_aggregation.threshold={self.threshold} exceeds degree="
                    f"{self.degree}: a client's secrets are shared among its degree "
                    "neighbours only"
                )
            if self.threshold is not None and self.threshold < default_threshold(self.degree):
                raise ConfigError(
                    f"secure_aggregation.threshold={self.threshold} is below the safe bound "
                    f"floor(2k/3) + 1 = {default_threshold(self.degree)} for degree="
                    f"{self.degree}: a server that lies about dropouts could rebuild both "
                    "secrets of a client (see docs/secure_aggregation.md)"
                )
        for name in ("corrupt_fraction", "dropout_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 0.5:
                raise ConfigError(f"secure_aggregation.{name} must be in [0, 0.5), got {value}")
        if not 0 < self.failure_probability < 1:
            raise ConfigError("secure_aggregation.failure_probability must be in (0, 1)")
        need = self.max_clients * self.max_weight * (1 << self.bits)
        if self.ring_bits is None:
            ring = 32 if need < 2**32 else 64
            object.__setattr__(self, "ring_bits", ring)
        if self.ring_bits not in (32, 64):
            raise ConfigError(
                f"secure_aggregation.ring_bits must be 32 or 64, got {self.ring_bits}"
            )
        if need >= 2 ** int(self.ring_bits):
            raise ConfigError(
                f"the ring is too small: max_clients x max_weight x 2^bits = {need} is not "
                f"below 2^{self.ring_bits}, so sums could wrap around; lower bits, "
                "max_weight or max_clients"
            )

    @property
    def ring(self) -> int:
        """``ring_bits``, which ``__post_init__`` has always set."""
        return int(self.ring_bits or 64)

    @property
    def quantization_error(self) -> float:
        """The most any element of the secure mean differs from the plain mean of the
        clipped updates: one quantization step."""
        return 2.0 * self.clip / ((1 << self.bits) - 1)

    def plan(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for a round with n clients."""
        if n > self.max_clients:
            raise ConfigError(
                f"{n} clients in a round, more than secure_aggregation.max_clients="
                f"{self.max_clients} that the ring was sized for"
            )
        if self.degree is None:
            degree, planned = _plan(
                n, self.corrupt_fraction, self.dropout_fraction, self.failure_probability
            )
        else:
            degree = self.implied_degree(n)
            planned = min(max(degree, 1), self.safe_threshold(degree, n))
        threshold = planned if self.threshold is None else self.threshold
        if threshold > max(degree, 1):
            raise ConfigError(
                f"secure_aggregation.threshold={threshold} exceeds the {degree} neighbours "
                f"each client has with {n} clients in the round"
            )
        safe = self.safe_threshold(degree, n)
        if threshold < safe:
            raise ConfigError(
                f"secure_aggregation.threshold={threshold} is below the safe bound {safe} "
                f"for {degree} neighbours with {n} clients and corrupt_fraction="
                f"{self.corrupt_fraction} (docs/secure_aggregation.md)"
            )
        return degree, threshold

    def implied_degree(self, n: int) -> int:
        """The neighbour count of a round with n clients, as its clients work it out:
        an odd k with an odd n is raised to k + 1 (see :func:`neighbour_graph`)."""
        if self.degree is None:
            return _plan(n, self.corrupt_fraction, self.dropout_fraction, self.failure_probability)[
                0
            ]
        degree = n - 1 if self.degree == "complete" else min(int(self.degree), n - 1)
        if degree < n - 1 and degree % 2 and n % 2:
            degree += 1
        return degree

    def safe_threshold(self, degree: int, n: int) -> int:
        """:func:`safe_threshold` for this config's corrupt fraction and failure bound."""
        return safe_threshold(degree, n, self.corrupt_fraction, self.failure_probability)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"secure_aggregation.{name} must be an int in [{low}, {high}], got {value!r}"
        )
