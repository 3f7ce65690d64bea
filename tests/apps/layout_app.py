"""Client apps for the tests of a server that serves the clients' own model.

``client_fn`` builds a client whose model has the layout its node id names: node ids
starting with ``wide`` hold 5 values, others 4. Every fit adds 1 to every weight (a
client whose model does not fit the server's sends its own instead), or raises when the
node id starts with ``broken``.
"""

from __future__ import annotations

import numpy as np

import fedhive as fl


class LayoutClient(fl.client.NumPyClient):
    def __init__(self, size: int, broken: bool) -> None:
        self.size = size
        self.broken = broken

    def get_parameters(self, config):
        return [np.zeros(self.size, np.float32), np.zeros((2, 3), np.float32)]

    def fit(self, parameters, config):
        if self.broken:
            raise ValueError("this site's data failed to load")
        own = self.get_parameters(config)
        if [p.shape for p in parameters] != [w.shape for w in own]:
            return own, 3, {"loss": 0.5}  # keeps its own model: the server must refuse it
        return [p + 1.0 for p in parameters], 3, {"loss": 0.5}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 3, {"accuracy": 0.5}


def client_fn(context: fl.client.Context) -> LayoutClient:
    node = context.node_id
    return LayoutClient(5 if node.startswith("wide") else 4, node.startswith("broken"))
