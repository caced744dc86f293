"""`meshctl version`: this client's version and, unless `--remote=false`, the control plane's.

The control plane answers at pilot's `/debug/version` (one HTTP call). A pilot that cannot be
reached still gets the client's version printed, then exit code 3 (see `meshctl.output`).
"""

from __future__ import annotations

import asyncio
import platform
import sys
from typing import Any

import click

from meshctl import __version__
from meshctl.inspect_http import get_json, http_base
from meshctl.output import UNREACHABLE, UnreachableError, emit
from meshctl.proxy_target import debug_option

EXAMPLES = """
\b
Examples:
  meshctl version                         # client and control plane (pilot on 127.0.0.1:15014)
  meshctl version --short --remote=false  # just the client's version number
  meshctl version -o json --debug 10.0.0.5:15014
"""


def client_info() -> dict[str, str]:
    return {"version": __version__, "python": platform.python_version(), "platform": sys.platform}


@click.command("version", epilog=EXAMPLES)
@debug_option
@click.option("--remote", type=click.BOOL, default=True, is_flag=False, flag_value=True, show_default=True,
              help="Also ask the control plane (pilot's /debug/version); --remote=false: the client only.")
@click.option("--short", is_flag=True, help="Only the version numbers.")
@click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True,
              help="text for people; json or yaml for scripts.")
def version(debug_addr: str, remote: bool, short: bool, output: str) -> None:
    """Print meshctl's version and the control plane's (pilot's)."""
    info: dict[str, Any] = {"client": client_info()}
    error = None
    if remote:
        try:
            info["control_plane"] = asyncio.run(get_json(f"{http_base(debug_addr)}/debug/version"))
        except UnreachableError as exc:
            info["control_plane"], error = None, exc
    if output != "text":
        emit(info, output)
    else:
        click.echo(_text(info, short))
    if error is not None:
        click.echo(f"Error: control plane: {error.message}", err=True)
        raise SystemExit(UNREACHABLE)


def _text(info: dict[str, Any], short: bool) -> str:
    client = info["client"]
    lines = [client["version"] if short else
             f'client version: {client["version"]} (Python {client["python"]}, {client["platform"]})']
    plane = info.get("control_plane")
    if plane:
        lines.append(str(plane.get("version")) if short else f'control plane version: {plane.get("version")}')
    return "\n".join(lines)
