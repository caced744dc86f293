"""`python -m citadel.agent`: run one workload's agent until SIGINT/SIGTERM.

Flags map onto `AgentSettings` (MESHCTL_AGENT_* environment variables fill what flags omit). The
agent serves SDS on `--sds-socket` at once and logs to stderr; metrics go to a registry of their
own (`--metrics-port` serves it over HTTP on 127.0.0.1 when given).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import ValidationError

from citadel.agent.agent import WorkloadAgent
from citadel.agent.settings import AgentSettings
from citadel.keys import KeyAlgorithm


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--namespace", help="Workload namespace (as in its token).")
@click.option("--service-account", help="Workload service account (as in its token).")
@click.option("--trust-domain", help="SPIFFE trust domain [cluster.local].")
@click.option("--ca-address", help="CSR service host:port [127.0.0.1:15012].")
@click.option("--ca-server-name", help="TLS name expected on the CA's certificate, if not the address host.")
@click.option("--ca-root-file", type=click.Path(dir_okay=False, path_type=Path), help="Mesh root(s), PEM.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="Workload token (0600).")
@click.option("--sds-socket", type=click.Path(dir_okay=False, path_type=Path), help="Unix socket for Envoy's SDS.")
@click.option("--credential-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Gateways: secret store root; serves DIR/NAMESPACE/NAME/ as kubernetes://NAME.")
@click.option("--key-algorithm", type=click.Choice([a.value for a in KeyAlgorithm]), help="[ecdsa-p256]")
@click.option("--cert-ttl", type=click.FloatRange(min=0), help="Seconds to ask for; 0: the CA's default.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve /metrics on 127.0.0.1:PORT.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def main(metrics_port: int | None, log_level: str, **flags: Any) -> None:
    """Keep a workload's certificate fresh and serve it to its Envoy over SDS."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {k: v for k, v in flags.items() if v is not None}
    if "cert_ttl" in values:
        values["cert_ttl"] = timedelta(seconds=values["cert_ttl"])
    try:
        settings = AgentSettings(**values)
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    registry = CollectorRegistry()
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    asyncio.run(_serve(settings, registry))


async def _serve(settings: AgentSettings, registry: CollectorRegistry) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with WorkloadAgent(settings, registry):
        await stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
