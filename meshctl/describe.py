"""`meshctl describe {pod|workload|service} NAME`: what applies to one target, in plain words.

Reads the same input as `meshctl analyze` (files, a local pilot's ``/debug/configz``, a cluster;
a file's object replaces the live one of the same kind, namespace and name) and prints the pure
`pilot.describe` result. With no source given, the local mesh's pilot at 127.0.0.1:15014 is read.

Exit codes: 0 described; 1 the target does not exist or a file cannot be read; 2 bad usage;
3 pilot or the cluster could not be read (as the other inspecting commands).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshctl.inspect_http import get_json, http_base
from meshctl.output import UnreachableError, render
from meshctl.proxy_target import DEFAULT_DEBUG
from pilot.analysis.inputs import AnalysisInput
from pilot.analysis.load import Collector, LoadError, add_paths, from_configz
from pilot.describe import POD, SERVICE, WORKLOAD, TargetNotFound, describe
from pilot.describe import render as words

EXAMPLES = """
\b
Examples:
  meshctl describe workload default/reviews-v1            # the local mesh (pilot at 127.0.0.1:15014)
  meshctl describe service reviews -n default --debug 127.0.0.1:15014
  meshctl describe pod reviews-v1-7d9f -n shop --k8s      # a pod of the cluster in ~/.kube/config
  meshctl describe service reviews -f rules/ -o yaml      # offline, from files
  meshctl describe workload shop/cart --k8s -f new-dr.yaml  # what if I applied new-dr.yaml?

\b
Exit codes: 0 described, 1 no such target (or a file unreadable), 2 bad usage,
3 pilot or the cluster unreachable.
"""

F = Callable[..., Any]


def _options(func: F) -> F:
    options: tuple[Callable[[F], F], ...] = (
        click.argument("name"),
        click.option("-n", "--namespace", default=None, help="Namespace of NAME [default; or NS/NAME]."),
        click.option("-f", "--filename", "files", multiple=True,
                     help="A YAML file or directory of mesh objects ('-' reads stdin). Repeatable."),
        click.option("--debug", "debug_addr", metavar="ADDR",
                     help=f"Read the objects a running pilot serves (its /debug/configz) [{DEFAULT_DEBUG} when no "
                          "other source is given]."),
        click.option("--k8s", "live", is_flag=True, help="Read the cluster's config, Services and Pods (kubeconfig)."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), envvar="KUBECONFIG",
                     help="Kubeconfig for --k8s [$KUBECONFIG, else ~/.kube/config]."),
        click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text",
                     show_default=True, help="text for people; json or yaml for scripts."),
    )
    for option in reversed(options):
        func = option(func)
    return func


@click.group("describe", epilog=EXAMPLES)
def describe_group() -> None:
    """Describe the services, routes, subsets, mTLS mode and policies that apply to a pod, workload or service."""


def _command(kind: str, help_text: str) -> click.Command:
    @_options
    def run(name: str, namespace: str | None, files: tuple[str, ...], debug_addr: str | None, live: bool,
            kubeconfig: Path | None, output: str) -> None:
        ns, _, short = name.rpartition("/")
        if ns and namespace and ns != namespace:
            raise click.UsageError(f"{name} names namespace {ns}, but -n says {namespace}")
        inp = _gather(files, live, kubeconfig, debug_addr)
        try:
            found = describe(inp, kind, ns or namespace or "default", short)
        except TargetNotFound as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(words(found) if output == "text" else render(found.to_dict(), output), nl=False)

    run.__doc__ = help_text
    return click.command(kind, epilog=EXAMPLES)(run)


describe_group.add_command(_command(POD, "Describe a Kubernetes pod: NAME or NS/NAME."))
describe_group.add_command(_command(
    WORKLOAD, "Describe a workload: a WorkloadEntry (the local mesh), a Deployment (or other pod template) or a "
              "Pod; NAME or NS/NAME."))
describe_group.add_command(_command(
    SERVICE, "Describe a service: a ServiceEntry or Kubernetes Service (NAME or NS/NAME), or a host name; its "
             "endpoints by subset and every rule for it."))


def _gather(files: tuple[str, ...], live: bool, kubeconfig: Path | None, debug_addr: str | None) -> AnalysisInput:
    collector = Collector()
    try:
        add_paths(collector, files, sys.stdin.read() if "-" in files else None)
    except LoadError as exc:
        raise click.ClickException(str(exc)) from None
    inp = collector.result()
    if live:
        inp = inp.merged(asyncio.run(_cluster(kubeconfig or Path.home() / ".kube" / "config")))
    if debug_addr is not None or (not files and not live):
        inp = inp.merged(asyncio.run(_configz(debug_addr or DEFAULT_DEBUG)).result())
    return inp


async def _configz(addr: str) -> Collector:
    body = await get_json(f"{http_base(addr)}/debug/configz")
    return from_configz(body if isinstance(body, dict) else {})


async def _cluster(kubeconfig: Path) -> AnalysisInput:
    import aiohttp

    from pilot.analysis.cluster import cluster_input
    from pilot.kube.client import KubeConfigError
    from pilot.kube.watch import WatchError

    try:
        return await cluster_input(kubeconfig)
    except (KubeConfigError, WatchError, OSError, aiohttp.ClientError) as exc:
        raise UnreachableError(f"cannot read the cluster ({kubeconfig}): {exc}") from None
