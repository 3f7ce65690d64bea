"""The how-to "Deploy to five hospitals" run as written: its certificate command, its
tokens file, its server.toml and server command, its site policy and its client command
(five real client processes over mutual TLS with tokens), with only the server's
address, the number of rounds and the hospital's number put in."""

from __future__ import annotations

import json
import secrets
import shutil
import tomllib

import pytest
from typer.testing import CliRunner

from deploy_helpers import ROOT, fedhive, stop_all
from docs_helpers import blocks, commands
from fedhive.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]

PAGE = ROOT / "docs" / "howto" / "hospitals.md"
HOSPITALS = [f"hospital-{i}" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def _reap():
    yield
    stop_all()


def _page():
    """The page's blocks by what they are: certs, tokens, server, policy, client."""
    toml = blocks(PAGE, "toml")
    shell = [argv for block in blocks(PAGE, "bash") for argv in commands(block)]
    (certs,) = [argv for argv in shell if argv[0] == "certs"]
    (server,) = [argv for argv in shell if argv[0] == "server"]
    (client,) = [argv for argv in shell if argv[0] == "client"]
    (tokens,) = [b.text for b in toml if "tokens.toml" in b.intro]
    (server_toml,) = [b.text for b in toml if "server.toml" in b.intro]
    (policy,) = [b.text for b in toml if "policy.toml" in b.intro]
    return certs, tokens, server_toml, server, policy, client


def test_five_hospitals_train_over_mutual_tls_with_tokens_as_the_page_says(tmp_path):
    certs, tokens_toml, server_toml, server_argv, policy, client_argv = _page()
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    # 1. certificates: the page's command (the server's also names localhost)
    result = CliRunner().invoke(app, [*certs[:1], str(coordinator / certs[1]), *certs[2:]])
    assert result.exit_code == 0, result.output
    # 2. tokens: the page's file with a secret of each hospital's own
    assert sorted(tomllib.loads(tokens_toml)) == HOSPITALS
    tokens = {h: secrets.token_urlsafe(32) for h in HOSPITALS}
    lines = [f'{h} = "{tokens[h]}"' for h in HOSPITALS]
    (coordinator / "tokens.toml").write_text("\n".join(lines) + "\n")
    assert tokens_toml.count('"..."') == 5
    # 3. the server: the page's server.toml and command, on a free port, for 2 rounds
    (coordinator / "server.toml").write_text(server_toml)
    server = fedhive(
        coordinator, "server", *server_argv, "--address", "127.0.0.1:0", "--rounds", "2",
        "--set", "round_timeout=60", "--set", "wait_timeout=120",
    )  # fmt: skip
    # 4. each hospital in its own folder: its files, the policy, a client made by
    # `fedhive new` saved as hospital.py, and the page's command for its number
    project = tmp_path / "template"
    made = CliRunner().invoke(app, ["new", "proj", "--framework", "numpy", "--dir", str(project)])
    assert made.exit_code == 0, made.output
    address = f"127.0.0.1:{server.port()}"
    sites = []
    for hospital in HOSPITALS:
        site = tmp_path / hospital
        site.mkdir()
        shutil.copy(coordinator / "certs" / "ca.pem", site)
        for suffix in (".pem", ".key"):
            shutil.copy(coordinator / "certs" / f"{hospital}{suffix}", site)
        (site / f"{hospital}.token").write_text(tokens[hospital] + "\n")
        (site / "policy.toml").write_text(policy)
        shutil.copy(project / "proj" / "client.py", site / "hospital.py")
        shutil.copy(project / "proj" / "data.py", site)
        argv = [
            word.replace("fl.example.org:8080", address).replace("hospital-3", hospital)
            for word in client_argv
        ]
        sites.append(fedhive(site, hospital, *argv, "--max-retries", "10"))
    assert server.wait(240) == 0, server.stderr
    assert [s.wait(60) for s in sites] == [0] * 5, [s.stderr for s in sites]
    # what the page says the run writes, and that all five trained in every round
    out = coordinator / "runs" / "hospitals"
    for name in ("history.json", "metrics.csv", "final_model.npz", "checkpoints"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())  # [tracking.tensorboard]
    rounds = [r for r in json.loads((out / "history.json").read_text())["rounds"] if r["round"]]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["fit"]["num_results"] == 5 and not record["failures"], record
    assert rounds[-1]["distributed"]["metrics"]["accuracy"] > 0.5
    for hospital in HOSPITALS:  # one audit line per message that left the hospital
        audit = (tmp_path / hospital / "audit.jsonl").read_text().splitlines()
        kinds = [json.loads(line)["kind"] for line in audit]
        assert kinds.count("fit") == 2 and "evaluate" in kinds, kinds
