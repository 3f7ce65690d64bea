"""The how-to "Deploy to five hospitals" run as written: its certificate command, its
tokens file, its server.toml and server command, its site policy and its client command
(five real client processes over mutual TLS with tokens), then again with its SecAgg+
step (identity keys, the peers file, the server's secure_aggregation key and the
clients' flags), with only the server's address, the number of rounds and the
hospital's number put in."""

from __future__ import annotations

import json
import re
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
    """The page's blocks by what they are."""
    toml = blocks(PAGE, "toml")
    shell = [argv for block in blocks(PAGE, "bash") for argv in commands(block)]

    def one(found):
        (only,) = found
        return only

    clients = [argv for argv in shell if argv[0] == "client"]
    return {
        "certs": one([argv for argv in shell if argv[0] == "certs"]),
        "tokens": one([b.text for b in toml if "tokens.toml" in b.intro]),
        "server.toml": one(
            [b.text for b in toml if "server.toml" in b.intro and "address" in b.text]
        ),
        "server": one([argv for argv in shell if argv[0] == "server"]),
        "policy": one([b.text for b in toml if "policy.toml" in b.intro]),
        "client": one([argv for argv in clients if "--secagg-identity" not in argv]),
        "keygen": one([argv for argv in shell if argv[:2] == ["secagg", "keygen"]]),
        "peers": one([b.text for b in toml if "[identities]" in b.text]),
        "secagg": one([b.text for b in toml if b.text.startswith("secure_aggregation")]),
        "secagg client": one([argv for argv in clients if "--secagg-identity" in argv]),
    }


def _for(argv, hospital, address=""):
    """The page's command for ``hospital`` (its example is hospital-3) and ``address``."""
    return [
        word.replace("fl.example.org:8080", address).replace("hospital-3", hospital)
        for word in argv
    ]


@pytest.mark.parametrize("secagg", [False, True], ids=["tls-tokens", "with-secagg"])
def test_five_hospitals_train_as_the_page_says(tmp_path, secagg):
    page = _page()
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    # 1. certificates: the page's command (the server's also names localhost)
    certs = page["certs"]
    result = CliRunner().invoke(app, [*certs[:1], str(coordinator / certs[1]), *certs[2:]])
    assert result.exit_code == 0, result.output
    # 2. tokens: the page's file with a secret of each hospital's own
    assert sorted(tomllib.loads(page["tokens"])) == HOSPITALS
    assert page["tokens"].count('"..."') == 5
    tokens = {h: secrets.token_urlsafe(32) for h in HOSPITALS}
    lines = [f'{h} = "{tokens[h]}"' for h in HOSPITALS]
    (coordinator / "tokens.toml").write_text("\n".join(lines) + "\n")
    # each hospital's folder: the files the coordinating site sent, its policy, and a
    # client made by `fedhive new` saved as hospital.py
    project = tmp_path / "template"
    made = CliRunner().invoke(app, ["new", "proj", "--framework", "numpy", "--dir", str(project)])
    assert made.exit_code == 0, made.output
    for hospital in HOSPITALS:
        site = tmp_path / hospital
        site.mkdir()
        shutil.copy(coordinator / "certs" / "ca.pem", site)
        for suffix in (".pem", ".key"):
            shutil.copy(coordinator / "certs" / f"{hospital}{suffix}", site)
        (site / f"{hospital}.token").write_text(tokens[hospital] + "\n")
        (site / "policy.toml").write_text(page["policy"])
        shutil.copy(project / "proj" / "client.py", site / "hospital.py")
        shutil.copy(project / "proj" / "data.py", site)
    server_toml, client_argv = page["server.toml"], page["client"]
    if secagg:  # 5. each hospital's key, the peers file, the server's key, the flags
        peers = []
        for hospital in HOSPITALS:
            argv = [*_for(page["keygen"], hospital)]
            argv[argv.index("--out") + 1] = str(tmp_path / hospital / argv[argv.index("--out") + 1])
            made = CliRunner().invoke(app, argv)
            assert made.exit_code == 0, made.output
            peers.append(re.search(rf'^"{hospital}" = "[^"]+"$', made.output, re.M).group(0))
        assert page["peers"].count('"..."') == 5
        (coordinator / "peers.toml").write_text("[identities]\n" + "\n".join(peers) + "\n")
        for hospital in HOSPITALS:
            shutil.copy(coordinator / "peers.toml", tmp_path / hospital)
        server_toml = page["secagg"] + "\n" + server_toml
        client_argv = page["secagg client"]
    # 3. the server: the page's server.toml and command, on a free port, for 2 rounds
    (coordinator / "server.toml").write_text(server_toml)
    server = fedhive(
        coordinator, "server", *page["server"], "--address", "127.0.0.1:0", "--rounds", "2",
        "--set", "round_timeout=60", "--set", "wait_timeout=120",
    )  # fmt: skip
    # 4. the page's client command at each hospital
    address = f"127.0.0.1:{server.port()}"
    sites = [
        fedhive(tmp_path / h, h, *_for(client_argv, h, address), "--max-retries", "10")
        for h in HOSPITALS
    ]
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
        if secagg:  # the server unmasked the sum of all five
            assert record["fit"]["secagg"]["after_unmask"] == 5, record["fit"]
        else:
            assert "secagg" not in record["fit"]
    assert rounds[-1]["distributed"]["metrics"]["accuracy"] > 0.5
    for hospital in HOSPITALS:  # one audit line per message that left the hospital
        audit = (tmp_path / hospital / "audit.jsonl").read_text().splitlines()
        kinds = [json.loads(line)["kind"] for line in audit]
        assert kinds.count("fit") >= 2 and "evaluate" in kinds, kinds
