"""`meshctl proxy`: write the Envoy bootstrap for one workload, run its Envoy until stopped, or
wait until proxies started in the background serve traffic.

A workload is named `namespace/name`. Without `--address`, its address, labels and service
account come from pilot's debug API, so a sidecar always matches the WorkloadEntry pilot serves.

`run` gives the workload its identity: it starts the workload agent in-process (`citadel.agent`:
the key stays in this process's memory) with the token `meshctl up` wrote for the workload
(`<state-dir>/tokens/<ns>/<name>.token`), waits for the first certificate, and bootstraps Envoy
with the agent's SDS (`sds-grpc`: `default`, `ROOTCA`) and mutual TLS to pilot's authenticated
port (15012), pilot's certificate checked for `istiod.istio-system.svc`. A gateway's agent also
serves the Gateway `credentialName` certificates of its namespace from `<state-dir>/secrets/<ns>/`
(SDS `kubernetes://<name>`, re-read on change). `--plaintext` keeps the
old way (15010, no identity) for tests and tools. `run --kubernetes` is the injected sidecar of a
pod: identity from the pod's environment and mounts instead of pilot's debug API and the state
directory (`meshctl.proxy_kube`).

Concurrency: each command runs one `asyncio.run`; `run` owns one agent and one EnvoyProcess and
stops them on SIGINT/SIGTERM (which cancel the main task) or reports Envoy's death with its log
tail; `wait` polls each workload in its own task on one client session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click
from click.core import ParameterSource

from meshctl.envoy import LOG_LEVELS, EnvoyProcess, host_url
from meshctl.kube_pod import PodEnvError
from meshctl.kube_pod import delta_xds as env_delta_xds
from meshctl.output import emit, output_option
from meshctl.proxy_kube import kube_options, run_kubernetes
from meshctl.proxy_run import until_stopped
from pilot.bootstrap import ADMIN_PORT, BootstrapError, BootstrapSpec, parse_host_port, render, sidecar_bootstrap
from pilot.model.proxy import ProxyKind

DEFAULT_PILOT = "127.0.0.1:15010"  # plaintext xDS (unauthenticated)
DEFAULT_PILOT_TLS = "127.0.0.1:15012"  # authenticated xDS and the CA, mutual TLS
DEFAULT_DEBUG = "127.0.0.1:15014"

F = TypeVar("F", bound=Callable[..., Any])


def _spec_options(func: F) -> F:
    """Options shared by `bootstrap` and `run`: who the proxy is and where pilot is."""
    options = [
        click.option("--workload", metavar="NS/NAME",
                     help="Workload as namespace/name (required; with --kubernetes: the pod, from POD_NAMESPACE/"
                          "POD_NAME)."),
        click.option("--address", help="Workload loopback address; asked from pilot's debug API if omitted."),
        click.option("--label", "labels", multiple=True, metavar="K=V", help="Label; repeatable."),
        click.option("--service-account", help="Service account (default: pilot's, else 'default')."),
        click.option("--pilot", help=f"Pilot xDS host:port [{DEFAULT_PILOT_TLS} over mutual TLS; "
                     f"{DEFAULT_PILOT} with --plaintext or a bootstrap without --sds-socket]."),
        click.option("--debug", default=DEFAULT_DEBUG, show_default=True, help="Pilot debug API host:port."),
        click.option("--cluster-domain", default="cluster.local", show_default=True),
        click.option("--gateway", is_flag=True, help="Run as a gateway (node kind 'router')."),
        click.option("--delta-xds/--sotw-xds", "delta_xds", default=None,
                     help="The ADS variant Envoy speaks: incremental (delta, Istio's default since 1.22) or state "
                          "of the world [$ISTIO_DELTA_XDS, true/false as Go reads booleans; else delta]."),
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


@click.group(epilog="""
\b
Examples:
  meshctl proxy run --workload default/frontend &          # its agent and Envoy, mutual TLS to pilot
  meshctl proxy wait default/frontend default/reviews-v1   # until both serve traffic
  meshctl proxy bootstrap --workload default/frontend -o frontend-envoy.yaml
""")
def proxy() -> None:
    """Bootstrap and run Envoy sidecars and gateways for the local mesh."""


@proxy.command(epilog="""
\b
Examples:
  meshctl proxy bootstrap --workload default/frontend        # YAML on stdout; the rest asked from pilot
  meshctl proxy bootstrap --workload default/web --address 127.0.0.11 --format json -o web.json
  meshctl proxy bootstrap --workload default/web --sds-socket /tmp/web/sds.sock   # mutual TLS to 15012

