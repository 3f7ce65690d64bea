"""Run-time settings of the round engine."""

from __future__ import annotations

from dataclasses import dataclass

from fedhive.common.errors import ConfigError

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """How many rounds, and what makes a round count.

    ``round_timeout`` (seconds on the engine's clock) is the deadline for each stage of a
    round; clients that have not answered by then count as failures. A round with fewer
    than ``min_fit_results`` successful fit results keeps the previous model (and the
    history says why); ``min_evaluate_results`` does the same for federated evaluation.
    """

    num_rounds: int = 1
    round_timeout: float | None = None
    min_fit_results: int = 1
    min_evaluate_results: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.num_rounds, bool) or not isinstance(self.num_rounds, int):
            raise ConfigError(f"num_rounds must be an int >= 0, got {self.num_rounds!r}")
        if self.num_rounds < 0:
            raise ConfigError(f"num_rounds must be an int >= 0, got {self.num_rounds!r}")
        if self.round_timeout is not None and not self.round_timeout > 0:
            raise ConfigError(
                f"round_timeout must be a positive number of seconds or None, "
                f"got {self.round_timeout!r}"
            )
        for name in ("min_fit_results", "min_evaluate_results"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
