"""Shared pieces of the gRPC benchmarks (grpc_round.py, grpc_latency.py, grpc_many_clients.py).

Client processes (``_grpc_bench_client.py``), sampling this process's resident memory from
``/proc``, the raw-bytes gRPC method names used by the plain-grpcio baselines, and the
plain-text table format of the other benchmarks. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

HERE = Path(__file__).resolve().parent
CLIENT_SCRIPT = HERE / "_grpc_bench_client.py"
MB = 1e6
MIB = 1 << 20

# Plain grpcio baselines: one generic service, payloads passed through as raw bytes.
RAW_SERVICE = "fedhive.bench.Raw"
RAW_STREAM_METHOD = f"/{RAW_SERVICE}/Stream"
RAW_UNARY_METHOD = f"/{RAW_SERVICE}/Fit"
SIZE = struct.Struct("<Q")  # length prefix of a raw-bytes message (grpcio stream and TCP)
RAW_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MIB),
    ("grpc.max_send_message_length", 64 * MIB),
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def quiet_fedhive_logs() -> None:
    """The benchmarks serve without TLS on 127.0.0.1 on purpose: no warning per run."""
    logging.getLogger("fedhive").setLevel(logging.ERROR)


def rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> int:
        return int(os.pread(self._fd, 256, 0).split()[1]) * _PAGE

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def reset(self) -> int:
        """Start a new peak from the current RSS, which is returned."""
        now = self._sample()
        self.peak = now
        return now

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        os.close(self._fd)


class ClientProcesses:
    """``count`` processes running ``_grpc_bench_client.py KIND ARGS``.

    Each prints one JSON line with its peak RSS and CPU time when it ends; stderr goes to
    a temporary file that is shown if a process fails.
    """

    def __init__(self, kind: str, count: int, *args: str, stdin: bool = False) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self._errs: list[IO[bytes]] = []
        for i in range(count):
            err = tempfile.TemporaryFile()  # noqa: SIM115 - open for the process's life
            self._errs.append(err)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(CLIENT_SCRIPT), kind, "--index", str(i), *args],
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )

    def stderr(self, i: int) -> str:
        self._errs[i].seek(0)
        return self._errs[i].read().decode(errors="replace")[-4000:]

    def readline(self, i: int) -> str:
        """One line of process ``i``'s stdout (e.g. the port it serves on)."""
        stdout = self.procs[i].stdout
        line = stdout.readline() if stdout is not None else ""
        if not line:
            raise RuntimeError(f"client process {i} said nothing:\n{self.stderr(i)}")
        return line.strip()

    def finish(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait for every process; their reports. Raises if one failed or hung."""
        reports: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:  # stdin EOF asks a serving process to stop
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                text = self.stderr(i)
                self.kill()
                raise RuntimeError(f"client process {i} did not end:\n{text}") from None
            out = proc.stdout.read() if proc.stdout is not None else ""
            if proc.returncode != 0:
                text = self.stderr(i)
                self.kill()
                raise RuntimeError(f"client process {i} exited with {proc.returncode}:\n{text}")
            lines = [line for line in out.splitlines() if line.startswith("{")]
            reports.append(json.loads(lines[-1]) if lines else {})
        self.close()
        return reports

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        for err in self._errs:
            err.close()
        self._errs = []


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def status(value: float, target: float) -> str:
    return "ok" if value <= target else "ABOVE TARGET"


def machine_note() -> str:
    """CPU count and load average: the machine is shared, so absolute times vary."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} CPUs, load average {load} (1/5/15 min) at start"
