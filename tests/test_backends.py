"""Simulation backends: the registry, a user's own backend, Ray's arguments, thread = process."""

from __future__ import annotations

import logging

import pytest

from conftest import initial, noisy_client_fn
from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import (
    Backend,
    ClientSetup,
    backend_names,
    register_backend,
    start_simulation,
)
from fedhive.simulation import backends as backends_module
from fedhive.simulation.backends import make_backend, unregister_backend
from fedhive.transport.base import Transport
from fedhive.transport.inprocess import InProcessTransport


class CountingTransport(Transport):
    """The in-process transport, counting the tasks sent through it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.sent: list[str] = []
        self.closed = False

    def send(self, messages, replies):
        self.sent.extend(m.metadata.node_id for m in messages)
        self.inner.send(messages, replies)

    def close(self):
        self.closed = True
        self.inner.close()


class Recording(Backend):
    """A user's backend: runs clients in this thread's pool and keeps what it was given."""

    name = "recording"

    def __init__(self, fail_on_start: bool = False) -> None:
        self.fail_on_start = fail_on_start
        self.setup: ClientSetup | None = None
        self.transport: CountingTransport | None = None
        self.closed = 0

    def start(self, setup):
        self.setup = setup
        if self.fail_on_start:
            raise RuntimeError("no workers today")
        self.transport = CountingTransport(
            InProcessTransport(setup.runner(), num_workers=setup.num_workers)
        )
        return self.transport

    def close(self):
        self.closed += 1
        if self.transport is not None:
            self.transport.close()


def simulate(backend, rounds=2, num_clients=6, **kwargs):
    strategy = FedAvg(
        fraction_fit=0.5,
        min_fit_clients=2,
        fraction_evaluate=0.5,
        initial_parameters=initial((16,)),
    )
    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=num_clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=7,
        backend=backend,
        num_workers=2,
        **kwargs,
    )


@pytest.fixture
def recording():
    """``"recording"`` registered for one test; the instances its factory made."""
    made: list[Recording] = []

    def factory() -> Recording:
        made.append(Recording())
        return made[-1]

    register_backend("recording", factory)
    yield made
    unregister_backend("recording")


def test_registry_lists_the_builtin_backends_first():
    from fedhive.simulation.app import BACKENDS

    assert backend_names()[:3] == ("thread", "process", "ray")
    assert backend_names() == BACKENDS


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ConfigError) as info:
        simulate("gpu")
    message = str(info.value)
    assert "got 'gpu'" in message
    assert "'thread', 'process', 'ray'" in message
    assert "register_backend" in message
    with pytest.raises(ConfigError, match="or a Backend instance; got int"):
        make_backend(3)  # type: ignore[arg-type]


def test_a_registered_backend_runs_the_simulation(recording):
    assert "recording" in backend_names()
    from fedhive.simulation.app import BACKENDS

    assert "recording" in BACKENDS
    history = simulate("recording", ray_init_args={"num_cpus": 2})
    (backend,) = recording
    assert backend.closed == 1 and backend.transport is not None and backend.transport.closed
    setup = backend.setup
    assert setup is not None
    assert setup.num_workers == 2
    assert dict(setup.node_configs["4"]) == {"partition-id": 4, "num-partitions": 6}
    assert setup.ray.init_args == {"num_cpus": 2}  # handed on, not dropped
    assert history.config["backend"] == "recording"
    # 2 rounds x (3 fit + 3 evaluate tasks), all through the user's transport
    assert len(backend.transport.sent) == 12
    thread = simulate("thread")
    assert history.without_timings()["rounds"] == thread.without_timings()["rounds"]


def test_a_backend_instance_is_used_and_closed_even_after_a_failure():
    backend = Recording()
    history = simulate(backend, rounds=1)
    assert history.config["backend"] == "recording"
    assert backend.closed == 1 and len(backend.transport.sent) == 6
    failing = Recording(fail_on_start=True)
    with pytest.raises(RuntimeError, match="no workers today"):
        simulate(failing)
    assert failing.closed == 1


def test_registration_is_checked():
    with pytest.raises(ConfigError, match="already registered"):
        register_backend("thread", Recording)
    with pytest.raises(ConfigError, match="lower-case"):
        register_backend("My Backend", Recording)
    with pytest.raises(ConfigError, match="must be callable"):
        register_backend("broken", "not a factory")  # type: ignore[arg-type]
    register_backend("not-a-backend", lambda: object())  # type: ignore[arg-type, return-value]
    try:
        with pytest.raises(
            ConfigError, match=r"returned object, not a fedhive\.simulation\.Backend"
        ):
            simulate("not-a-backend")
    finally:
        unregister_backend("not-a-backend")
    assert "not-a-backend" not in backend_names()


def test_ray_without_the_extra_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends_module, "_ray_installed", lambda: False)
    with pytest.raises(MissingDependency, match=r"pip install 'fedhive\[ray\]'") as info:
        simulate("ray", ray_init_args={"num_cpus": 1})
    assert isinstance(info.value, ImportError)
    assert info.value.extra == "ray"


def test_ray_installed_gives_the_ray_backend(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(backends_module, "_ray_installed", lambda: True)
    backend = make_backend("ray")
    assert backend.name == "ray" and type(backend).__name__ == "RayBackend"
    backend.close()  # closing a backend that never started starts nothing
    with pytest.raises(ConfigError, match=r"task_timeout must be > 0"):
        type(backend)(task_timeout=0)


def test_local_backends_warn_that_they_ignore_rays_arguments(caplog):
    with caplog.at_level(logging.WARNING, logger="fedhive"):
        simulate("thread", rounds=1)
    assert not [r for r in caplog.records if "Ray arguments" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="fedhive"):
        simulate("thread", rounds=1, ray_init_args={"num_cpus": 2}, actor_kwargs={"x": 1})
    (warning,) = [r for r in caplog.records if "Ray arguments" in r.getMessage()]
    text = warning.getMessage()
    assert "'thread' ignores" in text and "ray_init_args, actor_kwargs" in text
    assert "actor_type" not in text


def test_thread_and_process_give_the_same_seeded_history(caplog):
    thread = simulate("thread", rounds=3)
    with caplog.at_level(logging.WARNING, logger="fedhive"):
        process = simulate("process", rounds=3, actor_scheduling="SPREAD")
    assert any(
        "'process' ignores" in r.getMessage() and "actor_scheduling" in r.getMessage()
        for r in caplog.records
    )
    assert process.config["backend"] == "process"
    assert thread.config["backend"] == "thread"
    rounds = thread.without_timings()["rounds"]
    assert rounds == process.without_timings()["rounds"]
    assert [r["fit"]["num_results"] for r in rounds] == [3, 3, 3]
