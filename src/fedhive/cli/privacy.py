"""``fedhive privacy``: plan a DP run before running it.

Given delta, the sampling and the number of rounds, it answers either "which noise
multiplier reaches this epsilon?" (``--epsilon``) or "what epsilon does this noise
multiplier give?" (``--noise-multiplier``), with the accountants of
:mod:`fedhive.privacy.accounting`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from fedhive.common.errors import FedhiveError

__all__ = ["privacy_command"]


def privacy_command(
    rounds: Annotated[int, typer.Option(help="number of rounds (or DP-SGD steps)")],
    epsilon: Annotated[
        float | None, typer.Option(help="target epsilon: find the noise multiplier")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option(help="noise multiplier z: find epsilon")
    ] = None,
    delta: Annotated[float, typer.Option(help="delta of the (epsilon, delta) guarantee")] = 1e-5,
    sampling: Annotated[
        str, typer.Option(help="poisson | fixed (m of N, replace-one) | none (no amplification)")
    ] = "poisson",
    sampling_rate: Annotated[float, typer.Option(help="Poisson sampling rate q = m / N")] = 1.0,
    population: Annotated[int, typer.Option(help="N, for --sampling fixed")] = 0,
    cohort: Annotated[int, typer.Option(help="m, for --sampling fixed")] = 0,
    accountant: Annotated[str, typer.Option(help="rdp | pld")] = "rdp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Noise multiplier for a target epsilon, or epsilon for a noise multiplier.

    Example: fedhive privacy --epsilon 2 --delta 1e-5 --sampling-rate 0.01 --rounds 1000
    """
    from fedhive.privacy.accounting import Accounting, epsilon_for, noise_multiplier_for

    out, err = Console(), Console(stderr=True)
    shared = {"sampling": sampling, "sampling_rate": sampling_rate, "population": population,
              "cohort": cohort, "method": accountant}  # fmt: skip
    try:
        Accounting(delta=delta, sampling=sampling, method=accountant)
        if epsilon is not None and noise_multiplier is None:
            z = noise_multiplier_for(
                epsilon, delta, rounds, sampling=sampling, sampling_rate=sampling_rate,
                population=population, cohort=cohort, method=accountant,
            )  # fmt: skip
        elif noise_multiplier is not None and epsilon is None:
            z = noise_multiplier
        else:
            raise FedhiveError("give exactly one of --epsilon or --noise-multiplier")
        eps = epsilon_for(
            z, delta, rounds, sampling=sampling, sampling_rate=sampling_rate,
            population=population, cohort=cohort, method=accountant,
        )  # fmt: skip
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        answer = {"noise_multiplier": z, "epsilon": eps, "delta": delta, "rounds": rounds}
        out.print_json(json.dumps({**answer, **shared}))
        return
    where = {
        "poisson": f"Poisson sampling q={sampling_rate:g}",
        "fixed": f"fixed cohorts of {cohort} out of {population} (replace-one)",
        "none": "no sampling amplification",
    }[sampling]
    out.print(
        f"noise multiplier z = {z:.4f} gives epsilon = {eps:.4f} at "
        f"delta = {delta:g} after {rounds} rounds ({where}, {accountant.upper()} accountant)",
        highlight=False,
    )
