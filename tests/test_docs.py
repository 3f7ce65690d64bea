"""The documentation's code is true to the code: every ``fedhive`` command it shows parses
against the current command line, every TOML block is a config (of ``fedhive run``,
``fedhive server``, a site policy or a tokens file) that the real validators accept,
and every Python block compiles."""

from __future__ import annotations

import re
import tomllib

import pytest
import typer

from docs_helpers import PAGES, Block, blocks, commands
from fedhive.cli import app
from fedhive.cli.config import validate
from fedhive.cli.server_config import DeployTrainConfig, load_tokens, validate_server_config
from fedhive.client.policy import SitePolicy
from fedhive.common import ConfigError
from fedhive.secagg.identity import load_peers, public_key_text, write_identity

ROOT_COMMAND = typer.main.get_command(app)


def _placeholders(command: typer.core.TyperCommand, argv: list[str]) -> list[str]:
    """``...`` as the value of an option that takes one reads as some value; anywhere
    else, as "and more options"."""
    takes_value = {
        name
        for param in command.params
        if param.param_type_name == "option" and not getattr(param, "is_flag", False)
        for name in param.opts
    }
    out: list[str] = []
    for word in argv:
        if word != "...":
            out.append(word)
        elif out and out[-1] in takes_value:
            out.append("VALUE")
    return out


def parse(argv: list[str]) -> None:
    """Parse ``fedhive ARGV`` as the command line would, without running it (a click
    UsageError for an unknown command or option, a bad value or a missing one)."""
    args = list(argv)
    command, name = ROOT_COMMAND, "fedhive"
    while isinstance(command, typer.core.TyperGroup) and args and args[0] in command.commands:
        name = args.pop(0)
        command = command.commands[name]
    if isinstance(command, typer.core.TyperGroup) and args and not args[0].startswith("-"):
        raise ValueError(f"No such command {args[0]!r} (fedhive {name})")
    command.make_context(name, _placeholders(command, args))


def _shown_commands() -> list[tuple[str, list[str]]]:
    return [
        (block.where, argv)
        for page in PAGES
        for block in blocks(page, "bash")
        for argv in commands(block)
        if "--help" not in argv
    ]


def test_every_fedhive_command_shown_parses_against_the_cli():
    shown = _shown_commands()
    assert len(shown) >= 30  # the pages' commands were found at all
    bad = []
    for where, argv in shown:
        try:
            parse(argv)
        except Exception as exc:  # each bad command is reported
            bad.append(f"{where}\n    fedhive {' '.join(argv)}\n    {exc}")
    assert not bad, "\n".join(bad)


def test_the_parser_check_fails_on_a_wrong_command():
    with pytest.raises(Exception, match="No such option"):
        parse(["client", "--server", "h:1", "--token-path", "t"])
    with pytest.raises(Exception, match="No such command"):
        parse(["serve", "server.toml"])
    parse(["client", "--server", "...", "--insecure", "..."])


#: Pages whose config blocks are all of ``fedhive server``.
SERVER_PAGES = frozenset({"deployment.md", "hospitals.md"})


def _kind(block: Block, data: dict) -> str:
    """What a TOML block is, from the sentence before it (or its keys)."""
    intro = block.intro.lower()
    if "token" in intro and all(isinstance(v, str) for v in data.values()):
        return "tokens"
    if set(data) == {"identities"}:
        return "peers"
    if "policy" in intro and "[policy]" not in block.text:
        return "policy"
    if block.page.name in SERVER_PAGES:
        return "server"
    if "fedhive server" in intro or "server.toml" in intro or "server config" in intro:
        return "server" if "fedhive run" not in intro else "both"
    if "fedhive run" in intro:
        return "run"
    return "either"


def _check(kind: str, data: dict, tmp_path) -> None:
    if kind == "tokens":
        path = tmp_path / "tokens.toml"
        path.write_text("\n".join(f'"{k}" = "{v}"' for k, v in data.items()))
        load_tokens(path)
    elif kind == "peers":  # the page's "..." stand for each site's public key
        path = tmp_path / "peers.toml"
        public = public_key_text(write_identity(tmp_path / "site.key", overwrite=True))
        path.write_text(tomllib_text(data).replace('"..."', f'"{public}"'))
        load_peers(path)
    elif kind == "policy":
        SitePolicy.from_dict(data)
    elif kind == "run":
        validate(data)
    elif kind == "server":
        validate_server_config(data)
    elif kind == "both":
        validate(data)
        validate_server_config(data)
    else:  # a fragment the page shows for one or the other
        errors = []
        for check in (validate, validate_server_config):
            try:
                check(data)
                return
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("\n".join(errors))