\b
Exit codes: 0 written; 1 pilot unreachable or the workload unknown to it; 2 bad usage.
""")
@_spec_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--sds-socket", help="The workload agent's SDS socket (python -m citadel.agent): mutual TLS to "
              "pilot's authenticated port. Without it: plaintext xDS.")
def bootstrap(output: Path | None, fmt: str, sds_socket: str | None, **spec_args: Any) -> None:
    """Write the Envoy bootstrap for a workload."""
    _require_workload(spec_args)
    spec = asyncio.run(build_spec(**spec_args, sds_socket=sds_socket))
    text = render(sidecar_bootstrap(spec), "json" if fmt == "json" else "yaml")
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output} for {spec.node_id}", err=True)


@dataclass(frozen=True)
class AgentOptions:
    """Where `run` finds the workload's credential and the mesh roots (what `meshctl up` wrote)."""

    state_dir: Path
    trust_domain: str
    token_file: Path | None
    ca_address: str | None


@proxy.command(epilog="""
\b
Examples:
  meshctl proxy run --workload default/frontend        # after `meshctl up`: identity from its state dir
  meshctl proxy run --workload default/web --plaintext --log-level debug   # no identity, 15010
  meshctl proxy run --kubernetes                       # the injected sidecar of a pod

\b
Exit codes: 0 stopped by Ctrl-C or SIGTERM; 1 the agent got no certificate, Envoy did not start
or died (its log tail is printed); 2 bad usage.
""")
@_spec_options
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--ready-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True)
@click.option("--plaintext", is_flag=True,
              help="Plaintext xDS to pilot (15010; unauthenticated, for tests and tools): no agent, no certificate.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="MESHCTL_STATE_DIR",
              help="`meshctl up`'s state: root-cert.pem and tokens/ [$XDG_STATE_HOME/meshctl or "
                   "~/.local/state/meshctl].")
@click.option("--trust-domain", default="cluster.local", show_default=True, help="SPIFFE trust domain of the mesh.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The workload's credential [STATE_DIR/tokens/NS/NAME.token].")
@click.option("--ca-address", help="The CA's CSR service host:port [the --pilot address; Kubernetes: CA_ADDR].")
@kube_options
def run(log_level: str, ready_timeout: float, plaintext: bool, state_dir: Path | None, trust_domain: str,
        token_file: Path | None, ca_address: str | None, kubernetes: bool, ca_root_file: Path | None,
        sds_socket_dir: Path | None, pod_info_dir: Path | None, envoy_dir: Path | None, **spec_args: Any) -> None:
    """Run a workload's agent and Envoy until Ctrl-C or SIGTERM, then stop them cleanly.

    With --kubernetes: the injected sidecar of a pod (see `meshctl.proxy_kube`).
    """
    from meshctl.security import default_state_dir

    if kubernetes:
        ctx = click.get_current_context()
        run_kubernetes({**ctx.params}, lambda name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE)
        return
    kube_only = {"--ca-root-file": ca_root_file, "--sds-socket-dir": sds_socket_dir, "--pod-info-dir": pod_info_dir,
                 "--envoy-dir": envoy_dir}
    if any(value is not None for value in kube_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in kube_only.items() if v is not None)} apply only with "
                               "--kubernetes")
    _require_workload(spec_args)

    agent = None if plaintext else AgentOptions(state_dir or default_state_dir(), trust_domain, token_file, ca_address)
    asyncio.run(_serve(spec_args, log_level, ready_timeout, agent))


async def _serve(spec_args: dict[str, Any], log_level: str, ready_timeout: float,
                 agent: AgentOptions | None = None) -> None:
    # The agent's SDS socket: a private (0700) directory with a short path (a socket path has 107 bytes).
    with tempfile.TemporaryDirectory(prefix="meshctl-sds-") as sockets:
        sds = f"{sockets}/sds.sock" if agent is not None else None
        # Started together with `meshctl up` (an example's command block), pilot may not be up yet.
        spec = await build_spec(**spec_args, sds_socket=sds, wait_for_pilot=ready_timeout)
        with until_stopped(spec.node_id):
            async with contextlib.AsyncExitStack() as stack:
                if agent is not None:
                    await _start_agent(stack, spec, agent, ready_timeout)
                envoy = await stack.enter_async_context(
                    EnvoyProcess(spec, log_level=log_level, ready_timeout=ready_timeout))
                xds = "mutual TLS" if spec.pilot_tls else "plaintext"
                click.echo(f"{spec.node_id}: Envoy LIVE, admin {envoy.admin_url}, log {envoy.log_path}, "
                           f"xDS {xds} to {spec.pilot_host}:{spec.pilot_port}", err=True)
                status = await envoy.wait()
                tail = envoy.log_tail()
            raise click.ClickException(f"Envoy exited unexpectedly with status {status}; log tail:\n{tail}")


