"""A client app for the ``fedhive server`` strategy tests: a fixed update and an echo of
the fit config, so the server's strategy shows in its model and in the fit metrics."""

from __future__ import annotations

import fedhive as fl


class EchoClient(fl.client.NumPyClient):
    """Adds 1 to every weight and reports every numeric fit config entry as a metric."""

    def fit(self, parameters, config):
        echoed = {
            k: v
            for k, v in config.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return [p + 1.0 for p in parameters], 3, {"loss": 0.5, **echoed}

    def evaluate(self, parameters, config):
        return 0.5, 3, {"accuracy": 0.5}


def client_fn(context: fl.client.Context) -> EchoClient:
    return EchoClient()
