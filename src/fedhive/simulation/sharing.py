"""Detect virtual clients that would share one model object across threads.

Flower's own e2e apps build the model once at module level and every client trains it:
safe where each client runs in its own process (Flower's Ray actors), unsafe when two
clients train the same object at once in two threads (torch autograd errors, wrong
results, crashes). The thread backend asks :func:`shared_models` about the client app and,
when it finds such a model, runs the clients one at a time; the process backend gives each
worker its own copy and runs them in parallel.

What counts as a model: a ``torch.nn.Module`` or a Keras ``Model`` (checked only when
torch or keras is already imported) reachable from the ``client_fn`` without calling it:
its module's globals, its closure, the arguments of a ``functools.partial``. Data arrays
and other shared objects are not flagged (reading them from several threads is safe).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["shared_models"]


def _model_types() -> tuple[type, ...]:
    types: list[type] = []
    torch = sys.modules.get("torch")
    if torch is not None:
        types.append(torch.nn.Module)
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(getattr(keras, "Model", None), type):
        types.append(keras.Model)
    return tuple(types)


def _reachable(fn: Any) -> Iterator[tuple[str, Any]]:
    """(name, object) pairs a client_fn can reach without being called."""
    if isinstance(fn, functools.partial):
        yield from ((f"argument {i}", a) for i, a in enumerate(fn.args))
        yield from fn.keywords.items()
        fn = fn.func
    fn = inspect.unwrap(fn) if callable(fn) else fn
    closure = getattr(fn, "__closure__", None) or ()
    free = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    for name, cell in zip(free, closure, strict=False):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell
            continue
    module_globals = getattr(fn, "__globals__", {})
    for name, value in module_globals.items():
        # every global of the client's module: its client class's methods read them too
        if not name.startswith("__"):
            yield name, value


def shared_models(client_fn: Callable[..., Any]) -> list[str]:
    """The names of models that every client built by ``client_fn`` would share."""
    types = _model_types()
    if not types:
        return []
    return sorted({name for name, value in _reachable(client_fn) if isinstance(value, types)})
