"""The meshctl command line: run the local mesh, inspect proxies, manage sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meshctl import __version__
from meshctl.lazy_group import LazyGroup

if TYPE_CHECKING:
    from pilot.settings import PilotSettings

DEFAULT_DEBUG = "127.0.0.1:15014"
# Subcommands living in their own modules, imported when named (see `meshctl.lazy_group`).
SUBCOMMANDS = {
    "proxy": "meshctl.proxy_cmd:proxy",
    "redirect": "injector.redirect_cmd:redirect",
    "kube-inject": "meshctl.kube_inject:kube_inject",
    "install": "meshctl.install:install",
    "uninstall": "meshctl.install:uninstall",
    "analyze": "meshctl.analyze:analyze",
    "describe": "meshctl.describe:describe_group",
    "proxy-status": "meshctl.proxy_status_cmd:proxy_status",
    "proxy-config": "meshctl.proxy_config:proxy_config",
    "version": "meshctl.version_cmd:version",
    "completion": "meshctl.completion_cmd:completion",
    "x": "meshctl.simulate:experimental",
    "wait": "meshctl.wait_cmd:wait",
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, epilog="""
\b
Examples:
  meshctl up --config-dir ./mesh &                 # the control plane on a directory of Istio YAML
  meshctl proxy-status                             # which proxies are in sync with it
  meshctl analyze -f ./mesh                        # what is wrong in that config, offline
  meshctl describe service reviews -o json         # what applies to a service, for scripts

\b
Every command's --help has its own examples; exit codes are in the README ("Exit codes").
""")
@click.version_option(__version__, prog_name="meshctl")
def cli() -> None:
    """meshctl: a service-mesh control plane for Envoy that speaks the Istio API."""


@cli.command(epilog="""
\b
Examples:
  meshctl up --config-dir ./mesh                      # local mesh: pilot, CA, debug API on 127.0.0.1:15014
  meshctl up --config-dir ./mesh --plaintext-only     # no CA: plaintext xDS only (tests, tools)
  meshctl up --kubeconfig ~/.kube/config              # watch a cluster's Istio config as well
