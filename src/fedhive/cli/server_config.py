"""The config of ``fedhive server``: its TOML tables, validation, tokens and certificates.

The ``[strategy]`` table is ``fedhive run``'s (a strategy by ``name`` and its parameters,
one model per strategy in :mod:`fedhive.cli.strategies`, validated the same way) with the
defaults of a deployment, where every connected site takes part, and
``min_available_clients`` (:class:`DeployStrategyConfig`). The ``[policy]`` table is
``fedhive run``'s too (:mod:`fedhive.cli.policies`): ``name = "buffered-async"`` with
``buffer_size`` and ``concurrency`` publishes a model every ``buffer_size`` results while
``concurrency`` sites train, and ``rounds`` counts model versions.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from fedhive.cli.compression_config import (
    CompressionConfig,
    check_compression_secure,
)
from fedhive.cli.config import (
    ModelConfig,
    SecureAggregationConfig,
    StrategyConfig,
    TrainConfig,
    check_policy_round_size,
    check_round_size,
    check_secure_policy,
    check_secure_strategy,
    describe_error,
)
from fedhive.cli.deploy_common import read_file
from fedhive.cli.policies import PolicyConfig, SyncConfig
from fedhive.cli.stragglers import check_strategy_policy
from fedhive.cli.tracking import TrackingConfig
from fedhive.common.errors import ConfigError
from fedhive.transport.base import DEFAULT_MIN_UPLOAD_RATE, DEFAULT_STAGED_BYTES

__all__ = [
    "DeployConfig",
    "DeployModelConfig",
    "DeployStrategyConfig",
    "DeployTrainConfig",
    "MemoryConfig",
    "check_client_auth",
    "load_tokens",
    "server_certificates",
    "validate_server_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Section):
    ca: str = Field("", description="CA certificate (PEM); needed for require_client_auth")
    cert: str = Field("", description="the server's certificate (PEM)")
    key: str = Field("", description="the server's private key (PEM)")


class DeployStrategyConfig(StrategyConfig):
    """``[strategy]`` of the server: as in ``fedhive run``, but every connected site fits
    and evaluates by default, and rounds wait for ``min_available_clients`` sites.

    The base of the server's strategy tables: validating it picks the registered model of
    ``name`` (:mod:`fedhive.cli.strategies`) with these defaults and this key added, so
    the server takes every strategy ``fedhive run`` takes. A robust rule must get enough
    results even when only ``min_available_clients`` sites are connected (Krum
    ``2f + 3``, Bulyan ``4f + 3``); otherwise the config is refused.
    """

    sampling_keys = (*StrategyConfig.sampling_keys, "min_available_clients")

    fraction_fit: float = Field(1.0, ge=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_available_clients: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_round_size(self) -> Self:
        check_round_size(
            self,
            self.sample_size(self.min_available_clients),
            f"with min_available_clients = {self.min_available_clients} sites connected, "
            f"fraction_fit = {self.fraction_fit} (min_fit_clients = {self.min_fit_clients})",
            "raise strategy.min_available_clients or strategy.min_fit_clients",
        )
        return self


class DeployModelConfig(_Section):
    """``[model]`` of the server: where the initial model comes from.

    ``name = "client"`` (the default) serves the clients' own model: as in Flower, the
    initial parameters come from one connected client's ``get_parameters``, and every
    update must have that client's layout (a mismatch is refused, naming the array and
    both shapes). ``cnn1d``, ``mlp`` and ``logreg`` are the reference models of
    ``fedhive run``, initialised from ``seed`` and evaluated on ``[data]``'s test split.
    ``initial_parameters`` (an ``.npz`` file, e.g. a ``final_model.npz``) replaces the
    initial model of either kind.
    """

    name: Literal["client", "cnn1d", "mlp", "logreg"] = Field(
        "client", description='"client": the model one connected client brings'
    )
    hidden: int = Field(128, ge=1, description="hidden width of the MLP")
    initial_parameters: str = Field(
        "", description=".npz file of the initial model (arrays arr_0, arr_1, ...)"
    )

    @property
    def from_client(self) -> bool:
        """Whether the server holds no model of its own (``name = "client"``)."""
        return self.name == "client"

    def reference(self) -> ModelConfig:
        """The ``fedhive run`` model table of a reference model."""
        return ModelConfig(name=self.name, hidden=self.hidden)


class DeployTrainConfig(TrainConfig):
    """``[train]`` of the server, sent with every fit: ``fedhive run``'s keys, with
    defaults for sites that hold thousands of samples each (the demo's 2 or 3 partitions
    of MNIST-1D hold about 7,000): at most ``max_steps = 100`` local steps of
    ``batch_size = 32`` per round, whatever the partition's size, so that local models
    do not drift apart on their skewed labels. Two demo sites then reach about 67%
    accuracy in 5 rounds (``docs/deployment.md``)."""

    batch_size: int = Field(32, description="minibatch size; 0 = full batch (FedSGD)")
    max_steps: int = Field(
        100, ge=0, description="at most this many local steps per round (0 = every epoch's)"
    )


class DeployDataConfig(_Section):
    dataset: Literal["mnist1d", "digits", "synthetic", "folder"] = "mnist1d"
    num_samples: int = Field(20_000, ge=100, description="MNIST-1D samples to generate")
    path: str = Field("", description="folder of train/test .npz or .csv (dataset = folder)")


class MemoryConfig(_Section):
    """``[memory]``: where uploads wait until they are folded, and the aggregate's type.

    See docs/deployment.md, "Performance and memory".
    """

    accumulator: Literal["float64", "model"] = Field(
        "float64",
        description='FedAvg-family aggregate: "float64" (exact) or "model" (float32 layers in '
        "float32: half the memory)",
    )
    spill_bytes: int = Field(
        DEFAULT_STAGED_BYTES, ge=0, description="uploads this large or larger go to disk; 0 = never"
    )
    spill_dir: str = Field("", description="directory for spilled uploads (default: system temp)")
    max_staged_uploads: int = Field(2, ge=1, description="in-memory uploads held at once")
    max_staged_bytes: int = Field(
        DEFAULT_STAGED_BYTES, ge=0, description="their total size, beyond the first"
    )
    upload_window_bytes: int = Field(
        0, ge=0, description="fixed gRPC flow-control window per client; 0 = gRPC's adaptive one"
    )
    min_upload_rate: float = Field(
        DEFAULT_MIN_UPLOAD_RATE,
        ge=0,
        allow_inf_nan=False,
        description="bytes/s an upload holding a slot must average while others wait",
    )
    upload_grace_s: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="before that is checked, and most silence"
    )

    @field_validator("spill_dir")
    @classmethod
    def _existing_dir(cls, value: str) -> str:
        if value and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a directory")
        return value

    def server_options(self) -> dict[str, Any]:
        """The matching keyword arguments of ``start_server``."""
        return {
            "spill_bytes": self.spill_bytes or None,
            "spill_dir": self.spill_dir or None,
            "max_staged_uploads": self.max_staged_uploads,
            "max_staged_bytes": self.max_staged_bytes,
            "upload_window_bytes": self.upload_window_bytes or None,
            "min_upload_rate": self.min_upload_rate,
            "upload_grace_s": self.upload_grace_s,
        }


class DeployConfig(_Section):
    """The config of ``fedhive server`` (see :mod:`fedhive.cli.deploy`)."""

    address: str = "0.0.0.0:8080"
    rounds: int = Field(10, ge=1, description="rounds (model versions under any policy)")
    round_timeout: float | None = Field(None, gt=0)
    wait_timeout: float = Field(24 * 3600.0, gt=0)
    seed: int = 0
    out: str = "runs/server"
    checkpoint_dir: str = ""
    resume: bool = False
    require_client_auth: bool = False
    tokens: str = ""
    data_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="TCP port of the data plane that moves messages of 8 MiB or more beside "
        "the gRPC stream (same TLS, one-use tickets); 0 = any free port, -1 = none",
    )
    tls: TlsConfig = TlsConfig()
    strategy: SerializeAsAny[DeployStrategyConfig] = DeployStrategyConfig.model_validate({})
    model: DeployModelConfig = DeployModelConfig()
    data: DeployDataConfig = DeployDataConfig()
    train: DeployTrainConfig = DeployTrainConfig()
    secure_aggregation: SecureAggregationConfig | None = None
    memory: MemoryConfig = MemoryConfig()
    policy: SerializeAsAny[PolicyConfig] = SyncConfig()
    compression: CompressionConfig | None = None
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _check_secure_strategy(self) -> Self:
        check_strategy_policy(self.strategy, self.policy, None, self.secure_aggregation is not None)
        check_secure_strategy(self.secure_aggregation, self.strategy)
        check_secure_policy(self.secure_aggregation, self.policy)
        check_compression_secure(self.compression, self.secure_aggregation)
        # the sampling check of [strategy] (min_available_clients) ran already; under an
        # asynchronous policy each version's results are buffer_size instead
        check_policy_round_size(self.strategy, self.policy)
        return self


def validate_server_config(
    data: dict[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> DeployConfig:
    """Validate a plain dict into a :class:`DeployConfig` (ConfigError if bad);
    ``sources`` labels keys that did not come from ``source`` (``"--set"``, a flag)."""
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as exc:
        lines = [describe_error(e, source, DeployConfig, sources) for e in exc.errors()]  # type: ignore[arg-type]
        raise ConfigError("invalid server configuration:\n  " + "\n  ".join(lines)) from None


def load_tokens(path: str | Path) -> dict[str, str]:
    """Enrolled clients from a TOML or JSON file (``.json``) of ``node_id = "token"``."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML errors are ValueErrors
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"tokens file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"tokens file {path} must map node ids to tokens, got {type(data)}")
    for node, token in data.items():
        if not isinstance(token, str) or not token:
            raise ConfigError(
                f"tokens file {path}: the token of {node!r} must be a non-empty string, "
                f"got {token!r}"
            )
    if not data:
        raise ConfigError(f"tokens file {path} enrolls no client; every client would be refused")
    return dict(data)


