"""The cryptographic and arithmetic pieces of SecAgg+.

- Key agreement: X25519 (``cryptography``), with HKDF-SHA256 turning each shared secret
  into a purpose-bound 32-byte key (share encryption or mask seed).
- Share transport: AES-256-GCM, the associated data binding (run, round, sender, receiver).
- Secret sharing: Shamir (1979) over the prime field GF(2^521 - 1), which holds a 32-byte
  secret in one share, so no chunking is needed.
- Masks: AES-256-CTR keystreams read as little-endian unsigned integers mod 2^ring. Never
  numpy's RNG: a mask must be unpredictable without its seed.
- Quantization: stochastic rounding to integers in [0, 2^bits - 1] (unbiased; each element
  off by less than one step).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from fedhive.common.errors import MissingDependency, ProtocolError

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependency("cryptography", "secagg") from exc

__all__ = [
    "PRIME",
    "KeyPair",
    "agree",
    "combine_shares",
    "conditional_quantize",
    "decrypt_share",
    "dequantize",
    "encrypt_share",
    "MaskExpander",
    "expand_mask",
    "quantize",
    "rounding_bound",
    "split_secret",
]

#: The Mersenne prime 2^521 - 1: larger than any 32-byte secret (2^256).
PRIME = (1 << 521) - 1
SECRET_BYTES = 32
_SHARE_BYTES = 66  # ceil(521 / 8)
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


# -- keys ---------------------------------------------------------------------------------


class KeyPair:
    """An X25519 key pair, with raw 32-byte encodings for messages and client state."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()

    @classmethod
    def from_secret(cls, secret: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(secret))

    @property
    def secret(self) -> bytes:
        return self.private.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(_RAW, _RAW_PUB)


def agree(secret: bytes | KeyPair, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key shared by two parties: HKDF-SHA256 over their X25519 secret.

    ``purpose`` (e.g. ``b"share|run|round"``) separates keys for different uses. Loading
    a raw secret costs about as much as the exchange itself, so a caller agreeing with
    many peers passes the loaded :class:`KeyPair`.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        pair = secret if isinstance(secret, KeyPair) else KeyPair.from_secret(secret)
        shared = pair.private.exchange(peer)
    except ValueError as exc:
        raise ProtocolError(f"invalid X25519 key: {exc}") from exc
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedhive-secagg|" + purpose)
    return hkdf.derive(shared)


def identity_public(secret: bytes) -> bytes:
    """The Ed25519 public key of a raw 32-byte identity secret."""
    key = Ed25519PrivateKey.from_private_bytes(secret)
    return key.public_key().public_bytes(_RAW, _RAW_PUB)


def new_identity() -> bytes:
    """A fresh raw Ed25519 identity secret."""
    return Ed25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIV, _NO_ENC)


