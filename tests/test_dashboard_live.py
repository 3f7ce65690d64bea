"""The live page of a real ``fedhive server`` process with real client processes, in
headless Chromium; and an exposed page behind the clients' tokens, over TLS."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

from browser_helpers import chromium, console_problems, full_page_screenshot, missing
from deploy_helpers import APPS, fedhive
from grpc_helpers import make_certificates

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]

SERVER = """\
rounds = {rounds}
round_timeout = 30
wait_timeout = 60
out = "out"
[strategy]
min_fit_clients = 2
min_evaluate_clients = 2
min_available_clients = 2
"""
TOKENS = {"alice": "a-s3cret", "bob": "b-s3cret"}


def _site(cwd, address, name, tls):
    return fedhive(
        cwd, name, "client", "--server", address, *(tls or ["--insecure"]),
        "--app", "dashboard_app:app", "--app-dir", str(APPS), "--node-id", name,
        "--token", TOKENS[name], "--max-retries", "5",
    )  # fmt: skip


def _sites(cwd, address, tls=()):
    return [_site(cwd, address, name, tls) for name in TOKENS]


def _page(browser):
    """What the page shows now."""
    return browser.execute_script(
        "const t = id => document.getElementById(id).textContent;"
        "return {status: t('status'), round: t('round'), clients: t('num-clients'),"
        " names: Array.from(document.querySelectorAll('#clients li')).map(li => li.textContent),"
        " rounds: document.querySelectorAll('#rounds tbody tr:not(.empty)').length,"
        " failures: Array.from(document.querySelectorAll('#failures tbody tr:not(.empty)'))"
        "   .map(tr => Array.from(tr.cells).map(td => td.textContent)), bytes: t('bytes')};"
    )


def _until(browser, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = _page(browser)
        if check(shown):
            return shown
        time.sleep(0.2)
    raise AssertionError(f"the page never showed it; last: {_page(browser)}")


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_the_live_page_follows_a_real_federation_in_chromium(tmp_path):
    (tmp_path / "server.toml").write_text(SERVER.format(rounds=12))
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS))
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0",
        "--tokens", "tokens.json", "--dashboard", "127.0.0.1:0",
    )  # fmt: skip
    try:
        url = server.wait_for(r"dashboard on (http://127\.0\.0\.1:\d+/)").group(1)
        address = f"127.0.0.1:{server.port()}"
        with chromium() as browser:
            browser.get(url)
            before = _until(browser, lambda s: s["status"] == "waiting for clients")
            assert before["clients"] == "0" and before["rounds"] == 0
            sites = _sites(tmp_path, address)
            running = _until(browser, lambda s: s["status"] == "running" and s["rounds"] >= 2)
            assert running["names"] == ["alice", "bob"] and running["clients"] == "2"
            later = _until(browser, lambda s: s["rounds"] > running["rounds"])
            assert later["status"] == "running"  # it updated while the run went on
            failing = _until(browser, lambda s: len(s["failures"]) == 2)
            # each site's second fit failed, in round 2; the reason is shown as text
            reason = "RuntimeError: the scanner archive is offline <b>today</b>"
            assert sorted(failing["failures"]) == [
                ["2", "alice", "fit", reason],
                ["2", "bob", "fit", reason],
            ]
            full_page_screenshot(browser, tmp_path / "dashboard.png")
            problems = console_problems(browser)
            state = json.loads(urllib.request.urlopen(url + "api/state", timeout=10).read())
            assert server.wait() == 0, server.stderr
            assert [s.wait() for s in sites] == [0, 0], [s.stderr for s in sites]
        assert problems == []
        assert state["rounds_total"] == 12 and state["failures_total"] >= 2
        assert state["bytes_up_total"] > 0 and state["bytes_down_total"] > 0
    finally:
        server.stop()
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert max(r["round"] for r in rounds) == 12


def _fetch(url, context, user=None, token=None):
    request = urllib.request.Request(url)
    if user:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_an_exposed_page_is_https_behind_the_clients_tokens(tmp_path):
    certs = make_certificates(tmp_path)
    (tmp_path / "server.toml").write_text(SERVER.format(rounds=3))
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS))
    tls = ["--cert", str(certs["server"]), "--key", str(certs["server_key"])]
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--address", "127.0.0.1:0", *tls,
        "--tokens", "tokens.json", "--dashboard", "0.0.0.0:0",
    )  # fmt: skip
    try:
        port = server.wait_for(r"dashboard on https://0\.0\.0\.0:(\d+)/").group(1)
        url = f"https://127.0.0.1:{port}/api/state"  # only ever reached over loopback
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        assert _fetch(url, context)[0] == 401
        assert _fetch(url, context, "alice", "b-s3cret")[0] == 401
        code, body = _fetch(url, context, "alice", "a-s3cret")
        assert code == 200 and json.loads(body)["status"] == "waiting for clients"
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10)
        address = f"127.0.0.1:{server.port()}"
        sites = _sites(tmp_path, address, ["--root-certificates", str(certs["ca"])])
        assert server.wait() == 0, server.stderr
        assert [s.wait() for s in sites] == [0, 0], [s.stderr for s in sites]
    finally:
        server.stop()