""")
@click.option("--config-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of Istio YAML (ServiceEntry, WorkloadEntry, DestinationRule, VirtualService...); "
                   "optional with --kubeconfig or --in-cluster (both sources then serve together).")
@click.option("--ads", "ads_addr", default="127.0.0.1:15010", show_default=True,
              help="Plaintext xDS listen address (unauthenticated: for tests and tools).")
@click.option("--xds-tls", "tls_addr", default="127.0.0.1:15012", show_default=True,
              help="Authenticated xDS (mutual TLS) and the CA's CSR service, on one TLS port.")
@click.option("--debug", "debug_addr", default=DEFAULT_DEBUG, show_default=True, help="Debug HTTP address.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="MESHCTL_STATE_DIR",
              help="CA, trust bundle and workload tokens [$XDG_STATE_HOME/meshctl or ~/.local/state/meshctl].")
@click.option("--trust-domain", default="cluster.local", show_default=True, help="SPIFFE trust domain of the mesh.")
@click.option("--plaintext-only", is_flag=True,
              help="Serve only plaintext xDS: no CA, no authenticated port, no tokens (tests, tools, benchmarks).")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A Kubernetes cluster's kubeconfig: the CA also accepts its pods' projected service-account "
                   "tokens (audience istio-ca), reviewed by its API server (TokenReview), and pilot watches its "
                   "kubectl-applied Istio config.")
@click.option("--mesh-namespace", default="istio-system", show_default=True,
              help="With a cluster: the control-plane namespace, holding the `istio` mesh ConfigMap.")
@click.option("--in-cluster", is_flag=True,
              help="Running in a Kubernetes pod: reach the API server with the pod's service account (in-cluster "
                   "config) for what --kubeconfig does.")
@click.option("--webhooks", "webhooks_addr", envvar="MESHCTL_WEBHOOKS",
              help="With a cluster: HTTPS address of the injection and validation webhooks "
                   "[0.0.0.0:15017 with --in-cluster, else 127.0.0.1:15017].")
@click.option("--log-level", default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object per line (time, level, logger, message, change_id) for log pipelines.")
@click.option("--otlp-endpoint", envvar="MESHCTL_PILOT_OTLP_ENDPOINT",
              help="Send OpenTelemetry traces of config changes to this OTLP/HTTP URL "
                   "(e.g. http://127.0.0.1:4318/v1/traces); default: no tracing.")
def up(config_dir: Path | None, ads_addr: str, tls_addr: str, debug_addr: str, state_dir: Path | None,
       trust_domain: str, plaintext_only: bool, log_level: str, kubeconfig: Path | None = None,
       in_cluster: bool = False, mesh_namespace: str = "istio-system", webhooks_addr: str | None = None,
       log_format: str = "text", otlp_endpoint: str | None = None) -> None:
    """Run the control plane (pilot and its CA, Citadel) on a directory of mesh config until Ctrl-C."""
    from pilot.gcpolicy import choose_allocator, forget_preload

    if sys.argv[1:2] == ["up"]:  # this process is `meshctl up` (not a test invoking the command)
        try:
            choose_allocator(["-m", "meshctl.cli", *sys.argv[1:]], os.environ)  # fast, and memory returns
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        forget_preload(os.environ)
    from citadel.errors import CitadelError
    from meshctl.security import default_state_dir
    from pilot.listen import AddressInUseError
    from pilot.logs import configure
    from pilot.settings import PilotSettings

    configure(log_level, "json" if log_format == "json" else "text")
    ads_host, ads_port = _split(ads_addr)
    tls_host, tls_port = _split(tls_addr)
    debug_host, debug_port = _split(debug_addr)
    settings = PilotSettings(ads_host=ads_host, ads_port=ads_port, xds_tls_host=tls_host, xds_tls_port=tls_port,
                             debug_host=debug_host, debug_port=debug_port, config_dir=config_dir,
                             kubeconfig=kubeconfig, kube_in_cluster=in_cluster, kube_mesh_namespace=mesh_namespace,
                             otlp_endpoint=otlp_endpoint, trust_domain=trust_domain)
    if config_dir is None and kubeconfig is None and not in_cluster:
        raise click.UsageError("give --config-dir, --kubeconfig or --in-cluster: where the mesh config comes from")
    state = state_dir or default_state_dir()
    webhooks = _split(webhooks_addr) if webhooks_addr else None

    try:
        asyncio.run(_up_plaintext(settings) if plaintext_only
                    else _up(settings, state, trust_domain, kubeconfig, in_cluster, webhooks))
    except CitadelError as exc:  # e.g. an unreadable CA directory: one line naming the file
        raise click.ClickException(f"the mesh CA cannot start: {exc}") from None
    except PermissionError as exc:  # the state directory (or a file in it) is not ours
        raise click.ClickException(f"cannot use the state directory {state}: {exc}") from None
    except AddressInUseError as exc:  # one line, not a traceback: another pilot (or demo) runs there
        flag = {"xDS": "--ads", "authenticated xDS": "--xds-tls", "webhooks": "--webhooks"}.get(exc.what, "--debug")
        raise click.ClickException(f"{exc} (another pilot running? pick a free one with {flag})") from None


async def _up_plaintext(settings: PilotSettings) -> None:
    """`meshctl up --plaintext-only`: pilot alone, plaintext xDS."""
    from pilot.app import Pilot
    from pilot.gcpolicy import tune_gc
    from pilot.logs import announce

    async with Pilot(settings) as pilot:
        tune_gc(settings.gc_young_threshold)  # after start-up: what exists now lives as long as pilot
        announce(f"pilot: xDS on {pilot.ads_address} (plaintext, unauthenticated), debug on "
                 f"http://{pilot.debug_address}")
        await _until_signal()


async def _up(settings: PilotSettings, state: Path, trust_domain: str, kubeconfig: Path | None = None,
              in_cluster: bool = False, webhooks: tuple[str, int] | None = None) -> None:
    """`meshctl up`: pilot with Citadel composed in (one TLS port for ADS and CSRs), and workload tokens."""
    from citadel.settings import istiod_dns_names
    from meshctl.security import MeshSecurity, workload_accounts
    from pilot.app import Pilot
    from pilot.gcpolicy import tune_gc
    from pilot.logs import announce
    from pilot.tasks import spawn

    pilot = Pilot(settings)
    replicas = kubeconfig is not None or in_cluster
    # On a cluster the rotation leader rotates, and the serving certificate names istiod in the mesh namespace.
    cluster = {"rotate_roots": False, "server_dns_names": istiod_dns_names(settings.kube_mesh_namespace),
               "external_roots": True}  # the roots: the control-plane namespace's Secrets (meshctl.kube_up)
    security = MeshSecurity(state, pilot.registry, trust_domain=trust_domain, host=settings.xds_tls_host,
                            **(cluster if replicas else {}))
    if replicas:
        from pilot.kube.leader import ROOT_ROTATION_LEASE, every

        ca = security.citadel
        pilot.lead(ROOT_ROTATION_LEASE, "ca-root-rotation", lambda: every(
            ca.settings.check_interval.total_seconds(), lambda: ca.ca.rotation_tick(ca.rotation_policy),
            "ca-root-rotation", pilot.failures))
    pilot.secure = security.serving()  # composition: pilot serves Citadel's CSR service on its TLS port
    pilot.credentials.root = security.layout.secrets  # Gateway credentialName secrets, checked for configz
    kube = None
    if kubeconfig is not None or in_cluster:  # TokenReview for the CA, webhooks, caBundles, root ConfigMaps
        from meshctl.kube_up import KubeControlPlane

        kube = await KubeControlPlane.open(security, settings, trust_domain=trust_domain, webhooks=webhooks)
        kube.lead(pilot)  # namespace duties (root ConfigMaps, caBundles) on the namespace-controller leader only
    await security.start()
    try:
        async with pilot:
            if kube is not None:
                await kube.start(pilot)
            tune_gc(settings.gc_young_threshold)  # after start-up: what exists now lives as long as pilot
            security.sync_tokens(workload_accounts(pilot.pusher.mesh))  # before any sidecar asks
            tokens = spawn("workload-tokens", lambda: security.keep_tokens(pilot), pilot.failures)
            announce(f"pilot: xDS on {pilot.ads_address} (plaintext, unauthenticated), xDS and CA on "
                     f"{pilot.xds_tls_address} (mutual TLS, trust domain {trust_domain}), debug on "
                     f"http://{pilot.debug_address}, state in {state}")
            try:
                await _until_signal()
            finally:
                tokens.cancel()
    finally:
        if kube is not None:
            await kube.close()
        await security.stop()


@cli.command(epilog="""
\b
Examples:
  meshctl demo                         # 30 s of canary traffic on the default ports
  meshctl demo --duration 120 --ads-port 0 --xds-tls-port 0 --debug-port 0
