"""``fedhive new NAME --framework pytorch|keras|sklearn|numpy``: a project to start from.

The project is a folder with a client (``client.py``: the model, local training,
evaluation and ``app``), its local data (``data.py``: generated, or scikit-learn's
digits, so nothing is downloaded), the simulation's config (``fedhive.toml``, run with
``fedhive run fedhive.toml``), a deployment server's config (``server.toml``), tests
(``test_client.py``, run with ``pytest``), a ``pyproject.toml`` and a README. The files
come from the templates shipped in ``fedhive/cli/templates``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedhive.common.errors import ConfigError, FedhiveError

__all__ = ["FRAMEWORKS", "Template", "new_command", "new_project"]

err = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class Template:
    """What differs between the frameworks' projects."""

    client: str  # the client template's file
    data: str  # the data template's file
    extras: str  # fedhive's pip extras the project needs
    data_note: str
    lr: float
    local_epochs: int
    #: the least accuracy its own test expects after 3 rounds of 2 clients
    min_accuracy: float
    extra_tables: str = ""
    #: more lines for ``[tool.pytest.ini_options]``
    pytest_extra: str = ""


_GENERATED = "generated from a fixed seed: 2,000 points in 4 classes"
FRAMEWORKS: dict[str, Template] = {
    "numpy": Template("client_numpy.py", "data_generated.py", "grpc", _GENERATED, 0.1, 1, 0.7),
    "sklearn": Template(
        "client_sklearn.py",
        "data_digits.py",
        "grpc,data",
        "scikit-learn's 8x8 digits",
        0.1,
        1,
        0.8,
    ),
    "pytorch": Template(
        "client_pytorch.py", "data_generated.py", "grpc,torch", _GENERATED, 0.05, 1, 0.7
    ),
    "keras": Template(
        "client_keras.py",
        "data_generated.py",
        "grpc,torch,keras",
        _GENERATED,
        0.05,
        1,
        0.7,
        # Keras builds its models in shared global state: one client at a time
        "\n[simulation]\nnum_workers = 1\n",
        # Keras 3 on NumPy 2 warns about its own variables' __array__
        'filterwarnings = ["ignore::DeprecationWarning:keras.*"]\n',
    ),
}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


def _text(name: str) -> str:
    return resources.files("fedhive.cli").joinpath("templates", f"{name}.tmpl").read_text()


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[-_]", name) if part) + "Client"


def new_project(name: str, framework: str, parent: Path = Path(".")) -> Path:
    """Write project ``name`` for ``framework`` into ``parent/name``; its folder.

    ConfigError for an unknown framework, a name that is not a project name, or a
    folder that exists and is not empty (nothing is overwritten)."""
    if framework not in FRAMEWORKS:
        known = ", ".join(FRAMEWORKS)
        raise ConfigError(f"--framework {framework!r}: choose one of {known}")
    if not _NAME.match(name):
        raise ConfigError(
            f"project name {name!r}: use letters, digits, '-' and '_', starting with a letter"
        )
    folder = parent / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} exists and is not empty; choose another name or folder")
    template = FRAMEWORKS[framework]
    values = {
        "name": name,
        "framework": framework,
        "client_class": _class_name(name),
        "extras": template.extras,
        "data_note": template.data_note,
        "lr": repr(template.lr),
        "local_epochs": str(template.local_epochs),
        "min_accuracy": repr(template.min_accuracy),
        "extra_tables": template.extra_tables,
        "pytest_extra": template.pytest_extra,
    }
    files = {
        "client.py": _text(template.client) + _text("client_tail.py"),
        "data.py": _text(template.data),
        "fedhive.toml": _text("fedhive.toml"),
        "server.toml": _text("server.toml"),
        "test_client.py": _text("test_client.py"),
        "pyproject.toml": _text("pyproject.toml"),
        "README.md": _text("README.md"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        (folder / filename).write_text(text.rstrip("\n") + "\n")
    return folder


def new_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the project's name and folder")],
    framework: Annotated[
        str, typer.Option(help="the client's framework: " + " | ".join(FRAMEWORKS))
    ] = "numpy",
    directory: Annotated[
        Path, typer.Option("--dir", help="the folder to make the project in")
    ] = Path("."),
) -> None:
    """Make a federated learning project to start from: a client, its local data, the
    configs of a simulation (fedhive run) and of a deployment (fedhive server), tests.
    """
    try:
        folder = new_project(name, framework, directory)
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    err.print(
        f"fedhive new: made {folder} ({framework}). Next:\n"
        f"  cd {folder}\n"
        "  pytest                      # its tests\n"
        "  fedhive run fedhive.toml    # a simulation of 4 clients",
        highlight=False,
        markup=False,
    )
