"""Running ``fedhive server`` / ``fedhive client`` and example scripts as real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"

TINY_SERVER = """\
rounds = {rounds}
round_timeout = 30
wait_timeout = 30
out = "out"
[strategy]
min_fit_clients = 2
min_evaluate_clients = 2
min_available_clients = 2
[model]
name = "logreg"
[data]
dataset = "digits"
[train]
local_epochs = 1
lr = 0.1
"""

# what the `fedhive` console script does (``-m fedhive.cli.main`` warns that the package
# imported the module before running it)
_FEDHIVE = "import sys; sys.argv[0] = 'fedhive'; from fedhive.cli import main; main()"

DEMO = ["--demo", "--dataset", "digits", "--model", "logreg", "--num-partitions", "2"]


_LIVE: list[Proc] = []


def stop_all() -> None:
    """Stop every child still running (for test teardown: a failed test leaves none)."""
    while _LIVE:
        _LIVE.pop().stop()


class Proc:
    """A child process whose stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, cwd: Path, name: str, argv: list[str]) -> None:
        self.name = name
        self.out_path = cwd / f"{name}.out"
        self.err_path = cwd / f"{name}.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), COLUMNS="200", OMP_NUM_THREADS="1")
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        _LIVE.append(self)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of ``pattern`` in stderr+stdout, once it appears."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stderr + self.stdout)
            if found:
                return found
            if self.popen.poll() is not None:
                found = re.search(pattern, self.stderr + self.stdout)
                if found:
                    return found
                code = self.popen.returncode
                raise AssertionError(f"{self.name} exited ({code}):\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} after {timeout} s:\n{self.stderr}")

    def port(self) -> int:
        return int(self.wait_for(r"listening on [^\s]*:(\d+)").group(1))

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.name} did not finish:\n{self.stderr}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def fedhive(cwd: Path, name: str, *args: str) -> Proc:
    """``fedhive ARGS`` in ``cwd``."""
    return Proc(cwd, name, [sys.executable, "-c", _FEDHIVE, *args])


def script(cwd: Path, name: str, path: Path, *args: str) -> Proc:
    """``python PATH ARGS`` in ``cwd``."""
    return Proc(cwd, name, [sys.executable, str(path), *args])


def demo_federation(cwd: Path, server_toml: str, sites: int = 2) -> tuple[Proc, list[Proc]]:
    """``fedhive server`` on ``server_toml`` (written to ``cwd/server.toml``; insecure, on
    a free port) with ``sites`` demo clients, all run to a clean exit: their processes."""
    (cwd / "server.toml").write_text(server_toml)
    server = fedhive(
        cwd, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0"
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        clients = [
            fedhive(
                cwd,
                f"client{i}",
                "client",
                "--server",
                address,
                "--insecure",
                *DEMO,
                "--partition-id",
                str(i),
                "--max-retries",
                "5",
            )
            for i in range(sites)
        ]
        assert server.wait() == 0, server.stderr
        assert [c.wait() for c in clients] == [0] * sites, [c.stderr for c in clients]
    finally:
        server.stop()
    return server, clients