async def _start_agent(stack: contextlib.AsyncExitStack, spec: BootstrapSpec, options: AgentOptions,
                       ready_timeout: float) -> None:
    """Start the workload agent in this process and wait for its first certificate (ClickException if none)."""
    from prometheus_client import CollectorRegistry
    from pydantic import ValidationError

    from citadel.agent import AgentSettings, WorkloadAgent
    from meshctl.security import StateLayout

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = StateLayout(options.state_dir)
    token = options.token_file or layout.token_file(spec.namespace, spec.workload)
    ca = options.ca_address or f"{spec.pilot_host}:{spec.pilot_port}"
    try:
        settings = AgentSettings(namespace=spec.namespace, service_account=spec.service_account,
                                 trust_domain=options.trust_domain, ca_address=ca, ca_root_file=layout.trust_bundle,
                                 token_file=token, sds_socket=Path(str(spec.sds_socket)),
                                 credential_dir=layout.secrets if spec.kind == ProxyKind.ROUTER else None)
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    agent = await stack.enter_async_context(WorkloadAgent(settings, CollectorRegistry()))
    try:
        async with asyncio.timeout(ready_timeout or None):
            await agent.ready.wait()
    except TimeoutError:
        raise click.ClickException(
            f"{spec.node_id}: no certificate for {agent.identity} from the CA at {ca} after {ready_timeout:g}s "
            f"(token {token}, roots {layout.trust_bundle}); is `meshctl up` running with this --state-dir? "
            "The agent's log above says why") from None


@proxy.command(epilog="""
\b
Examples:
  meshctl proxy wait default/frontend default/reviews-v1 --timeout 30
  meshctl proxy wait default/web -o json | jq -r '.[].address'

\b
Exit codes: 0 every proxy ready; 1 one is not ready after --timeout (what it misses is printed),
NACKed its config or is unknown to pilot, or pilot is unreachable; 2 bad usage.
""")
@click.argument("workloads", nargs=-1, required=True, metavar="NS/NAME...")
@click.option("--debug", default=DEFAULT_DEBUG, show_default=True, help="Pilot debug API host:port.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for all of them together.")
@output_option(default="text", formats=("text", "json", "yaml"))
def wait(workloads: tuple[str, ...], debug: str, timeout: float, output: str = "text") -> None:
    """Wait until each workload's proxy serves traffic, for scripts that start proxies in the background.

    Ready means: Envoy's admin `/ready` says LIVE, pilot reports the proxy SYNCED on every xDS
    type it asked for, and each app behind its inbound listeners accepts TCP connections. Exits 1
    naming what is missing once `--timeout` passes, or at once on a NACK or an unknown workload.
    """
    names = [_split_workload(w) for w in workloads]
    ready = asyncio.run(_wait_all(names, debug, timeout))
    if output != "text":  # a list of {workload, address, apps}: every one is ready, or we exited 1
        emit([{"workload": f"{ns}/{name}", "address": address, "apps": apps} for ns, name, address, apps in ready],
             output)
        return
    for ns, name, address, apps in ready:
        behind = f", app at {', '.join(apps)} accepts connections" if apps else ""
        click.echo(f"{ns}/{name} ready: Envoy LIVE on {address}, SYNCED with pilot{behind}")


async def _wait_all(
    workloads: list[tuple[str, str]], debug: str, timeout: float
) -> list[tuple[str, str, str, list[str]]]:
    """Every workload's (namespace, name, address, apps) once all are ready; ClickException if one is not."""
    deadline = time.monotonic() + timeout
    timeouts = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeouts, trust_env=False) as session:
        return list(await asyncio.gather(*(_wait_one(session, debug, ns, name, deadline, timeout)
                                           for ns, name in workloads)))


async def _wait_one(
    session: aiohttp.ClientSession, debug: str, ns: str, name: str, deadline: float, timeout: float
) -> tuple[str, str, str, list[str]]:
    """Poll until `ns/name` is ready (see `wait`); ClickException with the last reason if not in time.

    Costs a few small HTTP requests per workload every 100 ms while waiting.
    """
    known = await fetch_workload(debug, ns, name, wait=max(0.0, deadline - time.monotonic()))
    address = str(known["address"])
    while True:
        missing, apps = await readiness(session, debug, ns, name, address)
        if missing is None:
            return ns, name, address, apps
        if time.monotonic() >= deadline:
            raise click.ClickException(f"{ns}/{name} not ready after {timeout:g}s: {missing}")
        await asyncio.sleep(0.1)


