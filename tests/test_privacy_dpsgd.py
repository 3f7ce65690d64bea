"""Sample-level DP-SGD with Opacus: epsilon accumulates in the client's persistent state."""

from __future__ import annotations

import numpy as np
import pytest

from fedhive.client import Context, NumPyClient
from fedhive.common import ConfigError, RecordDict, ndarrays_to_parameters
from fedhive.privacy import epsilon_for
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from fedhive.privacy.dpsgd import max_client_epsilon, train_dpsgd  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def data(seed, n=40):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


class DpSgdClient(NumPyClient):
    def __init__(self, context: Context):
        self.context = context
        self.model = tiny_model()
        self.x, self.y = data(int(context.node_config["partition-id"]))

    def fit(self, parameters, config):
        with torch.no_grad():
            for p, new in zip(self.model.parameters(), parameters, strict=True):
                p.copy_(torch.from_numpy(new.reshape(p.shape)))
        result = train_dpsgd(
            self.model, self.x, self.y, epochs=1, batch_size=10, lr=0.1,
            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
            state=self.context.state, seed=self.context.seed,
        )  # fmt: skip
        weights = [p.detach().numpy().copy() for p in self.model.parameters()]
        return weights, len(self.x), result.metrics()

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def dpsgd_client_fn(context: Context):
    return DpSgdClient(context)


def test_epsilon_grows_across_rounds_from_client_state():
    shapes = [p.detach().numpy().copy() for p in tiny_model().parameters()]
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
        initial_parameters=ndarrays_to_parameters(shapes),
        fit_metrics_aggregation_fn=max_client_epsilon,
    )  # fmt: skip
    history = start_simulation(
        client_fn=dpsgd_client_fn, num_clients=2, config=ServerConfig(num_rounds=3),
        strategy=strategy, seed=2, num_workers=1,
    )  # fmt: skip
    eps = [value for _, value in history.metrics_distributed_fit["epsilon"]]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    # 4 Poisson steps per round at q = 10/40
    for rnd, value in enumerate(eps, start=1):
        assert value == pytest.approx(epsilon_for(1.0, 1e-5, 4 * rnd, sampling_rate=0.25))


def test_dpsgd_noise_has_the_dp_sgd_scale_and_leaves_global_rng_alone():
    model = torch.nn.Linear(2000, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x = np.zeros((8, 2000), np.float32)  # zero inputs: zero gradients, only noise moves w
    y = np.zeros((8, 1), np.float32)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    state = RecordDict()
    result = train_dpsgd(
        model, x, y, epochs=1, batch_size=8, lr=0.5, noise_multiplier=2.0, max_grad_norm=0.3,
        delta=1e-5, state=state, seed=1, noise_seed=4,
        loss_fn=torch.nn.functional.mse_loss,
    )  # fmt: skip
    assert result.steps == 1 and not result.private and result.metrics()["dp_not_private"]
    # one SGD step of pure noise: std = lr * z * C / batch_size
    assert model.weight.detach().numpy().std() == pytest.approx(0.5 * 2.0 * 0.3 / 8, rel=0.06)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())  # fmt: skip
    assert "dpsgd.accountant" in state.array_records


def test_dpsgd_validates_its_arguments():
    x, y = data(0)
    common = {"epochs": 1, "batch_size": 10, "lr": 0.1, "noise_multiplier": 1.0,
              "max_grad_norm": 1.0, "delta": 1e-5, "state": RecordDict()}  # fmt: skip
    for key, value, match in (
        ("batch_size", 100, "exceeds"),
        ("noise_multiplier", -1.0, "noise_multiplier"),
        ("delta", 2.0, "delta"),
        ("max_grad_norm", 0.0, "max_grad_norm"),
        ("state", {}, "context.state"),
    ):
        with pytest.raises(ConfigError, match=match):
            train_dpsgd(tiny_model(), x, y, **{**common, key: value})


def test_steps_taken_before_training_raises_are_charged():
    from fedhive.privacy.accounting import PrivacyAccountant
    from fedhive.privacy.dpsgd import LEDGER

    x, y = data(0)
    calls = {"n": 0}

    def failing_loss(out, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return torch.nn.functional.cross_entropy(out, target)

    state = RecordDict()
    with pytest.raises(RuntimeError, match="out of memory"):
        train_dpsgd(
            tiny_model(), x, y, epochs=1, batch_size=4, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, delta=1e-5, state=state, loss_fn=failing_loss,
        )  # fmt: skip
    ledger = PrivacyAccountant("poisson", "rdp")
    ledger.load_state_dict(state, LEDGER)
    assert ledger.rounds >= 3  # the two finished steps and the one that raised
    assert ledger.epsilon(1e-5) > 0
