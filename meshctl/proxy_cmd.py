"""`meshctl proxy`: write the Envoy bootstrap for one workload, or run its Envoy until stopped.

A workload is named `namespace/name`. Without `--address`, its address, labels and service
account come from pilot's debug API, so a sidecar always matches the WorkloadEntry pilot serves.
Concurrency: each command runs one `asyncio.run`; `run` owns one EnvoyProcess and stops it on
SIGINT/SIGTERM (which cancel the main task) or reports Envoy's death with its log tail.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click

from meshctl.envoy import LOG_LEVELS, EnvoyError, EnvoyProcess
from pilot.bootstrap import BootstrapError, BootstrapSpec, parse_host_port, render, sidecar_bootstrap
from pilot.model.proxy import ProxyKind

DEFAULT_PILOT = "127.0.0.1:15010"
DEFAULT_DEBUG = "127.0.0.1:15014"

F = TypeVar("F", bound=Callable[..., Any])


def _spec_options(func: F) -> F:
    """Options shared by `bootstrap` and `run`: who the proxy is and where pilot is."""
    options = [
        click.option("--workload", required=True, metavar="NS/NAME", help="Workload as namespace/name."),
        click.option("--address", help="Workload loopback address; asked from pilot's debug API if omitted."),
        click.option("--label", "labels", multiple=True, metavar="K=V", help="Label; repeatable."),
        click.option("--service-account", help="Service account (default: pilot's, else 'default')."),
        click.option("--pilot", default=DEFAULT_PILOT, show_default=True, help="Pilot xDS host:port."),
        click.option("--debug", default=DEFAULT_DEBUG, show_default=True, help="Pilot debug API host:port."),
        click.option("--cluster-domain", default="cluster.local", show_default=True),
        click.option("--gateway", is_flag=True, help="Run as a gateway (node kind 'router')."),
        click.option(
            "--initial-fetch-timeout",
            type=click.FloatRange(min=0),
            default=15.0,
            show_default=True,
            help="Seconds Envoy waits for its first clusters/listeners before going LIVE; 0 waits forever.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group()
def proxy() -> None:
    """Bootstrap and run Envoy sidecars and gateways for the local mesh."""


@proxy.command()
@_spec_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def bootstrap(output: Path | None, fmt: str, **spec_args: Any) -> None:
    """Write the Envoy bootstrap for a workload."""
    spec = asyncio.run(build_spec(**spec_args))
    text = render(sidecar_bootstrap(spec), "json" if fmt == "json" else "yaml")
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output} for {spec.node_id}", err=True)


@proxy.command()
@_spec_options
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--ready-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True)
def run(log_level: str, ready_timeout: float, **spec_args: Any) -> None:
    """Run Envoy for a workload until Ctrl-C or SIGTERM, then stop it cleanly."""
    asyncio.run(_serve(spec_args, log_level, ready_timeout))


async def _serve(spec_args: dict[str, Any], log_level: str, ready_timeout: float) -> None:
    # Started together with `meshctl up` (an example's command block), pilot may not be up yet.
    spec = await build_spec(**spec_args, wait_for_pilot=ready_timeout)
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("_serve must run as a task")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        async with EnvoyProcess(spec, log_level=log_level, ready_timeout=ready_timeout) as envoy:
            click.echo(f"{spec.node_id}: Envoy LIVE, admin {envoy.admin_url}, log {envoy.log_path}", err=True)
            status = await envoy.wait()
            tail = envoy.log_tail()
        raise click.ClickException(f"Envoy exited unexpectedly with status {status}; log tail:\n{tail}")
    except asyncio.CancelledError:
        click.echo(f"{spec.node_id}: stopped", err=True)
    except EnvoyError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def build_spec(
    *,
    workload: str,
    address: str | None,
    labels: tuple[str, ...],
    service_account: str | None,
    pilot: str,
    debug: str,
    cluster_domain: str,
    gateway: bool,
    initial_fetch_timeout: float,
    wait_for_pilot: float = 0.0,
) -> BootstrapSpec:
    """The spec from the options, asking pilot for whatever `--address` did not say.

    `wait_for_pilot` seconds: keep trying while pilot's debug API does not answer yet.
    """
    namespace, name = _split_workload(workload)
    extra = _parse_labels(labels)
    known: dict[str, Any] = {}
    if address is None:
        known = await fetch_workload(debug, namespace, name, wait=wait_for_pilot)
    try:
        pilot_host, pilot_port = parse_host_port(pilot)
        return BootstrapSpec(
            namespace=namespace,
            workload=name,
            address=address or str(known["address"]),
            labels={**known.get("labels", {}), **extra},
            service_account=service_account or known.get("service_account") or "default",
            kind=ProxyKind.ROUTER if gateway else ProxyKind.SIDECAR,
            pilot_host=pilot_host,
            pilot_port=pilot_port,
            cluster_domain=cluster_domain,
            initial_fetch_timeout_s=initial_fetch_timeout,
        )
    except BootstrapError as exc:
        raise click.UsageError(str(exc)) from exc


async def fetch_workload(debug: str, namespace: str, name: str, wait: float = 0.0) -> dict[str, Any]:
    """Pilot's view of a WorkloadEntry from `GET /debug/workload/<ns>/<name>`; ClickException if none.

    While pilot cannot be reached it is retried for up to `wait` seconds. Pilot serves its debug
    API only once its first mesh is built, so an answer (even a 404) is final.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return await _fetch_workload_once(debug, namespace, name)
        except _Unreachable as exc:
            if time.monotonic() >= deadline:
                raise click.ClickException(str(exc)) from exc
            await asyncio.sleep(0.2)


class _Unreachable(Exception):
    """Pilot's debug API did not answer at all."""


async def _fetch_workload_once(debug: str, namespace: str, name: str) -> dict[str, Any]:
    url = f"http://{debug}/debug/workload/{namespace}/{name}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url) as resp,
        ):
            if resp.status == 404:
                raise click.ClickException(
                    f"pilot at {debug} knows no workload {namespace}/{name}: declare a WorkloadEntry "
                    "for it, or pass --address"
                )
            if resp.status != 200:
                raise click.ClickException(f"pilot at {debug}: GET {url} answered {resp.status}")
            data = await resp.json(content_type=None)
    except ValueError as exc:
        raise click.ClickException(f"pilot at {debug}: GET {url} answered invalid JSON ({exc})") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Unreachable(
            f"cannot reach pilot's debug API at {debug} ({exc}); is pilot running? or pass --address"
        ) from exc
    if not isinstance(data, dict) or not data.get("address"):
        raise click.ClickException(f"pilot at {debug} has no address for workload {namespace}/{name}")
    return data


def _split_workload(text: str) -> tuple[str, str]:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise click.BadParameter(f"{text!r} is not namespace/name", param_hint="--workload")
    return namespace, name


def _parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        labels[key] = value
    return labels
