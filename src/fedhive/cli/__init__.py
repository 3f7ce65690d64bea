"""``fedhive``: the command line.

``fedhive run [CONFIG.toml]`` simulates a federation and writes its results; see
``fedhive run --help``.
"""

from fedhive.cli.main import app, main

__all__ = ["app", "main"]
