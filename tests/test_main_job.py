"""The default experiment reaches its accuracy target (slow: about a minute)."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from fedhive.cli import app


@pytest.mark.slow
def test_default_run_reaches_85_percent_within_three_minutes(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path), "--no-progress"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    reached = [r for r in rows if float(r["centralized_accuracy"] or 0) >= 0.85]
    assert reached, "the default run never reached 85% test accuracy"
    assert float(reached[0]["elapsed_s"]) <= 180.0
    assert float(rows[-1]["centralized_accuracy"]) >= 0.85
