"""`fedhive report`: the page and PNGs comparing real runs, read from their folders."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from browser_helpers import chromium, console_problems, full_page_screenshot, missing
from fedhive.cli import app
from fedhive.report import figures, load_runs, report_html, write_report
from fedhive.report.runs import config_differences, summary
from fedhive.report.svg import format_value, nice_ticks
from report_helpers import three_runs, write_run

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """FedAvg and FedProx on simulated devices (virtual time, dropouts), and DP-FedAvg."""
    return three_runs(tmp_path_factory.mktemp("runs"))


def _history(folder):
    return json.loads((folder / "history.json").read_text())["rounds"]


def test_runs_load_with_their_config_and_tell_apart_by_name(run_dirs):
    runs = load_runs(run_dirs)
    assert [r.name for r in runs] == ["fedavg", "fedprox", "dp-fedavg"]
    assert runs[1].config["strategy"]["name"] == "fedprox"
    assert [r["round"] for r in runs[2].rounds] == [0, 1, 2, 3, 4]


def test_every_history_field_reaches_a_figure(run_dirs):
    runs = load_runs(run_dirs)
    figs = {f.key: f for f in figures(runs)}
    # both evaluations of every run, against rounds and cumulative uplink bytes
    for key in ("accuracy-round", "loss-round", "accuracy-bytes-up", "loss-bytes-up"):
        assert len(figs[key].series) == 6, key
    fedavg = _history(run_dirs[0])
    central = figs["accuracy-round"].series[0]
    assert central.label == "fedavg (server test set)"
    assert central.y == tuple(r["centralized"]["accuracy"] for r in fedavg)
    uplink = figs["accuracy-bytes-up"].series[0].x
    assert uplink[-1] == sum(r.get("bytes_up", 0) for r in fedavg) > 0
    assert list(uplink) == sorted(uplink)
    # virtual time: only the runs on simulated devices
    virtual = figs["accuracy-virtual-time-s"]
    assert {s.run for s in virtual.series} == {0, 1}
    assert virtual.series[0].x == tuple(r["virtual_time_s"] for r in fedavg if r["round"] > 0)
    # privacy: the DP run's epsilon, growing every round
    (eps,) = figs["epsilon-round"].series
    assert eps.run == 2 and eps.x == (1.0, 2.0, 3.0, 4.0)
    assert list(eps.y) == sorted(eps.y) and eps.y[0] > 0
    # failures: the dropouts of each round, as the history counts them
    bars = {s.run: s for s in figs["failures-round"].series}
    assert bars[0].y == tuple(float(len(r["failures"])) for r in fedavg[1:])
    assert sum(bars[0].y) + sum(bars[1].y) > 0  # dropout = 0.2 lost some tasks
    # per-client accuracy of the global model, on the clients that evaluated last
    boxes = figs["client-accuracy"].boxes
    assert [b.run for b in boxes] == [0, 1, 2]
    last = fedavg[-1]["distributed"]["clients"]
    assert boxes[0].values == tuple(c["metrics"]["accuracy"] for c in last)


def test_summary_and_config_differences(run_dirs):
    runs = load_runs(run_dirs)
    first = summary(runs[0])
    rounds = _history(run_dirs[0])
    assert first["rounds"] == 3 and first["evaluation"] == "server test set"
    assert first["final_accuracy"] == rounds[-1]["centralized"]["accuracy"]
    assert first["failures"] == sum(len(r.get("failures", [])) for r in rounds)
    assert summary(runs[2])["epsilon"] == _history(run_dirs[2])[-1]["fit"]["metrics"]["epsilon"]
    differ, same = config_differences(runs)
    assert {"rounds", "strategy.name", "strategy.proximal_mu", "system.dropout"} <= set(differ)
    assert "out" not in differ and "out" not in same  # where a run was written is no setting
    assert same["seed"] == 1 and same["model.name"] == "logreg"


def test_the_page_is_self_contained_and_escapes_what_clients_sent(run_dirs, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(run_dirs[0], hostile)
    data = json.loads((hostile / "history.json").read_text())
    record = next(r for r in data["rounds"] if r.get("failures"))
    record["failures"][0]["reason"] = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    (hostile / "history.json").write_text(json.dumps(data))
    page = report_html(load_runs([*run_dirs, hostile]))
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # nothing to fetch: no external source, stylesheet or link (the SVG namespace is a name)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)


def test_cli_writes_the_page_alone_with_no_png(run_dirs, tmp_path):
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", *map(str, run_dirs), "--out", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    assert "3 runs" in result.output and out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


@pytest.mark.slow  # matplotlib draws nine figures
def test_cli_writes_the_page_and_a_png_of_every_plot(run_dirs, tmp_path):
    out = tmp_path / "out" / "report.html"
    result = runner.invoke(app, ["report", *map(str, run_dirs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    pngs = sorted(p.name for p in (tmp_path / "out" / "report_png").iterdir())
    assert pngs == sorted(f"{f.key}.png" for f in figures(load_runs(run_dirs)))
    assert len(pngs) == 9
    for name in pngs:
        assert (tmp_path / "out" / "report_png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_what_is_not_a_run_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "history.json").write_text('{"rounds": [{"round": "one"}]}')
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "history.json").write_text("{")
    out = tmp_path / "r.html"
    cases = [
        ("nowhere", "no such run folder"),
        ("empty", "no history.json there"),
        ("broken", "rounds[0] is not a record"),
        ("notjson", "not a readable JSON file"),
    ]
    for name, message in cases:
        result = runner.invoke(app, ["report", str(tmp_path / name), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
    assert not out.exists()


def test_one_run_without_privacy_or_failures_says_so(run_dirs, tmp_path):
    page = report_html(load_runs(run_dirs[2:]))
    assert "one run: nothing to compare" in page
    assert "no run recorded virtual time" in page
    assert "no client failed in any run" in page


def test_ticks_and_labels():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 3) == [3.0, 4.0, 5.0, 6.0]
    ticks = nice_ticks(0.11, 0.93)
    assert ticks[0] <= 0.11 and ticks[-1] >= 0.93
    assert format_value(1_500_000, "bytes") == "1.5 MB"
    assert format_value(950, "bytes") == "950 B"
    assert format_value(90, "seconds") == "90 s"
    assert format_value(1200, "seconds") == "20 min"


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_the_page_renders_in_chromium_without_console_errors(run_dirs, tmp_path):
    out = tmp_path / "report.html"
    write_report(load_runs(run_dirs), out)
    with chromium() as browser:
        browser.get(out.resolve().as_uri())
        assert console_problems(browser) == []
        drawn = browser.execute_script(
            "return Array.from(document.querySelectorAll('svg.chart')).map(s => {"
            " const b = s.getBoundingClientRect();"
            " const lines = Array.from(s.querySelectorAll('polyline, rect.bar, g.box'));"
            " return [s.id, b.width, b.height, lines.length,"
            "   lines.filter(l => l.getBBox().width > 0).length]; })"
        )
        ids = {row[0] for row in drawn}
        assert ids == {f"svg-{f.key}" for f in figures(load_runs(run_dirs)) if not f.empty}
        for name, width, height, marks, visible in drawn:
            assert width > 300 and height > 150, name
            assert marks > 0 and visible == marks, name
        rows = browser.execute_script("return document.querySelectorAll('#summary tr').length")
        assert rows == 1 + len(run_dirs)
        shot = full_page_screenshot(browser, tmp_path / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@pytest.mark.slow  # a personalized run on top of the module's three
def test_a_personalized_run_shows_its_personal_and_global_accuracy(run_dirs, tmp_path):
    personal = write_run(
        tmp_path / "finetune",
        {
            "model": {"name": "mlp", "hidden": 16},
            "personalization": {"method": "finetune", "finetune_epochs": 1},
        },
    )
    runs = load_runs([*run_dirs, personal])
    (boxes,) = [f.boxes for f in figures(runs) if f.key == "client-accuracy"]
    mine = [b for b in boxes if b.run == 3]
    assert [b.label for b in mine] == ["finetune\npersonal (test)", "finetune\nglobal (test)"]
    last = [r for r in _history(personal) if r.get("personalized")][-1]
    assert mine[0].values == tuple(c["accuracy"] for c in last["personalized"]["clients"])
    assert mine[1].values == tuple(c["accuracy"] for c in last["global"]["clients"])
    assert mine[1].hatched and not mine[0].hatched
    assert not any(b.hatched for b in boxes if b.run != 3)  # no personal model to compare
    differ, _ = config_differences(runs)
    assert {"personalization.method", "model.name"} <= set(differ)
    if missing() is None:
        out = tmp_path / "report.html"
        write_report(runs, out, png_dir=tmp_path / "png")
        with chromium() as browser:
            browser.get(out.resolve().as_uri())
            assert console_problems(browser) == []
            full_page_screenshot(browser, tmp_path / "report-personalized.png")