def sign(secret: bytes, data: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(secret).sign(data)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public``'s Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except Exception:  # InvalidSignature, or a malformed key/signature
        return False
    return True


# -- share transport ----------------------------------------------------------------------


def encrypt_share(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce followed by ciphertext and tag."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt_share(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """Undo :func:`encrypt_share`; a tampered or misaddressed blob raises ProtocolError."""
    if len(blob) < 12 + 16:
        raise ProtocolError("encrypted share too short")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], associated)
    except Exception as exc:  # InvalidTag
        raise ProtocolError("encrypted share failed authentication") from exc


# -- Shamir secret sharing ----------------------------------------------------------------


def split_secret(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for the points ``xs`` (distinct, 1 <= x < PRIME).

    Any ``threshold`` shares rebuild the secret; fewer reveal nothing about it (the
    polynomial's other coefficients are uniform in the field).
    """
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coefficients):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc.to_bytes(_SHARE_BYTES, "big")
    return shares


def combine_shares(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret behind ``threshold`` (or more) shares: Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    points = sorted(shares.items())[:threshold]
    weights = _lagrange_at_zero(tuple(x for x, _ in points))
    pairs = zip(weights, points, strict=True)
    secret = sum(w * int.from_bytes(share, "big") for w, (_, share) in pairs) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ProtocolError("reconstructed value is not a 32-byte secret (bad shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


@lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> list[int]:
    """Lagrange weights l_j(0) = prod_{m != j} x_m / (x_m - x_j) mod PRIME.

    One modular inversion for all of them (the inverse of the product of denominators,
    then prefix and suffix products), and cached: the same holders recur across clients.
    """
    numerators, denominators = [], []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        numerators.append(num)
        denominators.append(den)
    prefix = [1]
    for den in denominators:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    weights = [0] * len(xs)
    for j in range(len(xs) - 1, -1, -1):
        weights[j] = numerators[j] * inverse * prefix[j] % PRIME
        inverse = inverse * denominators[j] % PRIME
    return weights


# -- masks ----------------------------------------------------------------------------------


def ring_dtype(ring_bits: int) -> np.dtype[np.unsignedinteger]:
    """The unsigned dtype whose wrap-around is arithmetic mod 2^ring_bits."""
    if ring_bits == 32:
        return np.dtype("<u4")
    if ring_bits == 64:
        return np.dtype("<u8")
    raise ValueError(f"ring_bits must be 32 or 64, got {ring_bits}")


def expand_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform integers mod 2^ring_bits from a 32-byte seed (AES-256-CTR)."""
    return MaskExpander(length, ring_bits).expand(seed).copy()


class MaskExpander:
    """Expands many masks of one length into a reused buffer (no allocation per mask).

    :meth:`expand` returns a view that the next call overwrites.
    """

    def __init__(self, length: int, ring_bits: int) -> None:
        self.dtype = ring_dtype(ring_bits)
        self.length = length
        nbytes = length * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        self._out = bytearray(nbytes + 16)  # update_into wants room for a block
        self._view = np.frombuffer(self._out, dtype=self.dtype, count=length)

    def expand(self, seed: bytes) -> np.ndarray:
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(self._zeros, self._out)
        return self._view


# -- quantization ---------------------------------------------------------------------------


def quantize(values: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], then round stochastically to integers in [0, 2^bits - 1].

    With step = 2 clip / (2^bits - 1), ``dequantize`` of the result is unbiased and each
    element is within one step of the clipped value (the rounding draws are float32, so
    "unbiased" holds to 2^-24 of a step).
    """
    levels = (1 << bits) - 1
    scaled = np.clip(values, -clip, clip).astype(np.float64, copy=False)
    scaled += clip
    scaled *= levels / (2.0 * clip)
    scaled += rng.random(scaled.shape, dtype=np.float32)  # floor(x + u) rounds x up w.p. frac(x)
    np.floor(scaled, out=scaled)
    np.clip(scaled, 0, levels, out=scaled)
    return scaled.astype(np.uint64)


def rounding_bound(size: int, clip: float, bits: int, failure: float = 1e-3) -> float:
    """beta: the L2 norm that stochastic rounding adds to a ``size``-element vector,
    exceeded with probability below ``failure``.

    Each element's rounding error is e_i x step with e_i in [-1, 1] and E[e_i^2] <= 1/4, so
    by Hoeffding sum e_i^2 <= size/4 + sqrt(size ln(1/failure) / 2) but with probability
    ``failure``; conditional rounding (:func:`conditional_quantize`) redraws in that case.
    """
    step = 2.0 * clip / ((1 << bits) - 1)
    return step * math.sqrt(size / 4 + math.sqrt(size * math.log(1 / failure) / 2))


def conditional_quantize(
    values: np.ndarray,
    clip: float,
    bits: int,
    rng: np.random.Generator,
    norm_bound: float,
    tries: int = 64,
) -> np.ndarray:
    """:func:`quantize`, redrawn until the dequantized vector's L2 norm is at most
    ``norm_bound``: conditional randomized rounding (Kairouz, Liu, Steinke 2021, "The
    Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
    Aggregation"). With ``norm_bound = C + rounding_bound(...)`` and an input of norm at
    most C, a draw is rejected with probability below 1e-3, so what is released never
    has a norm above what the DP accountant assumes. Raises ProtocolError when no draw
    fits (an input that was not clipped to C).
    """
    step = 2.0 * clip / ((1 << bits) - 1)
    for _ in range(tries):
        q = quantize(values, clip, bits, rng)
        released = q.astype(np.float64) * step - clip
        if float(np.sqrt(np.dot(released, released))) <= norm_bound:
            return q
    raise ProtocolError(
        f"conditional rounding: no rounding of the update has norm <= {norm_bound:.6g} "
        f"in {tries} draws (was the update clipped to the DP clipping norm?)"
    )


def dequantize(total: np.ndarray, weight_sum: int, clip: float, bits: int) -> np.ndarray:
    """The weighted mean behind ``total`` = sum of weight x quantized values."""
    step = 2.0 * clip / ((1 << bits) - 1)
    return total.astype(np.float64) * (step / weight_sum) - clip
