"""How meshctl commands print: tables for people, `-o json|yaml` for scripts, exit codes for both.

Colour and terminal width follow where stdout goes: a terminal gets colours and its own width;
a pipe or file gets plain text (no ANSI codes) at a fixed wide width so scripts can grep whole
lines. `NO_COLOR` (https://no-color.org) turns colours off on a terminal too; rich reads it when
a console is made, so nothing here reads the environment at import time.

Exit codes are shared by every inspecting command (documented in the README, "Exit codes"):

    0  OK            the command did what was asked and found nothing wrong
    1  PROBLEM       it ran, and found a difference or an unhealthy state (proxy-status <proxy>)
    2  USAGE         bad arguments or options (click's own code)
    3  UNREACHABLE   pilot's debug API or an Envoy admin could not be reached or answered an error
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click
import yaml
from rich.console import Console

OK = 0
PROBLEM = 1
USAGE = 2
UNREACHABLE = 3

PIPE_WIDTH = 250  # piped tables are not cut to 80 columns: scripts grep whole rows
FORMATS = ("table", "json", "yaml")

F = TypeVar("F", bound=Callable[..., Any])


class UnreachableError(click.ClickException):
    """Pilot or an Envoy admin did not answer (exit code 3); the message names the URL and why."""

    exit_code = UNREACHABLE


def console(file: IO[str] | None = None) -> Console:
    """A rich console on stdout (or `file`): colours only on a terminal (and not with NO_COLOR).

    `force_terminal=None` lets rich decide from `isatty()`; off a terminal it emits no escape
    codes and uses PIPE_WIDTH columns instead of guessing 80.
    """
    probe = Console(file=file, force_terminal=None)
    if probe.is_terminal:
        return probe
    return Console(file=file, force_terminal=None, width=PIPE_WIDTH)


def output_option(default: str = "table", formats: tuple[str, ...] = FORMATS) -> Callable[[F], F]:
    """`-o/--output` with the formats a command supports."""
    return click.option("-o", "--output", "output", type=click.Choice(formats), default=default,
                        show_default=True, help="table for people; json or yaml: the raw data, for scripts.")


def render(data: Any, fmt: str) -> str:
    """`data` as JSON (2-space indent) or YAML (keys in their given order), newline-terminated."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    raise ValueError(f"output format {fmt!r} is not json or yaml")


def emit(data: Any, fmt: str) -> None:
    """Print `data` in a machine format on stdout."""
    click.echo(render(data, fmt), nl=False)
