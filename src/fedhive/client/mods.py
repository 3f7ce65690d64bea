"""Client mods shipped with fedhive.

:func:`scaffold_mod` is the client side of SCAFFOLD (Karimireddy et al. 2020, Option II
control variates); the server side is :class:`fedhive.server.strategy.Scaffold`, whose
module :mod:`fedhive.server.strategy.scaffold_mod` holds it, so the strategy can name the
mod it requires without importing the client package.
"""

from __future__ import annotations

from fedhive.server.strategy.scaffold_mod import SCAFFOLD_STATE, scaffold_correction, scaffold_mod

__all__ = ["SCAFFOLD_STATE", "scaffold_correction", "scaffold_mod"]
