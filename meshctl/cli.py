"""The meshctl command line: run the local mesh, inspect proxies, manage sidecars."""

from __future__ import annotations

import click

from meshctl import __version__


@click.group()
@click.version_option(__version__, prog_name="meshctl")
def cli() -> None:
    """meshctl: a service-mesh control plane for Envoy that speaks the Istio API."""


def main() -> None:
    cli()
