"""``fedhive secagg``: enrolled SecAgg+ identities (see :mod:`fedhive.secagg.identity`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedhive.cli.deploy_common import console, err
from fedhive.common.errors import FedhiveError

secagg_app = typer.Typer(
    name="secagg",
    help="SecAgg+ identity keys: make one per site, share the peers file.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # "[identities]" is text, not rich markup
)


@secagg_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", help="where to write the key (PEM, mode 0600)")],
    node_id: Annotated[
        str, typer.Option(help="this site's node id, for the line of the peers file")
    ],
    force: Annotated[bool, typer.Option("--force", help="replace an existing key")] = False,
) -> None:
    """Make this site's SecAgg+ identity key; print its line of the peers file.

    Every site runs this once and sends its printed line to whoever keeps the peers file
    (an [identities] table); each site then starts with
    `fedhive client --node-id ID --secagg-identity KEY --secagg-peers PEERS.toml`.
    """
    try:
        from fedhive.secagg.identity import format_peer, write_identity

        public = write_identity(out, overwrite=force)
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"wrote {out}; add this line to the [identities] table of the peers file:",
              highlight=False, markup=False)  # fmt: skip
    console.print(format_peer(node_id, public), highlight=False, markup=False, soft_wrap=True)