async def readiness(
    session: aiohttp.ClientSession, debug: str, ns: str, name: str, address: str
) -> tuple[str | None, list[str]]:
    """What the proxy of `ns/name` at `address` still misses to serve traffic (None: nothing), and
    the `host:port` of the apps behind its inbound listeners.

    Raises ClickException when waiting cannot help: the proxy NACKed its config.
    """
    admin = host_url(address, ADMIN_PORT)
    try:
        async with session.get(f"{admin}/ready") as resp:
            state = (await resp.text()).strip()
    except (aiohttp.ClientError, TimeoutError):
        return f"no Envoy answers at {admin}; is `meshctl proxy run --workload {ns}/{name}` running?", []
    if state != "LIVE":
        return f"Envoy at {admin} is {state or 'not ready'}, not LIVE yet", []
    try:
        async with session.get(f"http://{debug}/debug/syncz") as resp:
            rows = await resp.json(content_type=None) if resp.status == 200 else []
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return f"pilot's debug API at {debug} does not answer", []
    behind = unsynced(rows, ns, name)
    if behind:
        return behind, []
    try:
        async with session.get(f"{admin}/clusters", params={"format": "json"}) as resp:
            clusters = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"Envoy at {admin} did not list its clusters ({exc!r})", []
    apps = []
    for cluster, host, port in _inbound_endpoints(clusters):
        if not await _accepts(host, port):
            return f"nothing accepts connections at {host}:{port} (its app, behind {cluster}); is the app running?", []
        apps.append(f"{host}:{port}")
    return None, apps


def unsynced(rows: Any, ns: str, name: str) -> str | None:
    """Why pilot's `/debug/syncz` rows do not show `ns/name` in sync, or None if they do."""
    mine = [r for r in rows if isinstance(r, dict) and r.get("namespace") == ns and r.get("workload") == name]
    if not mine:
        return "its proxy is not connected to pilot yet"
    for row in mine:
        types: dict[str, Any] = row.get("types") or {}
        for type_name, status in types.items():
            if status.get("state") == "NACKED":
                raise click.ClickException(
                    f"{ns}/{name}: the proxy rejected its {type_name} config: {status.get('nack')}"
                )
        pending = [f"{t} {s.get('state')}" for t, s in types.items() if s.get("state") != "SYNCED"]
        pending += [f"{t} not asked for" for t in ("CDS", "LDS") if t not in types]
        if pending:
            return f"not in sync with pilot yet ({', '.join(pending)})"
    return None


def _inbound_endpoints(clusters: Any) -> list[tuple[str, str, int]]:
    """`(cluster, host, port)` of every endpoint of the inbound clusters in Envoy's `/clusters` JSON."""
    found = []
    for cluster in clusters.get("cluster_statuses", []) if isinstance(clusters, dict) else []:
        name = str(cluster.get("name", ""))
        if not name.startswith("inbound|"):
            continue
        for host in cluster.get("host_statuses", []):
            socket_address = host.get("address", {}).get("socket_address", {})
            if "address" in socket_address and "port_value" in socket_address:
                found.append((name, str(socket_address["address"]), int(socket_address["port_value"])))
    return found


async def _accepts(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(1):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def build_spec(
    *,
    workload: str,
    address: str | None,
    labels: tuple[str, ...],
    service_account: str | None,
    pilot: str | None,
    debug: str,
    cluster_domain: str,
    gateway: bool,
    initial_fetch_timeout: float,
    sds_socket: str | None = None,
    wait_for_pilot: float = 0.0,
    delta_xds: bool | None = None,
) -> BootstrapSpec:
    """The spec from the options, asking pilot for whatever `--address` did not say.

    With `sds_socket` (a workload agent's), xDS goes over mutual TLS to pilot's authenticated port.
    `wait_for_pilot` seconds: keep trying while pilot's debug API does not answer yet.
    """
    namespace, name = _split_workload(workload)
    extra = _parse_labels(labels)
    known: dict[str, Any] = {}
    if address is None:
        known = await fetch_workload(debug, namespace, name, wait=wait_for_pilot)
    try:
        pilot_host, pilot_port = parse_host_port(pilot or (DEFAULT_PILOT_TLS if sds_socket else DEFAULT_PILOT))
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
            sds_socket=sds_socket,
            pilot_tls=sds_socket is not None,
            delta_xds=env_delta_xds(os.environ, {}) if delta_xds is None else delta_xds,
        )
    except (BootstrapError, PodEnvError) as exc:
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


def _require_workload(spec_args: dict[str, Any]) -> None:
    if not spec_args.get("workload"):
        raise click.UsageError("Missing option '--workload'.")


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
