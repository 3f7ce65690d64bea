"""Enrolled SecAgg+ identities: key files, the peers file, and rounds where every client
checks its peers' keys against the enrolled ones (in simulation and as real processes)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from deploy_helpers import DEMO, TINY_SERVER, fedhive
from fedhive.cli import app
from fedhive.common.errors import ConfigError
from fedhive.secagg import SecAggPlusMod, SecAggPlusWorkflow
from fedhive.secagg import primitives as p
from fedhive.secagg.identity import (
    enrolled_mod,
    format_peer,
    load_identity,
    load_peers,
    write_identity,
)
from test_secagg import plain_mean, run

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("restore_process_state")


# -- key files and the peers file ------------------------------------------------------------


def test_an_identity_key_file_round_trips_and_is_private(tmp_path):
    path = tmp_path / "keys" / "site.key"
    public = write_identity(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    secret = load_identity(path)
    assert p.identity_public(secret) == public and len(secret) == 32
    with pytest.raises(ConfigError, match="refusing to replace"):
        write_identity(path)
    assert write_identity(path, overwrite=True) != public


def test_keys_that_are_not_ed25519_identities_are_refused(tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.key").write_bytes(ec_key)
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_identity(tmp_path / "ec.key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_identity(tmp_path / "junk.key")
    with pytest.raises(ConfigError, match="cannot read identity key"):
        load_identity(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="raw 32-byte Ed25519 secret"):
        SecAggPlusMod(identity=b"short")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[identities]\n"a" = "%%%"', "the key of 'a' is not base64"),
        ('[identities]\n"a" = "AAAA"', "has 3 bytes, not 32"),
        ('[identities]\n"a" = 5', "must map to a base64 string"),
        ("[peers]\n", "unknown table or key 'peers'"),
        ("", "has no \\[identities\\] table"),
        ("[identities", "not valid TOML"),
    ],
)
def test_bad_peers_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "peers.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_peers(path)


def test_a_site_must_be_enrolled_under_its_own_key(tmp_path):
    mine, other = p.new_identity(), p.new_identity()
    lines = [format_peer("site \"a\"", p.identity_public(mine)),
             format_peer("b", p.identity_public(other))]  # fmt: skip
    path = tmp_path / "peers.toml"
    path.write_text("[identities]\n" + "\n".join(lines) + "\n")
    peers = load_peers(path)
    assert peers == {'site "a"': p.identity_public(mine), "b": p.identity_public(other)}
    mod = enrolled_mod(mine, peers, 'site "a"')
    assert mod.identity == mine and mod.trusted == peers
    with pytest.raises(ConfigError, match="not the one enrolled for node 'b'"):
        enrolled_mod(mine, peers, "b")
    with pytest.raises(ConfigError, match="not in the peers file"):
        enrolled_mod(mine, peers, "c")


# -- rounds with enrolled identities ----------------------------------------------------------


def _enrolled_run(n, identities, peers):
    """One SecAgg+ round in simulation where node i uses ``identities[i]``."""
    mods = {str(i): SecAggPlusMod(trusted_identities=peers, identity=identities[i])
            for i in range(n)}  # fmt: skip

    def per_node(message, context, call_next):
        return mods[context.node_id](message, context, call_next)

    workflow = SecAggPlusWorkflow(degree="complete", threshold=3, bits=16, clip=0.05)
    history, capture = run(n, workflow, secagg_mod=per_node)
    return history, capture


def test_a_round_where_every_peer_is_enrolled_gives_the_mean():
    identities = [p.new_identity() for _ in range(5)]
    peers = {str(i): p.identity_public(s) for i, s in enumerate(identities)}
    history, capture = _enrolled_run(5, identities, peers)
    assert history.rounds[-1]["fit"]["updated"]
    expected = plain_mean(range(5), 5)
    for got, want in zip(capture.models[1], expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_a_client_whose_key_is_not_the_enrolled_one_is_refused_by_its_peers():
    identities = [p.new_identity() for _ in range(5)]
    peers = {str(i): p.identity_public(s) for i, s in enumerate(identities)}
    identities[4] = p.new_identity()  # as if the server had swapped node 4's key
    history, capture = _enrolled_run(5, identities, peers)
    record = history.rounds[-1]
    assert not record["fit"].get("updated", True)  # the model is kept
    reasons = " ".join(f["reason"] for f in record["failures"])
    assert "identity key that is not enrolled" in reasons
    assert all(np.all(a == 0) for a in capture.models[1])


# -- the command line, and a federation of processes ----------------------------------------------


def test_keygen_prints_the_peers_line_and_the_client_checks_its_flags(tmp_path):
    result = runner.invoke(app, ["secagg", "keygen", "--out", str(tmp_path / "a.key"),
                                 "--node-id", "site-a"])  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith('"site-a" = '))
    peers = tmp_path / "peers.toml"
    peers.write_text(f"[identities]\n{line}\n")
    assert load_peers(peers)["site-a"] == p.identity_public(load_identity(tmp_path / "a.key"))
    again = runner.invoke(app, ["secagg", "keygen", "--out", str(tmp_path / "a.key"),
                                "--node-id", "site-a"])  # fmt: skip
    assert again.exit_code == 2 and "refusing to replace" in again.output

    base = ["client", "--server", "127.0.0.1:1", "--insecure", *DEMO]
    alone = runner.invoke(app, [*base, "--secagg-identity", str(tmp_path / "a.key")])
    assert alone.exit_code == 2 and "go together, with --node-id" in alone.output
    write_identity(tmp_path / "b.key")
    wrong = runner.invoke(app, [*base, "--node-id", "site-a", "--secagg-identity",
                                str(tmp_path / "b.key"), "--secagg-peers", str(peers)])  # fmt: skip
    assert wrong.exit_code == 2 and "not the one enrolled for node 'site-a'" in wrong.output


def test_a_secure_federation_of_enrolled_sites(tmp_path):
    lines = []
    for i in range(3):
        public = write_identity(tmp_path / f"site-{i}.key")
        lines.append(format_peer(f"site-{i}", public))
    (tmp_path / "peers.toml").write_text("[identities]\n" + "\n".join(lines) + "\n")
    config = TINY_SERVER.format(rounds=2).replace("min_fit_clients = 2", "min_fit_clients = 3")
    config = config.replace("min_available_clients = 2", "min_available_clients = 3")
    config = config.replace("[strategy]", "secure_aggregation = { threshold = 2, bits = 16, "
                            "clip = 5.0 }\n[strategy]")  # fmt: skip
    (tmp_path / "server.toml").write_text(config)
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0"
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        base = ["client", "--server", address, "--insecure", *DEMO, "--num-partitions", "3",
                "--secagg-peers", "peers.toml", "--max-retries", "5"]  # fmt: skip
        clients = []
        for i in range(3):
            site = ["--partition-id", str(i), "--node-id", f"site-{i}",
                    "--secagg-identity", f"site-{i}.key"]  # fmt: skip
            clients.append(fedhive(tmp_path, f"c{i}", *base, *site))
        assert server.wait() == 0, server.stderr
        assert [c.wait() for c in clients] == [0, 0, 0], [c.stderr for c in clients]
    finally:
        server.stop()
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert all(r["fit"]["num_results"] == 3 and r["fit"]["updated"] for r in rounds[1:])
    assert all("secagg" in r["fit"] for r in rounds[1:])  # every fit round ran SecAgg+
    assert rounds[-1]["centralized"]["accuracy"] > 0.5
