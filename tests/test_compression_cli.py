"""[compression] in the TOML of fedhive run and fedhive server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli_helpers import run_toml
from fedhive.cli import app
from fedhive.cli.config import validate
from fedhive.cli.server_config import validate_server_config
from fedhive.common import ConfigError
from fedhive.compression import FP16, Compression, TopK

runner = CliRunner()

TABLE = """\
[compression]
uplink = "topk"
ratio = 0.05
error_feedback = true
downlink = "fp16"
"""


def test_run_with_compression_from_toml_records_bytes(tmp_path):
    outs = {}
    for name, tables in (("plain", ""), ("topk", TABLE)):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(run_toml(tmp_path / name, tables=tables))
        result = runner.invoke(app, ["run", str(cfg)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs[name] = json.loads((tmp_path / name / "history.json").read_text())
    up = {k: sum(r.get("bytes_up", 0) for r in h["rounds"]) for k, h in outs.items()}
    down = {k: sum(r.get("bytes_down", 0) for r in h["rounds"]) for k, h in outs.items()}
    assert up["topk"] < up["plain"] / 2 and down["topk"] < down["plain"]
    assert all(r["fit"]["num_results"] > 0 for r in outs["topk"]["rounds"] if "fit" in r)


def test_the_table_builds_the_codecs():
    cfg = validate(
        {
            "compression": {
                "uplink": "topk",
                "ratio": 0.01,
                "error_feedback": True,
                "downlink": "fp16",
            }
        }
    )
    built = cfg.compression.build()
    assert built.uplink == TopK(ratio=0.01, error_feedback=True) and built.downlink == FP16()
    server = validate_server_config({"compression": {"uplink": "eden", "bits": 2}})
    assert server.compression.build().uplink.bits == 2


@pytest.mark.parametrize(
    "table, pattern",
    [
        ({"uplink": "gzip"}, r"compression\.uplink = 'gzip'"),
        ({"uplink": "topk", "ratio": 0}, r"compression\.ratio = 0"),
        ({"uplink": "qsgd", "bits": 0}, r"compression\.bits = 0"),
        ({"uplink": "topk", "levels": 3}, r"unknown key 'compression\.levels'"),
        ({"downlink": "topk"}, r"compression\.downlink = 'topk'"),
        ({"error_feedback": True}, r"needs an uplink codec"),
        ({"uplink": "topk", "bits": 4}, r"bits = 4 is not a parameter of uplink = 'topk', which"),
        ({"uplink": "qsgd", "ratio": 0.1}, r"ratio = 0\.1 is not .* 'qsgd', which takes bits"),
        ({"uplink": "fp16", "bits": 8}, r"bits = 8 is not .* 'fp16', which takes neither"),
        ({"downlink": "qsgd", "bits": 8}, r"bits = 8 is not .* uplink = 'none' \(ratio and"),
    ],
)
def test_bad_compression_keys_are_refused(table, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate({"compression": table}, "exp.toml")
    with pytest.raises(ConfigError, match=pattern):
        validate_server_config({"compression": table}, "server.toml")


def test_topk_with_secure_aggregation_is_refused_and_async_is_accepted():
    for check in (validate, validate_server_config):
        with pytest.raises(ConfigError, match="top-k"):
            check({"compression": {"uplink": "topk"}, "secure_aggregation": {}}, "x.toml")
        check(
            {
                "compression": {"uplink": "sign", "error_feedback": True},
                "policy": {"name": "buffered-async", "buffer_size": 2, "concurrency": 2},
            },
            "x.toml",
        )


def test_progress_bar_and_summary_show_the_bytes(tmp_path):
    import io

    from rich.console import Console

    from fedhive.cli.progress import ProgressBar, summary_table
    from test_compression_runs import run

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    history = run(
        rounds=2, compression=TopK(ratio=0.1), callbacks=[ProgressBar(2, console=console)]
    )
    assert " up " in buffer.getvalue() and "kB" in buffer.getvalue()
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(history, str(tmp_path)))
    assert f"{history.bytes_totals()['bytes_up']:,}" in out.getvalue()


@pytest.mark.slow
def test_compression_benchmark_smoke():
    from conftest import run_benchmark

    out = run_benchmark("compression.py", "--quick", timeout=300)
    assert "topk(ratio=0.01) +EF" in out and "numpy.copy" in out and "speed-up" in out


@pytest.mark.slow
def test_compression_benchmark_runs_named_settings_on_the_validation_split():
    from conftest import run_benchmark

    out = run_benchmark(
        "compression.py", "--parts", "1", "--seeds", "1", "--rounds", "1", "--samples",
        "1000", "--clients", "8", "--fraction", "0.5", "--split", "val", "--runs",
        "eden:bits=1,ratio=0.7@lr=0.04;topk:ratio=0.01+ef@slr=2,smom=0.5", timeout=300,
    )  # fmt: skip
    assert "scored on the clients held-out data (validation)" in out
    assert "eden(bits=1,block=4096,ratio=0.7) lr=0.04" in out
    assert "topk(ratio=0.01) +EF slr=2 smom=0.5" in out


@pytest.mark.parametrize(
    "table", [{"uplink": "topk", "bits": 4}, {"uplink": "sign", "ratio": 0.5}, {"bits": 2}]
)
def test_python_compression_tables_refuse_keys_their_codec_does_not_take(table):
    from fedhive.compression import as_compression

    with pytest.raises(ConfigError, match="is not a parameter of uplink"):
        as_compression(table)


def test_shared_scale_and_shared_seed_codecs_pass_with_secure_aggregation():
    from fedhive.compression import QSGD, RandomK

    for check in (validate, validate_server_config):
        qsgd = {"uplink": "qsgd", "bits": 4, "scale": 0.5}
        check({"compression": qsgd, "secure_aggregation": {}}, "x.toml")
        randomk = {"uplink": "randomk", "ratio": 0.1, "shared_seed": True}
        check({"compression": randomk, "secure_aggregation": {}}, "x.toml")
        with pytest.raises(ConfigError, match="shared scale"):
            check({"compression": {"uplink": "qsgd"}, "secure_aggregation": {}}, "x.toml")
        with pytest.raises(ConfigError, match="scale"):
            check({"compression": {"uplink": "topk", "scale": 0.5}}, "x.toml")
    table = Compression.from_table({"uplink": "qsgd", "bits": 4, "scale": 0.5})
    assert table.uplink == QSGD(bits=4, scale=0.5)
    table = Compression.from_table({"uplink": "randomk", "shared_seed": True})
    assert table.uplink == RandomK(shared_seed=True)


def test_run_with_secure_aggregation_and_shared_seed_random_k_from_toml(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        f'rounds = 2\nnum_clients = 10\nout = "{(tmp_path / "out").as_posix()}"\n'
        "secure_aggregation = { threshold = 3, degree = 4, bits = 8, clip = 0.5 }\n"
        '[data]\ndataset = "digits"\npartition = "iid"\n[model]\nname = "logreg"\n'
        "[strategy]\nfraction_fit = 0.6\n"
        '[compression]\nuplink = "randomk"\nratio = 0.25\nshared_seed = true\n'
    )
    result = runner.invoke(app, ["run", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    fits = [r["fit"] for r in history["rounds"] if "fit" in r]
    assert all(f["updated"] and f["secagg"]["codec"] == "randomk" for f in fits)
    assert all(f["secagg"]["after_unmask"] == 6 for f in fits)
