"""`meshctl proxy run --kubernetes`: what the injected `istio-proxy` container runs.

It reads who it is from the pod (`meshctl.kube_pod`: downward-API environment, labels file,
PROXY_CONFIG, ISTIO_META_*; flags override), then runs three things in this one process:

- the workload agent (`citadel.agent`): a key in memory, CSRs to CA_ADDR authenticated by the
  pod's projected service-account token (`/var/run/secrets/tokens/istio-token`, audience
  `istio-ca`; re-read for every request, as the kubelet rotates it), the CA checked against the
  mesh root (`/var/run/secrets/istio/root-cert.pem`, ConfigMap `istio-ca-root-cert`), SDS served
  on `/var/run/secrets/workload-spiffe-uds/socket` (the shared `workload-socket` volume);
- the status port 15020 (`meshctl.app_probes`): `/healthz/ready` and the rewritten app probes
  `/app-health/<container>/<livez|readyz|startupz>` from ISTIO_KUBE_APP_PROBERS;
- Envoy, once the first certificate is there, with `kube_pod.pod_bootstrap`: ADS over mutual TLS
  to the discovery address, readiness on 15021 `/healthz/ready` (LIVE), stats on 15090, admin
  on 127.0.0.1:15000 only. Envoy's bootstrap and log go to `/etc/istio/proxy` (the `istio-envoy`
  volume) when it exists, as the container's root filesystem is read-only.

The container's securityContext runs all of it as UID 1337, which the redirect rules exempt.

Concurrency: one `asyncio.run`; SIGINT/SIGTERM cancel the main task, which stops Envoy, the
status server and the agent in that order; Envoy exiting on its own ends the command with its
log tail (the kubelet restarts the container).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import click

from meshctl.app_probes import PROBERS_ENV, AppProbe, ProbeConfigError, StatusServer, parse_app_probers
from meshctl.envoy import EnvoyError, EnvoyProcess
from meshctl.kube_pod import PodEnvError, PodProxy, base_spec, pod_bootstrap, pod_from_env
from meshctl.proxy_run import until_stopped
from pilot.bootstrap import render

DEFAULT_TOKEN = Path("/var/run/secrets/tokens/istio-token")
DEFAULT_ROOT_CERT = Path("/var/run/secrets/istio/root-cert.pem")
DEFAULT_SOCKET_DIR = Path("/var/run/secrets/workload-spiffe-uds")
SOCKET_NAME = "socket"  # Istio's name in the workload-socket volume
DEFAULT_POD_INFO = Path("/etc/istio/pod")
DEFAULT_ENVOY_DIR = Path("/etc/istio/proxy")

F = TypeVar("F", bound=Callable[..., Any])


def kube_options(func: F) -> F:
    """`run`'s options for Kubernetes mode (paths default to the injected container's mounts)."""
    path = click.Path(path_type=Path)
    options = [
        click.option("--kubernetes", is_flag=True,
                     help="Run as the injected istio-proxy container: identity from the pod's environment "
                          "(POD_NAME, POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT, CA_ADDR, PROXY_CONFIG, "
                          "ISTIO_META_*), projected token, labels file; status port 15020. Flags override."),
        click.option("--ca-root-file", type=path, help=f"Kubernetes: the mesh root(s), PEM [{DEFAULT_ROOT_CERT}]."),
        click.option("--sds-socket-dir", type=path,
                     help=f"Kubernetes: the agent's SDS socket directory, shared with Envoy [{DEFAULT_SOCKET_DIR}]."),
        click.option("--pod-info-dir", type=path,
                     help=f"Kubernetes: the downward-API directory holding `labels` [{DEFAULT_POD_INFO}]."),
        click.option("--envoy-dir", type=path,
                     help=f"Kubernetes: where Envoy's bootstrap and log go [{DEFAULT_ENVOY_DIR} if it exists, "
                          "else the temp dir]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True)
class PodFiles:
    """Where the sidecar finds its credential and roots, serves SDS, reads labels and keeps Envoy's files."""

    token_file: Path = DEFAULT_TOKEN
    ca_root_file: Path = DEFAULT_ROOT_CERT
    socket_dir: Path = DEFAULT_SOCKET_DIR
    pod_info_dir: Path = DEFAULT_POD_INFO
    envoy_dir: Path | None = None

    @property
    def sds_socket(self) -> Path:
        return self.socket_dir / SOCKET_NAME


