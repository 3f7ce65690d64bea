"""Imports point down the layer map, and no package imports another's private names.

Every module under ``src/fedhive`` is parsed (``ast``, nothing is imported), and every
``import``/``from ... import`` of fedhive is checked, also those inside functions and under
``TYPE_CHECKING``: a lazy or type-only import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: The layer map of docs/design.md, top row first. A module belongs to the row of its
#: longest matching prefix. It may import its own top-level package (``fedhive.server``
#: is one package, whatever its rows) only from its own row or below, and other
#: packages only from rows strictly below: peers in one row (server and client, privacy
#: and secagg) do not import each other. ``fedhive.testing`` ships test doubles, so it
#: sits at the top, where no library code can import it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedhive.cli", "fedhive.testing"),
    # the entry points: they compose everything below (secure aggregation included)
    ("fedhive.simulation", "fedhive.server.start", "fedhive.client.start", "fedhive.report"),
    (
        "fedhive.privacy",
        "fedhive.secagg",
        "fedhive.personalization",
        "fedhive.callbacks",
    ),
    # codecs: SecAgg+ encodes with them inside its round
    ("fedhive.compression",),
    ("fedhive.server", "fedhive.client"),
    # the strategy API, with the membership it samples from (Flower's ClientManager)
    ("fedhive.server.strategy", "fedhive.server.client_manager"),
    ("fedhive.transport",),
    ("fedhive.data", "fedhive.models"),
    ("fedhive.common",),
)

#: Known violations, each owned by work in progress elsewhere; an entry that no longer
#: occurs fails ``test_pending_violations_still_exist``, so fixed ones get removed here.
PENDING: dict[tuple[str, str, str], str] = {
    # (importing module, imported module, name): why it is still here
}


#: Flower's namespace puts a few upper-layer names in a lower package; these lazy
#: re-exports (resolved in the package's ``__getattr__`` on first use, so importing the
#: lower package never loads the upper one) are the only allowed upward imports.
FLOWER_FACADES: frozenset[tuple[str, str]] = frozenset(
    # fl.server.strategy.DifferentialPrivacy*: the DP wrappers live in fedhive.privacy
    {("fedhive.server.strategy", "fedhive.privacy")}
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    name: str  # the imported name ("" for ``import fedhive.x``)
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.target, self.name)

    def __str__(self) -> str:
        what = f"from {self.target} import {self.name}" if self.name else f"import {self.target}"
        return f"{self.source}:{self.line}: {what}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "fedhive").rglob("*.py"))}


MODULES = all_modules()


def imports_of(module: str, path: Path) -> list[Import]:
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fedhive":
                    found.append(Import(module, alias.name, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "fedhive":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in MODULES else base
                found.append(Import(module, target, alias.name, node.lineno))
    return found


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in imports_of(module, path)]


def row_of(module: str) -> int:
    best, row = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, row = len(prefix), index
    return row


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def upward(imp: Import) -> str | None:
    """Why ``imp`` breaks the layer map, or None."""
    if imp.target.startswith(imp.source + ".") and MODULES[imp.source].name == "__init__.py":
        return None  # a package re-exporting its own modules (its public facade)
    if (imp.source, imp.target) in FLOWER_FACADES:
        return None
    source, target = row_of(imp.source), row_of(imp.target)
    if target < source:
        return f"points up (the row of {LAYERS[source][0]} imports the row of {LAYERS[target][0]})"
    if target == source and package_of(imp.source) != package_of(imp.target):
        return "imports a peer package of the same row"
    return None


def private(imp: Import) -> str | None:
    """Why ``imp`` takes another package's private name or module, or None."""
    if package_of(imp.source) == package_of(imp.target):
        return None
    parts = imp.target.split(".") + ([imp.name] if imp.name else [])
    hidden = [p for p in parts if p.startswith("_") and not p.startswith("__")]
    return f"uses the private {'.'.join(hidden)}" if hidden else None


def violations() -> dict[tuple[str, str, str], str]:
    found = {}
    for imp in ALL_IMPORTS:
        reason = upward(imp) or private(imp)
        if reason is not None:
            found[imp.key] = f"{imp}  <- {reason}"
    return found


def test_every_module_has_a_row():
    unplaced = [m for m in MODULES if m != "fedhive" and row_of(m) < 0]
    assert not unplaced, f"add these modules to LAYERS (and docs/design.md): {unplaced}"


def test_imports_point_down_and_stay_public():
    found = violations()
    new = [text for key, text in sorted(found.items()) if key not in PENDING]
    assert not new, "imports against the layer map:\n" + "\n".join(new)


def test_pending_violations_still_exist():
    found = violations()
    fixed = [key for key in PENDING if key not in found]
    assert not fixed, f"fixed, so remove them from PENDING: {fixed}"


@pytest.mark.parametrize(
    ("source", "target", "name", "expected"),
    [
        ("fedhive.transport.grpc_server", "fedhive.server.client_manager", "X", "points up"),
        ("fedhive.server.checkpoint", "fedhive.client.state", "StateStore", "peer package"),
        ("fedhive.secagg.server", "fedhive.privacy.central", "Y", "peer package"),
        ("fedhive.server.strategy.base", "fedhive.server.engine", "Engine", "points up"),
        ("fedhive.cli.main", "fedhive.server.engine", "_helper", "private _helper"),
        ("fedhive.cli.main", "fedhive.data._validate", "check", "private _validate"),
        ("fedhive.server.engine", "fedhive.server.strategy", "FedAvg", None),
        ("fedhive.server.asynchronous", "fedhive.server.engine", "_same_package", None),
        ("fedhive.client.start", "fedhive.secagg.client", "with_secagg_mod", None),
        ("fedhive.server.strategy.base", "fedhive.server.client_manager", "ClientProxy", None),
    ],
)
def test_the_checker_tells_down_from_up(source, target, name, expected):
    imp = Import(source, target, name, 1)
    reason = upward(imp) or private(imp)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_the_parser_sees_lazy_relative_and_type_only_imports(tmp_path):
    package = tmp_path / "fedhive" / "server"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from fedhive.simulation.app import start_simulation\n"
        "def f():\n"
        "    import fedhive.cli.main\n"
        "    from .engine import _run\n"
    )
    found = imports_of("fedhive.server.mod", package / "mod.py")
    assert [(i.target, i.name) for i in found] == [
        ("fedhive.simulation.app", "start_simulation"),
        ("fedhive.cli.main", ""),
        ("fedhive.server.engine", "_run"),
    ]


def test_membership_lives_in_transport_and_the_client_manager_is_one():
    import threading

    from fedhive.server.client_manager import SimpleClientManager
    from fedhive.transport.membership import NodeSet

    nodes = NodeSet()
    assert nodes.register("a") and nodes.register("b") and not nodes.register("a")
    nodes.unregister("a")
    nodes.unregister("never-joined")
    assert nodes.node_ids() == ["b"] and "a" not in nodes and len(nodes) == 1
    threading.Timer(0.05, nodes.register, args=("c",)).start()
    assert nodes.wait_for(2, timeout=5)
    assert not nodes.wait_for(3, timeout=0.01)

    manager = SimpleClientManager(["x", "y", "z"], seed=0)
    manager.unregister("x")  # what the gRPC server calls when a client leaves
    assert manager.register("w") and not manager.register("w")
    assert sorted(manager.all()) == ["w", "y", "z"] and manager.num_available() == 3
