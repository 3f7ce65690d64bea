"""A client process for the named-records tests: SCAFFOLD and an extras echo over gRPC."""

from __future__ import annotations

import argparse
import sys

import numpy as np

import fedhive as fl
from fedhive.client.mods import scaffold_correction, scaffold_mod
from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    RecordDict,
    Status,
)

LR = 0.1


def model() -> list[np.ndarray]:
    return [np.zeros(3, np.float32), np.zeros((2, 2), np.float32)]


class QuadraticClient(fl.client.NumPyClient):
    """Gradient steps on ``0.5 * ||w - t_pid||^2``, corrected as SCAFFOLD asks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.targets = [np.full(3, pid + 1.0), np.full((2, 2), -float(pid))]

    def get_parameters(self, config):
        return model()

    def fit(self, parameters, config):
        steps = 3 + self.pid
        correction = scaffold_correction(self.context)
        w = [p.astype(np.float64) for p in parameters]
        for _ in range(steps):
            grads = [wi - ti for wi, ti in zip(w, self.targets, strict=True)]
            if correction is not None:
                grads = [g + c for g, c in zip(grads, correction, strict=True)]
            w = [wi - LR * g for wi, g in zip(w, grads, strict=True)]
        out = [wi.astype(np.float32) for wi in w]
        return out, 10 + self.pid, {"num_steps": steps, "lr": LR}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def quadratic_client_fn(context) -> fl.client.Client:
    return QuadraticClient(int(context.node_config["partition-id"])).to_client()


class EchoClient(fl.client.Client):
    """Answers with what the instruction's extras held, changed so both ways are visible;
    ``big`` adds ``big`` bytes of extras (record ``"echo.big"``)."""

    def __init__(self, big: int = 0) -> None:
        self.big = big

    def fit(self, ins: FitIns) -> FitRes:
        arrays = ins.extras.array_records["echo"]
        config = ins.extras.config_records["echo.config"]
        metrics = ins.extras.metric_records["echo.metrics"]
        extras = RecordDict(
            {"echo": {"0": arrays["0"] * 2}},
            {"echo.config": {"tag": f"{config['tag']}!", "blob": config["blob"][::-1]}},
            {"echo.metrics": {"m": metrics["m"] + 1}},
        )
        if self.big:
            extras.array_records["echo.big"] = {"blob": np.ones(self.big, np.uint8)}
        model = [a + 1 for a in ins.parameters.arrays]
        return FitRes(Status(), Parameters(arrays=model), 1, {}, extras=extras)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        seen = ins.extras.config_records["ask"]["question"]
        extras = RecordDict(config_records={"answer": {"text": f"{seen} 42"}})
        return EvaluateRes(Status(), 0.0, 1, {}, extras=extras)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--mode", choices=("scaffold", "echo"), required=True)
    parser.add_argument("--big", type=int, default=0, help="bytes of extra extras (echo)")
    args = parser.parse_args()
    try:
        if args.mode == "scaffold":
            fl.client.start_client(
                server_address=args.address,
                client=QuadraticClient(args.pid).to_client(),
                node_id=f"node-{args.pid}",
                mods=[scaffold_mod],
            )
        else:
            fl.client.start_client(server_address=args.address, client=EchoClient(args.big))
    except fl.FedhiveError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