def tomllib_text(data: dict) -> str:
    """A peers table back as TOML text (node ids quoted)."""
    lines = ["[identities]", *(f'"{k}" = "{v}"' for k, v in data["identities"].items())]
    return "\n".join(lines) + "\n"


def _with_dirs(data: dict, tmp_path) -> dict:
    """Folders a config names (a spill folder must exist) made where the test can."""
    memory = data.get("memory")
    if isinstance(memory, dict) and "spill_dir" in memory:
        (tmp_path / "spill").mkdir(exist_ok=True)
        data = {**data, "memory": {**memory, "spill_dir": str(tmp_path / "spill")}}
    return data


def test_every_toml_block_is_a_config_the_validators_accept(tmp_path):
    shown = [block for page in PAGES for block in blocks(page, "toml")]
    assert len(shown) >= 20
    bad = []
    for block in shown:
        try:
            data = tomllib.loads(block.text)
            _check(_kind(block, data), _with_dirs(data, tmp_path), tmp_path)
        except (tomllib.TOMLDecodeError, ConfigError) as exc:
            bad.append(f"{block.where} ({_kind(block, {})})\n    {exc}")
    assert not bad, "\n".join(bad)


def test_the_toml_check_fails_on_a_wrong_key(tmp_path):
    with pytest.raises(ConfigError, match="proximal_mu"):
        _check("run", {"strategy": {"name": "fedavg", "proximal_mu": 0.1}}, tmp_path)
    with pytest.raises(ConfigError, match="tls"):
        _check("server", {"tls": {"certificate": "x.pem"}}, tmp_path)
    with pytest.raises(ConfigError):
        _check("either", {"no_such_key": 1}, tmp_path)


def test_every_python_block_compiles():
    shown = [block for page in PAGES for block in blocks(page, "python")]
    assert len(shown) >= 10
    for block in shown:
        # "f(a=1, ...)": the page leaves out the other arguments
        compile(block.text.replace(", ...)", ")"), block.where, "exec")


def test_every_site_policy_shown_admits_what_the_default_server_sends():
    """A policy copied from the pages must not refuse the [train] keys every fit of a
    default ``fedhive server`` carries (else each of the site's tasks fails)."""
    sent = set(DeployTrainConfig().model_dump())
    policies = [
        block
        for page in PAGES
        for block in blocks(page, "toml")
        if _kind(block, tomllib.loads(block.text)) == "policy"
    ]
    assert len(policies) >= 2
    for block in policies:
        allowed = SitePolicy.from_dict(tomllib.loads(block.text)).allowed_config_keys
        assert allowed is None or sent <= allowed, (block.where, sorted(sent - allowed))


def test_every_extra_named_exists():
    """``pip install 'fedhive[...]'`` on the pages, in error messages and in the projects
    ``fedhive new`` writes names extras that pyproject.toml defines."""
    from deploy_helpers import ROOT
    from fedhive.cli.new_cmd import FRAMEWORKS

    defined = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    sources = [*PAGES, *(ROOT / "src" / "fedhive").rglob("*.py")]
    named = {
        extra
        for path in sources
        for group in re.findall(r"fedhive\[([a-z0-9_,-]+)\]", path.read_text(encoding="utf-8"))
        for extra in group.split(",")
    }
    named |= {e for t in FRAMEWORKS.values() for e in t.extras.split(",")}
    assert len(named) >= 8
    assert named <= defined, sorted(named - defined)


def test_every_script_the_pages_run_exists():
    """``python path/to/script.py`` on the pages names a file of the repository (or of
    the project ``fedhive new`` writes, for its README)."""
    from deploy_helpers import ROOT

    shown = [
        (block, argv[0])
        for page in PAGES
        for block in blocks(page, "bash")
        for argv in commands(block, "python")
        if argv and argv[0].endswith(".py")
    ]
    assert len(shown) >= 10
    missing = [
        f"{block.where}: {script}" for block, script in shown if not (ROOT / script).is_file()
    ]
    assert not missing, "\n".join(missing)