def load_pod(environ: Mapping[str, str], files: PodFiles, overrides: Mapping[str, str | None],
             extra_labels: Mapping[str, str]) -> tuple[PodProxy, dict[str, AppProbe]]:
    """The pod's sidecar and its app probes from the environment and the labels file (UsageError if unusable)."""
    labels_file = files.pod_info_dir / "labels"
    try:
        labels_text = labels_file.read_text() if labels_file.is_file() else None
        pod = pod_from_env(environ, labels_text, overrides)
        probers = parse_app_probers(environ.get(PROBERS_ENV, ""))
    except (PodEnvError, ProbeConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.UsageError(f"labels file {labels_file}: cannot read ({exc.strerror})") from None
    if extra_labels:
        pod = dataclasses.replace(pod, labels={**pod.labels, **extra_labels})
    return pod, probers


class PodEnvoy(EnvoyProcess):
    """An EnvoyProcess whose bootstrap is the pod's (`kube_pod.pod_bootstrap`), not a local-mesh one."""

    def __init__(self, pod: PodProxy, sds_socket: str, initial_fetch_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(base_spec(pod, sds_socket, initial_fetch_timeout_s), **kwargs)
        self.pod = pod
        self._bootstrap = render(pod_bootstrap(pod, sds_socket, initial_fetch_timeout_s), "yaml")

    async def _spawn(self, envoy: str, config: Path, log: IO[bytes]) -> asyncio.subprocess.Process:
        # Replaces the local-mesh bootstrap `start` wrote a moment ago.
        await asyncio.to_thread(config.write_text, self._bootstrap)
        return await super()._spawn(envoy, config, log)


async def run_pod_proxy(pod: PodProxy, probers: Mapping[str, AppProbe], files: PodFiles, *, log_level: str,
                        ready_timeout: float, initial_fetch_timeout_s: float, cert_timeout: float = 0.0) -> None:
    """Run the agent, the status port and Envoy until cancelled (see the module docstring).

    `cert_timeout` seconds for the first certificate (0: wait for as long as it takes, as a pod's
    sidecar must while the control plane starts; its startup probe bounds it); `ready_timeout`
    for Envoy to go LIVE."""
    from prometheus_client import CollectorRegistry
    from pydantic import ValidationError

    from citadel.agent import AgentSettings, WorkloadAgent

    try:
        settings = AgentSettings(namespace=pod.namespace, service_account=pod.service_account,
                                 trust_domain=pod.trust_domain, ca_address=pod.ca_address,
                                 ca_root_file=files.ca_root_file, token_file=files.token_file,
                                 sds_socket=files.sds_socket)
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    envoy: PodEnvoy | None = None

    async def readiness() -> str | None:
        if not agent.ready.is_set():
            return f"no certificate for {agent.identity} yet"
        if envoy is None or not envoy.running:
            return "Envoy is not running"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, EnvoyError):
            state = await envoy.server_state()
            return None if state == "LIVE" else f"Envoy is {state}"
        return "Envoy's admin does not answer"

    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(WorkloadAgent(settings, CollectorRegistry()))
        status = StatusServer(probers, pod.pod_ip, readiness)
        try:
            await status.start("::" if ":" in pod.pod_ip else "0.0.0.0", pod.status_port)
        except OSError as exc:
            raise click.ClickException(
                f"{pod.node_id}: cannot listen on status port {pod.status_port}: {exc}") from None
        stack.push_async_callback(status.stop)
        try:
            async with asyncio.timeout(cert_timeout or None):
                await agent.ready.wait()
        except TimeoutError:
            raise click.ClickException(
                f"{pod.node_id}: no certificate for {agent.identity} from the CA at {pod.ca_address} after "
                f"{cert_timeout:g}s (token {files.token_file}, roots {files.ca_root_file}); the agent's log above "
                "says why") from None
        # Named before it starts: the status port asks Envoy itself from the moment the process runs,
        # not only once `start` has seen it LIVE (15021 would answer ready while 15020 said "not running").
        envoy = PodEnvoy(pod, str(files.sds_socket), initial_fetch_timeout_s, log_level=log_level,
                         ready_timeout=ready_timeout)
        await stack.enter_async_context(envoy)
        click.echo(f"{pod.node_id}: Envoy LIVE, identity {agent.identity}, xDS mutual TLS to {pod.discovery_address}, "
                   f"status port {status.port}, log {envoy.log_path}", err=True)
        code = await envoy.wait()
        tail = envoy.log_tail()
    raise click.ClickException(f"Envoy exited unexpectedly with status {code}; log tail:\n{tail}")


def run_kubernetes(params: Mapping[str, Any], explicit: Callable[[str], bool]) -> None:
    """`run --kubernetes`: `params` are `run`'s parameters; `explicit(name)` says whether a flag was given."""
    if params.get("gateway") or params.get("plaintext"):
        raise click.UsageError("--kubernetes runs a sidecar over mutual TLS: --gateway and --plaintext do not apply")
    workload = params.get("workload")
    namespace, _, pod_name = str(workload or "").partition("/")
    if workload and (not namespace or not pod_name or "/" in pod_name):
        raise click.BadParameter(f"{workload!r} is not namespace/pod", param_hint="--workload")
    overrides = {
        "pod_name": pod_name or None, "namespace": namespace or None, "pod_ip": params.get("address"),
        "service_account": params.get("service_account"), "discovery_address": params.get("pilot"),
        "ca_address": params.get("ca_address"),
        "trust_domain": params.get("trust_domain") if explicit("trust_domain") else None,
        "cluster_domain": params.get("cluster_domain") if explicit("cluster_domain") else None,
        "delta_xds": None if params.get("delta_xds") is None else str(bool(params["delta_xds"])).lower(),
    }
    envoy_dir: Path | None = params.get("envoy_dir")
    if envoy_dir is None and DEFAULT_ENVOY_DIR.is_dir():
        envoy_dir = DEFAULT_ENVOY_DIR
    files = PodFiles(
        token_file=params.get("token_file") or DEFAULT_TOKEN,
        ca_root_file=params.get("ca_root_file") or DEFAULT_ROOT_CERT,
        socket_dir=params.get("sds_socket_dir") or DEFAULT_SOCKET_DIR,
        pod_info_dir=params.get("pod_info_dir") or DEFAULT_POD_INFO,
        envoy_dir=envoy_dir,
    )
    bad = [label for label in params.get("labels") or () if not label.partition("=")[0] or "=" not in label]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not key=value", param_hint="--label")
    extra = dict(label.split("=", 1) for label in params.get("labels") or ())
    pod, probers = load_pod(os.environ, files, overrides, extra)
    if files.envoy_dir is not None:
        # The process is this sidecar's alone: Envoy's temp dir goes to the writable volume.
        tempfile.tempdir = str(files.envoy_dir)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(pod, probers, files, params, explicit))


async def _serve(pod: PodProxy, probers: Mapping[str, AppProbe], files: PodFiles, params: Mapping[str, Any],
                 explicit: Callable[[str], bool]) -> None:
    with until_stopped(pod.node_id):
        ready_timeout = float(params.get("ready_timeout") or 60.0)
        await run_pod_proxy(pod, probers, files, log_level=str(params.get("log_level") or "info"),
                            ready_timeout=ready_timeout,
                            cert_timeout=ready_timeout if explicit("ready_timeout") else 0.0,
                            initial_fetch_timeout_s=float(params.get("initial_fetch_timeout") or 15.0))
