"""`fedhive new`: each framework's project passes its own tests and runs `fedhive run`,
and `fedhive run` with ``app`` simulates a user's own client."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from deploy_helpers import ROOT
from fedhive.cli import app
from fedhive.cli.new_cmd import FRAMEWORKS

runner = CliRunner()

NEEDS = {"numpy": [], "sklearn": ["sklearn"], "pytorch": ["torch"], "keras": ["torch", "keras"]}


def new(tmp_path, framework, name="proj"):
    result = runner.invoke(
        app, ["new", name, "--framework", framework, "--dir", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return tmp_path / name


def run_in(folder, *argv, timeout=300):
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


FEDHIVE = ["-c", "import sys; sys.argv[0] = 'fedhive'; from fedhive.cli import main; main()"]


@pytest.fixture
def clean_imports():
    """The projects' modules (client, data, ...) are imported by name: forget them."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name in ("client", "data", "test_client"):
            del sys.modules[name]


def test_a_numpy_project_passes_its_tests_and_runs(tmp_path, clean_imports):
    """The fast check (in this process): the tests of the generated project, then
    `fedhive run` on its config."""
    folder = new(tmp_path, "numpy")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "client.py", "data.py", "fedhive.toml", "pyproject.toml",
        "server.toml", "test_client.py",
    ]  # fmt: skip
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("test_client", folder / "test_client.py")
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    names = [n for n in dir(tests) if n.startswith("test_")]
    assert len(names) == 3
    for name in names:
        getattr(tests, name)()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["run", str(folder / "fedhive.toml"), "--rounds", "2", "--out", str(out), "--no-progress"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "your client client:app" in result.output
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]  # no server model: no round 0
    assert rounds[-1]["fit"]["num_results"] == 4 and not rounds[-1]["failures"]
    assert rounds[-1]["distributed"]["metrics"]["accuracy"] > 0.8


@pytest.mark.slow  # each project's tests and run in fresh processes: 20-60 s each
@pytest.mark.timeout(900)
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_every_template_passes_its_tests_and_runs_out_of_the_box(tmp_path, framework):
    for module in NEEDS[framework]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the {framework} template needs {module}, which is not installed")
    folder = new(tmp_path, framework, name=f"my-{framework}")
    code, output = run_in(folder, "-m", "pytest", "-p", "no:cacheprovider")
    assert code == 0, output
    assert "3 passed" in output
    code, output = run_in(folder, *FEDHIVE, "run", "fedhive.toml", "--rounds", "3", "--no-progress")
    assert code == 0, output
    history = json.loads((folder / "runs" / f"my-{framework}" / "history.json").read_text())
    assert history["rounds"][-1]["distributed"]["metrics"]["accuracy"] > 0.7
    for command in (["check", "--select", "E,F,W,I,B,UP", "."], ["format", "--check", "."]):
        lint = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=folder, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout  # the project's own ruff settings


def test_new_refuses_bad_names_unknown_frameworks_and_full_folders(tmp_path):
    cases = [
        (["new", "proj", "--framework", "jax"], "choose one of numpy, sklearn, pytorch, keras"),
        (["new", "1proj"], "use letters, digits"),
    ]
    for argv, message in cases:
        result = runner.invoke(app, [*argv, "--dir", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, result.output
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "mine.py").write_text("keep me\n")
    result = runner.invoke(app, ["new", "proj", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    assert [p.name for p in (tmp_path / "proj").iterdir()] == ["mine.py"]


def test_an_app_refuses_the_built_in_clients_tables(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('app = "client:app"\n[system]\nlatency = "constant"\n')
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 2
    assert "[system] needs the built-in client" in result.output


def test_an_app_that_does_not_import_names_the_module_and_folder(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'app = "nowhere:app"\nout = "{(tmp_path / "out").as_posix()}"\n')
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 2
    assert "cannot import module 'nowhere'" in result.output
    assert str(tmp_path.resolve()) in result.output.replace("\n", "")


@pytest.mark.slow  # a server and two client processes
def test_the_projects_readme_deployment_runs(tmp_path):
    """The generated README's deployment: `fedhive server server.toml --insecure` and two
    `fedhive client --app client:app` (on a free port, for 2 rounds)."""
    from deploy_helpers import fedhive

    folder = new(tmp_path, "numpy")
    readme = (folder / "README.md").read_text()
    server_line = "fedhive server server.toml --insecure"
    client_line = "fedhive client --app client:app --server 127.0.0.1:8080 --insecure"
    assert server_line in readme and readme.count(client_line) == 2
    server = fedhive(folder, "server", *server_line.split()[1:], "--address", "127.0.0.1:0",
                     "--rounds", "2")  # fmt: skip
    try:
        address = f"127.0.0.1:{server.port()}"
        argv = [w.replace("127.0.0.1:8080", address) for w in client_line.split()[1:]]
        clients = [fedhive(folder, f"client{i}", *argv, "--max-retries", "5") for i in range(2)]
        assert server.wait(120) == 0, server.stderr
        assert [c.wait(60) for c in clients] == [0, 0], [c.stderr for c in clients]
    finally:
        server.stop()
    history = json.loads((folder / "runs" / "proj-server" / "history.json").read_text())
    last = history["rounds"][-1]
    assert last["round"] == 2 and last["fit"]["num_results"] == 2 and not last["failures"]
    assert last["distributed"]["metrics"]["accuracy"] > 0.7
