"""Tests of fedhive.models: numpy logistic regression and the torch models."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedhive.common.errors import ConfigError
from fedhive.models import numpy_lr


def blobs(
    n: int = 300, dim: int = 5, num_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable-ish Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 3.0, size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=n)
    x = centers[y] + rng.normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def flat_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True))))


# --------------------------------------------------------------------------- numpy LR


def test_init_params_shapes_and_seed() -> None:
    w, b = numpy_lr.init_params(7, 4, seed=1)
    assert w.shape == (7, 4) and b.shape == (4,) and w.dtype == np.float32
    np.testing.assert_array_equal(numpy_lr.init_params(7, 4, seed=1)[0], w)
    with pytest.raises(ConfigError):
        numpy_lr.init_params(7, 1, seed=0)


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_gradient_matches_finite_differences(l2: float) -> None:
    x, y = blobs(n=20, dim=4, num_classes=3)
    x = x.astype(np.float64)
    rng = np.random.default_rng(2)
    params = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    _, grads = numpy_lr.loss_and_grad(params, x, y, l2=l2)
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            orig = p[idx]
            p[idx] = orig + eps
            up, _ = numpy_lr.loss_and_grad(params, x, y, l2=l2)
            p[idx] = orig - eps
            down, _ = numpy_lr.loss_and_grad(params, x, y, l2=l2)
            p[idx] = orig
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


def test_training_reduces_loss_and_learns() -> None:
    x, y = blobs()
    params = numpy_lr.init_params(5, 3, seed=0)
    before, _ = numpy_lr.evaluate(params, x, y)
    new, info = numpy_lr.train(params, x, y, epochs=5, batch_size=16, lr=0.1, seed=0)
    after, acc = numpy_lr.evaluate(new, x, y)
    assert after < 0.5 * before and acc > 0.9
    assert info["num_examples"] == 300 and info["num_examples_seen"] == 1500
    assert info["num_steps"] == 5 * 19
    assert new[0].dtype == np.float32
    assert np.array_equal(
        numpy_lr.predict(new, x[:3]), numpy_lr.predict_proba(new, x[:3]).argmax(1)
    )


def test_training_is_deterministic_and_does_not_mutate() -> None:
    x, y = blobs()
    params = numpy_lr.init_params(5, 3, seed=0)
    copy = [p.copy() for p in params]
    a, _ = numpy_lr.train(params, x, y, epochs=2, batch_size=8, lr=0.1, seed=3, momentum=0.9)
    b, _ = numpy_lr.train(params, x, y, epochs=2, batch_size=8, lr=0.1, seed=3, momentum=0.9)
    c, _ = numpy_lr.train(params, x, y, epochs=2, batch_size=8, lr=0.1, seed=4, momentum=0.9)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert all(np.array_equal(p, q) for p, q in zip(params, copy, strict=True))


def test_full_batch_and_max_steps() -> None:
    x, y = blobs()
    params = numpy_lr.init_params(5, 3, seed=0)
    _, info = numpy_lr.train(params, x, y, epochs=3, batch_size=0, lr=0.1, seed=0)
    assert info["num_steps"] == 3 and info["num_examples_seen"] == 900
    # full batch is the exact gradient step: independent of the seed
    a, _ = numpy_lr.train(params, x, y, epochs=1, batch_size=-1, lr=0.1, seed=0)
    _, grads = numpy_lr.loss_and_grad(params, x, y)
    np.testing.assert_allclose(a[0], params[0] - 0.1 * grads[0], rtol=1e-5, atol=1e-6)
    _, info = numpy_lr.train(params, x, y, epochs=10, batch_size=10, lr=0.1, seed=0, max_steps=7)
    assert info["num_steps"] == 7 and info["num_examples_seen"] == 70


def test_proximal_term_pulls_toward_global() -> None:
    x, y = blobs()
    start = numpy_lr.init_params(5, 3, seed=0)
    kwargs: dict[str, Any] = {"epochs": 3, "batch_size": 16, "lr": 0.1, "seed": 0}
    free, _ = numpy_lr.train(start, x, y, **kwargs)
    prox, _ = numpy_lr.train(start, x, y, proximal_mu=1.0, **kwargs)
    assert flat_distance(prox, start) < 0.8 * flat_distance(free, start)
    far = [p + 5.0 for p in start]
    pulled, _ = numpy_lr.train(start, x, y, proximal_mu=1.0, global_params=far, **kwargs)
    assert flat_distance(pulled, far) < flat_distance(free, far)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"momentum": 1.0},
        {"epochs": -1},
        {"proximal_mu": -0.1},
        {"max_steps": -2},
    ],
)
def test_train_bad_arguments(kwargs: dict[str, Any]) -> None:
    x, y = blobs(n=20)
    params = numpy_lr.init_params(5, 3, seed=0)
    full: dict[str, Any] = {"epochs": 1, "batch_size": 4, "lr": 0.1, "seed": 0, **kwargs}
    with pytest.raises(ConfigError):
        numpy_lr.train(params, x, y, **full)


def test_shape_and_label_errors() -> None:
    x, y = blobs(n=20)
    params = numpy_lr.init_params(5, 3, seed=0)
    with pytest.raises(ConfigError):
        numpy_lr.evaluate(params, x[:, :4], y)
    with pytest.raises(ConfigError):
        numpy_lr.evaluate(params, x, y + 3)
    with pytest.raises(ConfigError):
        numpy_lr.evaluate(params[:1], x, y)


# --------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def tm() -> ModuleType:
    pytest.importorskip("torch")
    from fedhive.models import torch_models

    return torch_models


def test_lazy_names_resolve(tm: ModuleType) -> None:
    import fedhive.models as models

    assert models.CNN1D is tm.CNN1D and models.train_torch is tm.train_torch
    with pytest.raises(AttributeError):
        _ = models.not_a_model


def test_models_forward_shapes(tm: ModuleType) -> None:
    import torch

    cnn = tm.CNN1D(num_classes=10, length=40, seed=0)
    assert cnn(torch.zeros(4, 40)).shape == (4, 10)
    assert cnn(torch.zeros(4, 1, 40)).shape == (4, 10)
    mlp = tm.MLP(64, [32, 16], 10, seed=0)
    assert mlp(torch.zeros(3, 8, 8)).shape == (3, 10)
    assert tm.MLP(5, (), 3)(torch.zeros(2, 5)).shape == (2, 3)
    with pytest.raises(ConfigError):
        tm.CNN1D(num_classes=1)


def test_seeded_init_leaves_global_rng_alone(tm: ModuleType) -> None:
    import torch

    state = torch.random.get_rng_state()
    a, b = tm.CNN1D(seed=7), tm.CNN1D(seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    wa, wb = tm.get_weights(a), tm.get_weights(b)
    assert all(np.array_equal(p, q) for p, q in zip(wa, wb, strict=True))
    c = tm.CNN1D(seed=8)
    assert not np.array_equal(tm.get_weights(a)[0], tm.get_weights(c)[0])


def test_weights_round_trip_including_buffers(tm: ModuleType) -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    weights = tm.get_weights(model)
    assert len(weights) == len(model.state_dict())
    assert any(w.dtype == np.int64 for w in weights)  # num_batches_tracked
    new = [w + 1 for w in weights]
    tm.set_weights(model, new)
    for got, want in zip(tm.get_weights(model), new, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    weights[0][:] = 123.0  # copies: editing them does not touch the model
    assert not (tm.get_weights(model)[0] == 123.0).any()


def test_set_weights_validates(tm: ModuleType) -> None:
    model = tm.MLP(4, 3, 2, seed=0)
    weights = tm.get_weights(model)
    with pytest.raises(ConfigError, match="shape"):
        tm.set_weights(model, [weights[0].T, *weights[1:]])
    with pytest.raises(ConfigError, match="weight tensors"):
        tm.set_weights(model, weights[:-1])


def test_torch_training_reduces_loss(tm: ModuleType) -> None:
    x, y = blobs(n=200, dim=40, num_classes=4)
    model = tm.CNN1D(num_classes=4, length=40, seed=0)
    before, _ = tm.evaluate_torch(model, x, y)
    metrics = tm.train_torch(model, x, y, epochs=3, batch_size=10, lr=0.05, momentum=0.9, seed=0)
    after, acc = tm.evaluate_torch(model, x, y, batch_size=64)
    assert after < 0.5 * before and acc > 0.8
    assert metrics["num_examples"] == 200 and metrics["num_steps"] == 60
    assert metrics["num_examples_seen"] == 600 and np.isfinite(metrics["loss"])
    assert model.training  # mode restored


def test_torch_training_is_deterministic(tm: ModuleType) -> None:
    import torch

    x, y = blobs(n=64, dim=40, num_classes=4)
    runs = []
    for seed in (1, 1, 2):
        model = tm.CNN1D(num_classes=4, seed=0)
        state = torch.random.get_rng_state()
        tm.train_torch(model, x, y, epochs=2, batch_size=8, lr=0.05, momentum=0.9, seed=seed)
        assert torch.equal(state, torch.random.get_rng_state())
        runs.append(tm.get_weights(model))
    assert all(np.array_equal(p, q) for p, q in zip(runs[0], runs[1], strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(runs[0], runs[2], strict=True))


def test_torch_full_batch_and_proximal(tm: ModuleType) -> None:
    x, y = blobs(n=100, dim=6, num_classes=3)
    start = tm.MLP(6, 16, 3, seed=0)
    w0 = tm.get_weights(start)
    metrics = tm.train_torch(start, x, y, epochs=4, batch_size=0, lr=0.1, seed=0)
    assert metrics["num_steps"] == 4 and metrics["num_examples_seen"] == 400
    distances = []
    for mu in (0.0, 10.0):
        model = tm.MLP(6, 16, 3, seed=0)
        tm.train_torch(model, x, y, epochs=5, batch_size=10, lr=0.05, seed=0, proximal_mu=mu)
        distances.append(flat_distance(tm.get_weights(model), w0))
    assert distances[1] < 0.7 * distances[0]
    steps = tm.train_torch(start, x, y, epochs=9, batch_size=10, lr=0.1, seed=0, max_steps=5)
    assert steps["num_steps"] == 5


def test_torch_bad_arguments(tm: ModuleType) -> None:
    x, y = blobs(n=10, dim=6)
    model = tm.MLP(6, 4, 3, seed=0)
    with pytest.raises(ConfigError):
        tm.train_torch(model, x, y, epochs=1, batch_size=4, lr=-1.0, seed=0)
    with pytest.raises(ConfigError):
        tm.train_torch(model, x, y[:5], epochs=1, batch_size=4, lr=0.1, seed=0)
    with pytest.raises(ConfigError):
        tm.evaluate_torch(model, x[:0], y[:0])
