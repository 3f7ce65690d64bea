"""Flower compatibility, client manager: proxies are registered as objects, ``len`` counts
them, a ``Criterion`` subclass filters the sample, and proxies carry ``properties``."""

from __future__ import annotations

import pytest

import fedhive as fl
from fedhive.server import Criterion, SimpleClientManager
from fedhive.server.client_proxy import ClientProxy


class CustomClientProxy(ClientProxy):
    """A Flower-style test proxy: a subclass with the client methods."""

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError


def four():
    names = ("train_client_1", "train_client_2", "test_client_1", "test_client_2")
    return [CustomClientProxy(cid=n) for n in names]


def test_register_a_proxy_twice_and_count_with_len():
    manager = SimpleClientManager()
    client = CustomClientProxy(cid="1")
    assert manager.register(client) is True
    assert manager.register(client) is False
    assert len(manager) == 1
    manager.unregister(client)
    assert len(manager) == 0


def test_an_empty_manager_is_still_truthy():
    # code such as ``client_manager or SimpleClientManager()`` must keep an empty one
    manager = SimpleClientManager()
    assert len(manager) == 0 and bool(manager)


def test_ids_still_register_as_before():
    manager = SimpleClientManager(["a"])
    assert manager.register("b") and len(manager) == 2
    manager.unregister("a")
    assert list(manager.all()) == ["b"]


def test_sampling_returns_the_registered_objects_and_applies_a_criterion_subclass():
    clients = four()
    manager = SimpleClientManager()
    for client in clients:
        manager.register(client)

    class TestCriterion(Criterion):
        def select(self, client: ClientProxy) -> bool:
            return client.cid.startswith("test_")

    sampled = manager.sample(2, criterion=TestCriterion())
    assert clients[2] in sampled and clients[3] in sampled
    assert all(any(s is c for c in clients) for s in sampled)  # the very objects
    everyone = manager.sample(4)
    assert all(client in everyone for client in clients)
    assert manager.all()["train_client_1"] is clients[0]


def test_properties_start_empty_and_do_not_change_equality():
    proxy = CustomClientProxy(cid="1")
    assert proxy.cid == "1" and not proxy.properties
    proxy.properties["cores"] = 4
    assert ClientProxy("1", {"other": 1}) == ClientProxy("1")
    assert hash(ClientProxy("1", {"x": 2})) == hash(ClientProxy("1"))


def test_a_proxy_without_a_string_id_is_refused():
    class NoId:
        cid = 7

    with pytest.raises(fl.ConfigError, match="str cid"):
        SimpleClientManager().register(NoId())  # type: ignore[arg-type]


def test_criterion_is_exported_where_flower_has_it():
    import fedhive.server.criterion as criterion

    assert criterion.Criterion is fl.server.Criterion
