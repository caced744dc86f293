"""Reading a cluster for analysis: one LIST per resource, through pilot's own Kubernetes helpers.

Mesh kinds are found by API discovery (`pilot.kube.discovery.served_kinds`, the versions pilot
watches); Services, Pods, Namespaces and Secrets are listed across all namespaces, since checks
such as "does this namespace have workloads?" need the whole cluster even when only one namespace
is reported on. Secrets are reduced to their names and data keys at once (no key material is
kept); if the credentials may not list Secrets, the credential check is skipped. Cost: one GET
per resource type (a few for discovery), each a full list; fine for a CLI run, not for a loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilot.analysis.inputs import AnalysisInput
from pilot.analysis.load import Collector
from pilot.kube.client import make_client
from pilot.kube.discovery import get_json, served_kinds
from pilot.kube.source import MESH_GROUPS, NAMESPACES
from pilot.kube.watch import Resource, WatchError

SERVICES = Resource("", "v1", "services", "Service")
PODS = Resource("", "v1", "pods", "Pod")
SECRETS = Resource("", "v1", "secrets", "Secret")
FORBIDDEN = 403


async def cluster_input(kubeconfig: Path) -> AnalysisInput:
    """Everything `meshctl analyze --k8s` reads from the cluster of `kubeconfig`."""
    api = await make_client(kubeconfig)
    try:
        collector = Collector()
        for group, (kinds, versions) in sorted(MESH_GROUPS.items()):
            for _, resource in sorted((await served_kinds(api, group, kinds, versions)).items()):
                for item in await _list(api, resource):
                    collector.add(item, "cluster")
        for resource in (SERVICES, PODS, NAMESPACES):
            for item in await _list(api, resource):
                collector.add(item, "cluster")
        collector.workloads_known = True  # every pod of the cluster was listed
        collector.kubernetes = True
        try:
            secrets = await _list(api, SECRETS)
        except WatchError as exc:
            if exc.status != FORBIDDEN:
                raise
        else:
            collector.secrets = set()
            for secret in secrets:
                meta = secret.get("metadata") or {}
                collector.add_secret(str(meta.get("namespace") or ""), str(meta.get("name") or ""),
                                     dict.fromkeys(secret.get("data") or {}, ""))
        return collector.result()
    finally:
        await api.close()


async def _list(api: Any, resource: Resource) -> list[dict[str, Any]]:
    """Every object of `resource`, with apiVersion and kind filled in (list items omit them)."""
    body = await get_json(api, resource.path())
    items = [i for i in (body or {}).get("items") or () if isinstance(i, dict)]
    return [{"apiVersion": resource.api_version, "kind": resource.kind, **item} for item in items]
