"""The server's live page: its state, its JSON endpoint and who may read it."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from browser_helpers import chromium, console_problems, full_page_screenshot, missing
from fedhive.cli import app
from fedhive.client import Context, NumPyClient
from fedhive.common import ConfigError
from fedhive.common.records import ndarrays_to_parameters
from fedhive.privacy import Accounting, DifferentialPrivacyServerSideFixedClipping
from fedhive.server import ServerConfig
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.dashboard import (
    Dashboard,
    DashboardAccess,
    LiveState,
    dashboard_access,
    is_loopback,
    parse_address,
)
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

TOKENS = {"site-a": "s3cret-a", "site-b": "s3cret-b"}


class Site(NumPyClient):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, parameters, config):
        if self.cid == 3:
            raise ValueError("disk full <script>")
        return [p + 0.01 * (self.cid + 1) for p in parameters], 10, {}

    def evaluate(self, parameters, config):
        return float(np.abs(parameters[0]).mean()), 10, {"accuracy": 0.5 + 0.1 * self.cid}


def _client_fn(context: Context) -> Site:
    return Site(int(context.node_config["partition-id"]))


@pytest.fixture(scope="module")
def live_state():
    """A state fed by a real simulated run of DP-FedAvg, with one client failing."""
    state = LiveState(SimpleClientManager(["site-a", "site-b"]), rounds=3, description="dp")
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_fit=1.0, initial_parameters=ndarrays_to_parameters([np.zeros(4)])),
        noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=4,
        accounting=Accounting(delta=1e-3),
    )  # fmt: skip
    history = start_simulation(
        client_fn=_client_fn, num_clients=4, config=ServerConfig(num_rounds=3),
        strategy=strategy, seed=0, num_workers=1, callbacks=[state],
    )  # fmt: skip
    return state, history


def _get(url, user=None, token=None, method="GET"):
    request = urllib.request.Request(url, method=method)
    if user is not None:
        pair = base64.b64encode(f"{user}:{token}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_addresses_and_who_counts_as_local():
    assert parse_address("127.0.0.1:8081") == ("127.0.0.1", 8081)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("8081") == ("127.0.0.1", 8081)
    for bad in ("", "host:", "host:http", "1.2.3.4:70000"):
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            parse_address(bad)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))


def test_an_exposed_dashboard_needs_the_clients_tokens():
    assert dashboard_access("127.0.0.1", None).tokens is None
    assert dashboard_access("localhost", TOKENS).tokens is None
    with pytest.raises(ConfigError, match="needs the clients' token enrolment"):
        dashboard_access("0.0.0.0", None)
    assert dashboard_access("0.0.0.0", TOKENS).tokens == TOKENS
    with pytest.raises(ConfigError, match="token enrolment"):
        Dashboard("0.0.0.0:0", LiveState(SimpleClientManager(), 1))


def test_basic_credentials_are_checked_against_the_enrolment():
    access = DashboardAccess(TOKENS)

    def basic(text):
        return "Basic " + base64.b64encode(text.encode()).decode()

    assert access.allows(basic("site-a:s3cret-a"))
    assert not access.allows(basic("site-a:s3cret-b"))  # another site's token
    assert not access.allows(basic("site-c:s3cret-a"))
    assert not access.allows(basic("site-a"))
    assert not access.allows(None)
    assert not access.allows("Bearer s3cret-a")
    assert not access.allows("Basic not-base64!")


def test_the_state_follows_the_run(live_state):
    state, history = live_state
    snap = state.snapshot()
    assert snap["status"] == "finished" and snap["rounds_done"] == 3
    assert snap["clients"] == ["site-a", "site-b"] and snap["num_clients"] == 2
    assert [r["round"] for r in snap["rounds"]] == [r["round"] for r in history.rounds]
    fits = [r for r in snap["rounds"] if r["round"] > 0]
    assert [r["failures"] for r in fits] == [1, 1, 1]
    assert all(r["fit_results"] == 3 and r["fit_clients"] == 4 for r in fits)
    assert snap["bytes_up_total"] == history.bytes_totals()["bytes_up"] > 0
    epsilons = [r["epsilon"] for r in fits]
    assert epsilons == sorted(epsilons) and snap["epsilon"] == epsilons[-1] > 0
    assert snap["epsilon"] == history.rounds[-1]["fit"]["metrics"]["epsilon"]
    reasons = {(f["round"], f["client_id"], f["stage"]) for f in snap["failures"]}
    assert len(reasons) == 3 and all("disk full <script>" in f["reason"] for f in snap["failures"])
    json.dumps(snap, allow_nan=False)


def test_the_json_endpoint_refuses_without_a_token_and_serves_with_one(live_state):
    state, _ = live_state
    with Dashboard("127.0.0.1:0", state, DashboardAccess(TOKENS)) as board:
        url = board.url
        code, headers, body = _get(url + "api/state")
        assert code == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert b"rounds" not in body
        assert _get(url + "api/state", "site-a", "wrong")[0] == 401
        assert _get(url, "site-b", "s3cret-a")[0] == 401
        code, headers, body = _get(url + "api/state", "site-b", "s3cret-b")
        assert code == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["rounds_done"] == 3
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        code, _, page = _get(url, "site-a", "s3cret-a")
        assert code == 200 and b'<script src="/dashboard.js"' in page
        assert _get(url + "dashboard.js", "site-a", "s3cret-a")[0] == 200
        assert _get(url + "nothing", "site-a", "s3cret-a")[0] == 404
        assert _get(url + "api/state", "site-a", "s3cret-a", method="POST")[0] == 405
        assert _get(url + "api/state", method="DELETE")[0] == 401  # who asks comes first


def test_on_loopback_the_page_is_open(live_state):
    state, _ = live_state
    with Dashboard("127.0.0.1:0", state) as board:
        code, _, body = _get(board.url + "api/state")
        assert code == 200 and json.loads(body)["epsilon"] > 0
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens any more
        urllib.request.urlopen(board.url + "api/state", timeout=5)


def test_fedhive_server_refuses_an_exposed_dashboard_without_tokens(tmp_path):
    result = CliRunner().invoke(
        app,
        ["server", "--insecure", "--address", "127.0.0.1:0", "--dashboard", "0.0.0.0:0",
         "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "needs the clients' token enrolment" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_the_page_shows_privacy_bytes_and_failure_reasons_in_chromium(live_state, tmp_path):
    """The finished DP run's page: epsilon and bytes in the cards and per round, each
    failure's reason as text (the client's "<script>" is not run)."""
    state, _ = live_state
    snap = state.snapshot()
    with Dashboard("127.0.0.1:0", state) as board, chromium() as browser:
        browser.get(board.url)
        deadline = time.monotonic() + 30
        while browser.find_element("id", "status").text != "finished":
            assert time.monotonic() < deadline, browser.find_element("id", "status").text
            time.sleep(0.1)
        shown = browser.execute_script(
            "const t = id => document.getElementById(id).textContent;"
            "const cells = Array.from(document.querySelectorAll('#rounds tbody tr'))"
            "  .map(tr => Array.from(tr.cells).map(td => td.textContent));"
            "return {epsilon: t('epsilon'), bytes: t('bytes'), rounds: cells,"
            " reasons: Array.from(document.querySelectorAll('#failures tbody tr'))"
            "   .map(tr => tr.cells[3].textContent), scripts: document.scripts.length};"
        )
        problems = console_problems(browser)
        full_page_screenshot(browser, tmp_path / "dashboard-dp.png")
    assert problems == []
    assert shown["epsilon"] == f"{snap['epsilon']:.3f}" and float(shown["epsilon"]) > 0
    up, down = shown["bytes"].split(" / ")
    assert up.endswith("B") and down.endswith("B") and up != "0 B"
    # round, version, accuracy, loss, fit results, evaluated, failures, up, down, epsilon
    by_round = {int(cells[0]): cells for cells in shown["rounds"]}
    for record in snap["rounds"]:
        if record["round"] > 0:
            assert by_round[record["round"]][9] == f"{record['epsilon']:.3f}"
    assert len(shown["reasons"]) == 3 and all("disk full <script>" in r for r in shown["reasons"])
    assert shown["scripts"] == 1  # only the page's own
