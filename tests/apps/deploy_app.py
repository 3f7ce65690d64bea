"""Client apps for ``fedhive client --app`` in the deployment and site-policy tests."""

from __future__ import annotations

import numpy as np

import fedhive as fl


class SiteClient(fl.client.NumPyClient):
    """Adds 1 to every weight; reports one allowed and one private metric per stage."""

    def get_parameters(self, config):
        return [np.zeros(4, np.float32)]

    def fit(self, parameters, config):
        return [p + 1.0 for p in parameters], 3, {"loss": 0.5, "patients_seen": 42}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 3, {"accuracy": 0.75, "site_name": "st-mary"}


def client_fn(context: fl.client.Context) -> SiteClient:
    return SiteClient()


def legacy_client_fn(cid):
    return SiteClient()


class BrokenClient(SiteClient):
    """Fails every task it is given."""

    def fit(self, parameters, config):
        raise RuntimeError("the site's data is unreadable")

    def evaluate(self, parameters, config):
        raise RuntimeError("the site's data is unreadable")


class NoEvaluateClient(SiteClient):
    """Trains, but fails every evaluation."""

    def evaluate(self, parameters, config):
        raise RuntimeError("no test split here")


def broken_client_fn(context: fl.client.Context) -> BrokenClient:
    return BrokenClient()


def no_evaluate_client_fn(context: fl.client.Context) -> NoEvaluateClient:
    return NoEvaluateClient()


client = SiteClient()
app = fl.client.ClientApp(client_fn)
not_a_client = 42
