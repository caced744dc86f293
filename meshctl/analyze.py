"""`meshctl analyze`: find mistakes in mesh config before (or after) it reaches the proxies.

Offline, the given files are analyzed as pilot would read them; live, the cluster's mesh objects,
Services, Pods, Namespaces and Secrets (``--k8s``), or a local pilot's objects from its
``/debug/configz`` (``--debug``), are analyzed together with the files (a file's object replaces the
live one of the same kind, namespace and name: "what if I applied this?"). All checks are the pure
functions of `pilot.analysis`; this module only reads input and prints.

Exit codes: 0 no message at or above ``--failure-threshold``; 79 some (istioctl's code for
"analyze found issues"); 1 a file could not be read; 2 bad usage (unknown flag or value); 3 pilot or
the cluster could not be read (meshctl's "unreachable", as for the other inspecting commands).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import click
import yaml

from pilot.analysis import Level, Message, Suppression, fails
from pilot.analysis import analyze as run_checks
from pilot.analysis.inputs import AnalysisInput
from pilot.analysis.load import Collector, LoadError, add_paths, from_configz

EXIT_FOUND_ISSUES = 79
EXIT_UNREACHABLE = 3  # meshctl's code for "pilot or the cluster did not answer" (README "Exit codes")
LEVELS = ("Error", "Warning", "Info")
_COLOURS = {Level.ERROR: "red", Level.WARNING: "yellow", Level.INFO: "cyan"}

EXAMPLES = """
\b
Examples:
  meshctl analyze -f rules/                     # a directory of YAML, offline
  meshctl analyze -f vs.yaml -f dr.yaml -o json # machine-readable
  meshctl analyze --k8s -A                      # every namespace of the cluster in ~/.kube/config
  meshctl analyze --k8s -n shop -f new-vs.yaml  # would this change break namespace shop?
  meshctl analyze --debug 127.0.0.1:15014 --state-dir ~/.local/state/meshctl   # the local mesh
  meshctl analyze -f . --suppress "IST0118=Service *.legacy" --failure-threshold Warning

\b
Exit codes: 0 nothing at or above --failure-threshold, 79 issues found (as istioctl),
1 a file unreadable, 2 bad usage, 3 pilot or the cluster unreachable.
"""


class Unreachable(click.ClickException):
    """Pilot's debug API or the cluster's API server did not answer (or refused): exit code 3, as
    `meshctl.output.UnreachableError` for the other inspecting commands."""

    exit_code = EXIT_UNREACHABLE


@click.command("analyze", epilog=EXAMPLES)
@click.option("-f", "--filename", "files", multiple=True,
              help="A YAML file or directory (every *.yaml/*.yml under it); '-' reads stdin. Repeatable.")
@click.option("--k8s", "live", is_flag=True, help="Also analyze the cluster's config (kubeconfig).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), envvar="KUBECONFIG",
              help="Kubeconfig for --k8s [$KUBECONFIG, else ~/.kube/config].")
@click.option("--debug", "debug_addr", metavar="ADDR",
              help="Also analyze the objects a running pilot serves (its /debug/configz, e.g. 127.0.0.1:15014).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Local mesh state directory: its secrets/ store is checked for Gateway credentialNames.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Report on every namespace (the default offline).")
@click.option("-n", "--namespace", help="Report only on this namespace (with --k8s the default is 'default').")
@click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True)
@click.option("--failure-threshold", type=click.Choice(LEVELS, case_sensitive=False), default="Error",
              show_default=True, help="Exit 79 when a message is at least this severe.")
@click.option("--output-threshold", type=click.Choice(LEVELS, case_sensitive=False), default="Info",
              show_default=True, help="Print only messages at least this severe.")
@click.option("--suppress", "suppressions", multiple=True, metavar="CODE=RESOURCE",
              help="Drop messages: 'IST0118=Service reviews.default', 'IST0101=VirtualService shop/*'. Repeatable.")
def analyze(files: tuple[str, ...], live: bool, kubeconfig: Path | None, debug_addr: str | None,
            state_dir: Path | None, all_namespaces: bool, namespace: str | None, output: str,
            failure_threshold: str, output_threshold: str, suppressions: tuple[str, ...]) -> None:
    """Analyze mesh config and report problems, each with a stable code, the resource, the field and a fix."""
    if not files and not live and debug_addr is None:
        raise click.UsageError("nothing to analyze: give -f FILE|DIR, --k8s or --debug ADDR")
    try:
        rules = [Suppression.parse(s) for s in suppressions]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--suppress") from None
    inp = _gather(files, live, kubeconfig, debug_addr, state_dir)
    scope = None if all_namespaces else (namespace or ("default" if live else None))
    messages = [m for m in run_checks(inp, rules)
                if (scope is None or m.namespace in (scope, "")) and m.level >= Level.parse(output_threshold)]
    _print(messages, output, scope)
    if fails(messages, Level.parse(failure_threshold)):
        sys.exit(EXIT_FOUND_ISSUES)


def _gather(files: Sequence[str], live: bool, kubeconfig: Path | None, debug_addr: str | None,
            state_dir: Path | None) -> AnalysisInput:
    collector = Collector()
    try:
        add_paths(collector, files, sys.stdin.read() if "-" in files else None)
    except LoadError as exc:
        raise click.ClickException(str(exc)) from None
    if state_dir is not None:
        from pilot.credentials import scan

        collector.secrets = set(scan(state_dir / "secrets")) | (collector.secrets or set())
    inp = collector.result()
    if live:
        inp = inp.merged(asyncio.run(_cluster(kubeconfig or Path.home() / ".kube" / "config")))
    if debug_addr is not None:
        inp = inp.merged(asyncio.run(_configz(debug_addr)).result())
    return inp


async def _configz(addr: str) -> Collector:
    url = f"http://{addr}/debug/configz"
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            resp.raise_for_status()
            body = await resp.json()
    except (aiohttp.ClientError, json.JSONDecodeError) as exc:
        raise Unreachable(f"cannot read pilot's config at {url}: {exc}") from None
    return from_configz(body if isinstance(body, dict) else {})


async def _cluster(kubeconfig: Path) -> AnalysisInput:
    from pilot.analysis.cluster import cluster_input
    from pilot.kube.client import KubeConfigError
    from pilot.kube.watch import WatchError

    try:
        return await cluster_input(kubeconfig)
    except (KubeConfigError, WatchError, OSError, aiohttp.ClientError) as exc:
        raise Unreachable(f"cannot read the cluster ({kubeconfig}): {exc}") from None


def _print(messages: list[Message], output: str, scope: str | None) -> None:
    if output == "json":
        click.echo(json.dumps([m.to_dict() for m in messages], indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump([m.to_dict() for m in messages], sort_keys=False), nl=False)
    elif not messages:
        where = f" in namespace {scope}" if scope else ""
        click.echo(f"No validation issues found{where}.")
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org, as meshctl.output
        for m in messages:
            line = m.line()
            if colour:
                line = click.style(m.level.label, fg=_COLOURS[m.level]) + line[len(m.level.label):]
            click.echo(line)
