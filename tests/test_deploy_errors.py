"""TLS and connection mistakes in plain words, and ``fedhive certs``: real processes on
127.0.0.1."""

from __future__ import annotations

import stat
import sys

import pytest
from typer.testing import CliRunner

from deploy_helpers import ROOT, Proc, fedhive, stop_all
from fedhive.cli import app
from fedhive.cli.certs_cmd import make_certificates

runner = CliRunner()
FILES = ("ca", "server", "site-0", "site-1")


@pytest.fixture(autouse=True)
def _reap():
    yield
    stop_all()


def test_fedhive_certs_writes_a_ca_server_and_sites_with_private_keys(tmp_path):
    result = runner.invoke(app, ["certs", str(tmp_path / "certs"), "--host", "example.org"])
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert (tmp_path / "certs" / f"{name}.pem").read_text().startswith("-----BEGIN CERT")
        key = tmp_path / "certs" / f"{name}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, name
    from cryptography import x509

    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "example.org"} <= set(names.get_values_for_type(x509.DNSName))
    again = runner.invoke(app, ["certs", str(tmp_path / "certs")])
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    assert runner.invoke(app, ["certs", str(tmp_path / "certs"), "--overwrite"]).exit_code == 0


def _client(tmp_path, name, address, *tls):
    return fedhive(
        tmp_path,
        name,
        "client",
        "--server",
        address,
        "--demo",
        "--dataset",
        "digits",
        "--model",
        "logreg",
        "--max-retries",
        "0",
        *tls,
    )


def _one_line_error(proc: Proc) -> str:
    assert proc.wait() == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "TransportError" not in errors[0] and "StatusCode" not in errors[0]
    return errors[0]


@pytest.mark.slow
def test_tls_mistakes_are_one_line_hints_naming_the_flag(tmp_path):
    certs = tmp_path / "certs"
    make_certificates(certs)
    other = tmp_path / "other"
    make_certificates(other)
    tls = [f"--ca={certs}/ca.pem", f"--cert={certs}/server.pem", f"--key={certs}/server.key"]
    mutual = fedhive(
        tmp_path, "mutual", "server", *tls, "--require-client-auth", "--address",
        "127.0.0.1:0", "--out", "m", "--set", "wait_timeout=60",
    )  # fmt: skip
    address = f"127.0.0.1:{mutual.port()}"
    plain = fedhive(tmp_path, "plain", "server", "--insecure", "--address", "127.0.0.1:0",
                    "--out", "p", "--set", "wait_timeout=60")  # fmt: skip
    plain_address = f"127.0.0.1:{plain.port()}"
    root = [f"--root-certificates={certs}/ca.pem"]

    line = _one_line_error(_client(tmp_path, "c1", address, "--insecure"))
    assert "it serves TLS; connect with --root-certificates CA.pem" in line
    line = _one_line_error(_client(tmp_path, "c2", address, *root))
    assert "requires a client certificate" in line and "add --cert CLIENT.pem --key" in line
    line = _one_line_error(_client(tmp_path, "c3", plain_address, *root))
    assert "does not speak TLS" in line and "--insecure" in line
    wrong = [f"--root-certificates={other}/ca.pem"]
    line = _one_line_error(_client(tmp_path, "c4", address, *wrong))
    assert "not signed by the CA given with --root-certificates" in line
    mutual.stop()
    line = _one_line_error(_client(tmp_path, "c5", address, "--insecure"))
    assert "nothing is listening there (connection refused)" in line
    # gRPC's own handshake lines stay out of the server's console
    assert "ssl_transport_security" not in mutual.stderr, mutual.stderr
    assert "Handshake failed" not in mutual.stderr


@pytest.mark.parametrize("example", ["pytorch", "keras"])
def test_example_servers_explain_incomplete_tls_flags(tmp_path, example):
    make_certificates(tmp_path)
    proc = Proc(
        tmp_path,
        "server",
        [sys.executable, str(ROOT / "examples" / example / "server.py"), "--cert",
         str(tmp_path / "server.pem")],
    )  # fmt: skip
    assert proc.wait() == 2
    assert "TLS needs both --cert SERVER.pem and --key SERVER.key" in proc.stderr
    assert "Traceback" not in proc.stderr
