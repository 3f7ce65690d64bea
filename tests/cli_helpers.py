"""A small `fedhive run` config for the CLI tests: logistic regression on digits."""

from __future__ import annotations

from pathlib import Path

_RUN = """\
rounds = {rounds}
num_clients = {num_clients}
seed = 1
out = "{out}"
[data]
dataset = "digits"
[model]
name = "logreg"
[train]
lr = 0.1
{train}
[strategy]
fraction_fit = 0.5
fraction_evaluate = 0.5
{strategy}
{tables}
"""


def run_toml(
    out: Path,
    *,
    rounds: int = 2,
    num_clients: int = 8,
    train: str = "",
    strategy: str = "",
    tables: str = "",
) -> str:
    """The config of a run writing to ``out``: half the clients sampled per round, with
    more lines for ``[train]`` and ``[strategy]`` and more ``tables`` after them."""
    return _RUN.format(
        rounds=rounds,
        num_clients=num_clients,
        out=out.as_posix(),
        train=train,
        strategy=strategy,
        tables=tables,
    )