""")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds to run, then stop.")
@click.option("--ads-port", type=int, default=15010, show_default=True, help="Pilot xDS port (0: any free port).")
@click.option("--xds-tls-port", "tls_port", type=int, default=15012, show_default=True,
              help="Authenticated xDS and CA port, mutual TLS (0: any free port).")
@click.option("--debug-port", type=int, default=15014, show_default=True, help="Pilot debug port (0: any free).")
def demo(duration: float, ads_port: int, tls_port: int, debug_port: int) -> None:
    """Run a local mesh with a live canary shift: frontend -> reviews v1/v2/v3, real Envoy sidecars."""
    from meshctl.demo import main as demo_main
    from meshctl.envoy import EnvoyStartError
    from pilot.listen import AddressInUseError

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        failed = demo_main(duration, ads_port, debug_port, tls_port)
    except AddressInUseError as exc:  # one line, not a traceback: another demo or pilot runs there
        flag = {"xDS": "--ads-port", "authenticated xDS": "--xds-tls-port"}.get(exc.what, "--debug-port")
        raise click.ClickException(f"{exc} (another demo or pilot running? pick a free one with {flag})") from None
    except EnvoyStartError as exc:  # a sidecar's address is taken (another demo), or Envoy failed
        raise click.ClickException(str(exc)) from None
    if failed:
        raise SystemExit(1)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise click.BadParameter(f"{addr!r} is not host:port")
    return host, int(port)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
