"""`meshctl install` and `meshctl uninstall`: the control plane into (and out of) a Kubernetes cluster.

Install renders (`meshctl.render`, pure) and applies each object with server-side apply
(`meshctl.kubeapply`): the Namespace and CRDs first, waiting until every CRD is Established,
then istiod and its RBAC, Service, PodDisruptionBudget and webhooks. Running it again is
harmless: only what changed is written. `--dry-run` prints the YAML and touches nothing.

Uninstall deletes what install made, webhooks first (so a vanished istiod never blocks pod
creation or config writes), in reverse order. Like `istioctl uninstall`, it keeps the CRDs (and so
every VirtualService, DestinationRule... users applied) and the namespace unless `--purge`.

Exit status: 0 done, 1 the cluster refused or could not be reached (one line naming the object
and the API server's reason), 2 a bad option.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meshctl.kubeapply import Applier, KubeApiError, describe
from meshctl.output import emit, output_option
from meshctl.render import InstallOptions, Manifest, render, to_yaml

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


def _namespace(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise click.BadParameter(f"{value!r} is not a namespace name (lowercase RFC 1123 label)")
    return value


def _trust_domain(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not _TRUST_DOMAIN.match(value):
        raise click.BadParameter(f"{value!r} is not a trust domain (lowercase letters, digits, '.', '-', '_')")
    return value


_kubeconfig = click.option(
    "--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), envvar="KUBECONFIG",
    help="The cluster's kubeconfig [$KUBECONFIG, else ~/.kube/config].")
_context = click.option("--context", help="Context in the kubeconfig [its current context].")
_namespace_option = click.option("--namespace", "-n", default="istio-system", show_default=True,
                                 callback=_namespace, help="The control plane's namespace.")


@click.command(epilog="""
\b
Examples:
  meshctl install                                   # into the cluster of ~/.kube/config, namespace istio-system
  meshctl install --replicas 2 --trust-domain example.org --context staging
  meshctl install --dry-run > meshctl.yaml          # the manifests, to review or `kubectl apply -f`

\b
Exit codes: 0 installed (or printed); 1 the API server refused an object or the kubeconfig is unusable
(the object and reason are printed); 2 bad usage (e.g. a namespace that is no DNS label).
""")
@_namespace_option
@click.option("--image", default=InstallOptions.image, show_default=True, help="Control-plane image (istiod).")
@click.option("--proxy-image", default=InstallOptions.proxy_image, show_default=True,
              help="Sidecar image the injector adds to pods (Envoy + workload agent).")
@click.option("--trust-domain", default="cluster.local", show_default=True, callback=_trust_domain,
              help="SPIFFE trust domain of the mesh.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="istiod replicas.")
@click.option("--dry-run", is_flag=True, help="Print the manifests as YAML; change nothing.")
@_kubeconfig
@_context
def install(namespace: str, image: str, proxy_image: str, trust_domain: str, replicas: int, dry_run: bool,
            kubeconfig: Path | None, context: str | None) -> None:
    """Install the CRDs and the control plane (istiod: pilot, CA, injector) into a cluster."""
    options = InstallOptions(namespace=namespace, image=image, proxy_image=proxy_image,
                             trust_domain=trust_domain, replicas=replicas)
    objects = render(options)
    if dry_run:
        click.echo(to_yaml(objects), nl=False)
        return
    _run(_install(objects, kubeconfig, context))
    click.echo(f"meshctl installed in namespace {namespace}: label a namespace istio-injection=enabled "
               "to inject its new pods", err=True)


@click.command(epilog="""
\b
Examples:
  meshctl uninstall                                 # keeps the CRDs, your mesh objects and the namespace
  meshctl uninstall --purge --context staging       # everything, mesh objects included
  meshctl uninstall --purge --dry-run -o json       # what would be deleted, in order, for scripts

\b
Exit codes: 0 uninstalled (or listed); 1 the API server refused a deletion or the kubeconfig is unusable;
2 bad usage.
""")
@_namespace_option
@click.option("--purge", is_flag=True,
              help="Also delete the mesh CRDs (and with them every mesh object in the cluster) and the namespace.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; change nothing.")
@_kubeconfig
@_context
@output_option(default="text", formats=("text", "json", "yaml"))
def uninstall(namespace: str, purge: bool, dry_run: bool, kubeconfig: Path | None, context: str | None,
              output: str = "text") -> None:
    """Remove the control plane installed by `meshctl install` (CRDs and namespace only with --purge).

    `-o json|yaml` applies to --dry-run: the objects it would delete, in order, as a list of
    {kind, name, namespace}; a real uninstall prints one progress line per object.
    """
    objects = uninstall_order(InstallOptions(namespace=namespace), purge=purge)
    if output != "text" and not dry_run:
        raise click.UsageError("-o json|yaml lists what --dry-run would delete; add --dry-run")
    if dry_run:
        if output != "text":
            emit([{"kind": o["kind"], "name": o["metadata"]["name"], "namespace": o["metadata"].get("namespace")}
                  for o in objects], output)
            return
        for obj in objects:
            click.echo(f"would delete {describe(obj)}")
        return
    _run(_uninstall(objects, kubeconfig, context))


def uninstall_order(options: InstallOptions, *, purge: bool) -> list[Manifest]:
    """What uninstall deletes, in order: webhooks first, then the rest in reverse install order."""
    kept = () if purge else ("Namespace", "CustomResourceDefinition")
    objects = [o for o in reversed(render(options)) if o["kind"] not in kept]
    webhooks = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    return [o for o in objects if o["kind"] in webhooks] + [o for o in objects if o["kind"] not in webhooks]


def _run(work: Any) -> None:
    from pilot.kube.client import KubeConfigError

    try:
        asyncio.run(work)
    except (KubeApiError, KubeConfigError) as exc:
        raise click.ClickException(str(exc)) from None


async def _client(kubeconfig: Path | None, context: str | None) -> Any:
    from pilot.kube.client import make_client

    return await make_client(kubeconfig or Path.home() / ".kube" / "config", context=context)


async def _install(objects: Sequence[Manifest], kubeconfig: Path | None, context: str | None) -> None:
    api = await _client(kubeconfig, context)
    try:
        applier = Applier(api)
        crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
        for obj in objects:
            await applier.apply(obj)
            click.echo(f"{describe(obj)} applied")
            if crds and obj is crds[-1]:
                await applier.wait_established(crds)
                click.echo(f"{len(crds)} CRDs established")
    finally:
        await api.close()


async def _uninstall(objects: Sequence[Manifest], kubeconfig: Path | None, context: str | None) -> None:
    api = await _client(kubeconfig, context)
    try:
        applier = Applier(api)
        for obj in objects:
            gone = await applier.delete(obj)
            click.echo(f"{describe(obj)} {'deleted' if gone else 'not found'}")
    finally:
        await api.close()