_NO_CLIENT_AUTH = (
    "fedhive server requires client authentication: without it any process that reaches "
    "the port joins under any node id, as often as it likes (and counts as that many "
    "secure aggregation peers). Enroll the sites with --tokens TOKENS.toml (tokens), or "
    "--require-client-auth with --ca CA.pem (mutual TLS; each site's node id is then bound "
    "to its certificate), or the same in the config; pass --insecure to let anyone join "
    "(for tests only)"
)


def check_client_auth(cfg: DeployConfig, insecure: bool) -> None:
    """Refuse a server that authenticates no client (no tokens, no mutual TLS) unless
    ``insecure``: enrollment is what keeps out Sybil identities and node-id squatters."""
    if not insecure and not cfg.tokens and not cfg.require_client_auth:
        raise ConfigError(_NO_CLIENT_AUTH)


_SERVER_NEEDS_TLS = (
    "fedhive server requires TLS: give --cert SERVER.pem --key SERVER_KEY.pem (and --ca "
    "CA.pem with --require-client-auth), or the same in the [tls] table of the config; "
    "pass --insecure to serve without encryption (for tests on one machine only)"
)


def server_certificates(cfg: DeployConfig, insecure: bool) -> tuple[bytes, bytes, bytes] | None:
    """``(ca, cert, key)`` for ``start_server``, or ``None`` with ``--insecure`` and no
    TLS settings.

    Refuses to serve without TLS unless ``insecure``, and refuses contradictions (mutual
    TLS without TLS, or without a CA). ``--insecure`` with TLS settings serves TLS; it
    then only waives client authentication (:func:`check_client_auth`).
    """
    tls = cfg.tls
    if not (tls.cert or tls.key or tls.ca):
        if insecure:
            if cfg.require_client_auth:
                raise ConfigError(
                    "--require-client-auth needs TLS; it cannot be used with --insecure alone "
                    "(give --ca, --cert and --key)"
                )
            return None
        raise ConfigError(_SERVER_NEEDS_TLS)
    if not (tls.cert and tls.key):
        raise ConfigError(_SERVER_NEEDS_TLS)
    if cfg.require_client_auth and not tls.ca:
        raise ConfigError(
            "--require-client-auth needs --ca CA.pem (tls.ca): the CA that signs client "
            "certificates"
        )
    ca = read_file(tls.ca, "CA certificate") if tls.ca else b""
    return ca, read_file(tls.cert, "server certificate"), read_file(tls.key, "server key")
