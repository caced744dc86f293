"""`meshctl kube-inject -f FILE|-`: add sidecars to Kubernetes YAML without the webhook.

Every document is passed through; Pods are injected, and so are the pod templates of
Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (and of the items of a
`List`), by the same pure `injector.inject.inject` the webhook uses, so both paths give the same
pod. The namespace is assumed enrolled (kube-inject cannot see its labels, as Istio's), but the
pod's own `sidecar.istio.io/inject: "false"`, hostNetwork and an existing sidecar are honoured.
Settings come from `InjectSettings` (MESHCTL_INJECT_* environment variables) and the options.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import yaml

from injector.inject import ENROLLED, InjectionError, inject
from injector.settings import InjectSettings
from pilot.kube.meshconfig import MeshConfigError, parse_mesh_config

# kind -> path of the pod template inside the object.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def _template(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def inject_template(obj: dict[str, Any], path: tuple[str, ...], settings: InjectSettings,
                    mesh_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A workload with its pod template injected (the template becomes a Pod for `inject` and back)."""
    template = _template(obj, path)
    if template is None:
        return obj
    meta = obj.get("metadata") or {}
    template_meta = template.get("metadata") or {}
    pod_meta = {"namespace": meta.get("namespace") or "default", **template_meta}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": template.get("spec") or {}}
    injected = inject(pod, settings, ENROLLED, workload=str(meta.get("name") or "unknown"),
                      mesh_metadata=mesh_metadata)
    new_meta = {k: v for k, v in injected["metadata"].items() if k != "namespace" or k in template_meta}
    out = dict(obj)
    node = out
    for key in path[:-1]:
        node[key] = dict(node[key])
        node = node[key]
    node[path[-1]] = {**template, "metadata": new_meta, "spec": injected["spec"]}
    return out


def inject_object(obj: Any, settings: InjectSettings, mesh_metadata: Mapping[str, str] | None = None) -> Any:
    """One decoded document, injected if it is (or holds) a pod; anything else unchanged.
    `mesh_metadata`: the mesh config's `defaultConfig.proxyMetadata`."""
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("kind")
    if kind == "Pod":
        return inject(obj, settings, ENROLLED, mesh_metadata=mesh_metadata)
    if kind == "List" and isinstance(obj.get("items"), list):
        return {**obj, "items": [inject_object(item, settings, mesh_metadata) for item in obj["items"]]}
    if kind in TEMPLATES:
        return inject_template(obj, TEMPLATES[kind], settings, mesh_metadata)
    return obj


def inject_documents(text: str, settings: InjectSettings,
                     mesh_metadata: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Every document of a YAML stream, injected where it holds a pod (empty documents dropped)."""
    for doc in yaml.safe_load_all(text):
        if doc is not None:
            yield inject_object(doc, settings, mesh_metadata)


def _mesh_metadata(path: Path | None) -> Mapping[str, str]:
    """`defaultConfig.proxyMetadata` of a mesh config file; ClickException naming the file and field."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return parse_mesh_config(text, where=str(path)).default_config.proxy_metadata
    except MeshConfigError as exc:
        raise click.ClickException(str(exc)) from None


def render(docs: Iterator[Any]) -> str:
    """Documents back to one YAML stream, keys in their original order."""
    return "---\n".join(yaml.safe_dump(doc, sort_keys=False, width=120) for doc in docs)


@click.command("kube-inject", epilog="""
\b
Examples:
  meshctl kube-inject -f deployment.yaml | kubectl apply -f -
  meshctl kube-inject -f app.yaml -o app-injected.yaml --trust-domain example.org
  kubectl get deploy web -o yaml | meshctl kube-inject -f - --proxy-image registry.local/meshctl-proxy:dev

\b
Exit codes: 0 printed (documents without pods pass unchanged); 1 FILE unreadable, invalid YAML, or a
pod that cannot be injected (the document and reason are printed); 2 bad usage.
""")
@click.option("-f", "--filename", required=True, metavar="FILE|-", help="Kubernetes YAML; '-' reads stdin.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@click.option("--proxy-image", help="Sidecar (and init container) image [MESHCTL_INJECT_PROXY_IMAGE or built-in].")
@click.option("--trust-domain", help="SPIFFE trust domain of the mesh [cluster.local].")
@click.option("--discovery-address", help="Pilot's xDS address as pods see it [istiod.istio-system.svc:15012].")
@click.option("--mesh-config-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Mesh config YAML (the `istio` ConfigMap's `mesh` key): its defaultConfig.proxyMetadata "
                   "goes into every sidecar's environment, as the webhook does with the cluster's.")
def kube_inject(filename: str, output: Path | None, proxy_image: str | None, trust_domain: str | None,
                discovery_address: str | None, mesh_config_file: Path | None = None) -> None:
    """Inject sidecars into the pods and pod templates of FILE, as the webhook would."""
    overrides = {k: v for k, v in (("proxy_image", proxy_image), ("trust_domain", trust_domain),
                                   ("discovery_address", discovery_address)) if v is not None}
    settings = InjectSettings().model_copy(update=overrides)
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot read {filename}: {exc.strerror or exc}") from None
    try:
        rendered = render(inject_documents(text, settings, _mesh_metadata(mesh_config_file)))
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{filename}: invalid YAML: {' '.join(str(exc).split())}") from None
    except InjectionError as exc:
        raise click.ClickException(f"{filename}: {exc}") from None
    if output is None:
        click.echo(rendered, nl=False)
    else:
        output.write_text(rendered, encoding="utf-8")
