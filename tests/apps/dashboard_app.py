"""A client app for the live dashboard test: training takes a moment (so the page can be
watched mid-run), and each site's second fit fails with a reason the page must show."""

from __future__ import annotations

import time

import numpy as np

import fedhive as fl

_FITS = [0]


class SlowSite(fl.client.NumPyClient):
    def get_parameters(self, config):
        return [np.zeros(4, np.float32)]

    def fit(self, parameters, config):
        _FITS[0] += 1
        time.sleep(0.4)
        if _FITS[0] == 2:
            raise RuntimeError("the scanner archive is offline <b>today</b>")
        return [p + 0.1 for p in parameters], 5, {"loss": 1.0 / _FITS[0]}

    def evaluate(self, parameters, config):
        accuracy = float(min(1.0, parameters[0].mean()))
        return 1.0 - accuracy, 5, {"accuracy": accuracy}


app = fl.client.ClientApp(lambda context: SlowSite())
