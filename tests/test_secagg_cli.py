"""secure_aggregation = { ... } in the TOML of fedhive run and fedhive server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedhive.cli import app
from fedhive.cli.config import validate
from fedhive.cli.server_config import validate_server_config
from fedhive.common import ConfigError

runner = CliRunner()


def test_run_with_secure_aggregation_from_toml(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        f'rounds = 2\nnum_clients = 10\nout = "{tmp_path / "out"}"\n'
        "secure_aggregation = { threshold = 3, degree = 4, bits = 16, clip = 0.5 }\n"
        '[data]\ndataset = "digits"\npartition = "iid"\n[model]\nname = "logreg"\n'
        "[strategy]\nfraction_fit = 0.6\n"
    )
    result = runner.invoke(app, ["run", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    fits = [r["fit"] for r in history["rounds"] if "fit" in r]
    assert [f["secagg"]["threshold"] for f in fits] == [3, 3]
    assert all(f["updated"] and f["secagg"]["after_unmask"] == 6 for f in fits)


@pytest.mark.parametrize(
    "table, pattern",
    [
        ({"treshold": 3}, r"unknown key 'secure_aggregation\.treshold'"),
        ({"bits": 0}, r"secure_aggregation\.bits = 0"),
        ({"degree": "star"}, r"secure_aggregation\.degree"),
        ({"degree": 4, "threshold": 6}, r"threshold=6 exceeds degree=4"),
        ({"ring_bits": 32, "bits": 20}, r"ring is too small"),
        ({"degree": 9, "threshold": 5}, r"below the safe bound"),
        ({"threat_model": "malicious"}, r"needs pinned identities"),
        ({"threat_model": "paranoid"}, r"threat_model"),
    ],
)
def test_bad_secure_aggregation_keys_are_refused(table, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate({"secure_aggregation": table}, "exp.toml")
    with pytest.raises(ConfigError, match=pattern):
        validate_server_config({"secure_aggregation": table}, "server.toml")


def test_strategies_needing_individual_updates_are_refused_with_secure_aggregation():
    for check in (validate, validate_server_config):
        with pytest.raises(ConfigError, match=r"strategy\.name = 'fedmedian': .*fedavg, fedprox"):
            check({"strategy": {"name": "fedmedian"}, "secure_aggregation": {}}, "x.toml")
    validate({"strategy": {"name": "fedprox", "proximal_mu": 0.1}, "secure_aggregation": {}})
