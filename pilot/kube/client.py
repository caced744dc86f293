"""An API client for the Kubernetes API server: from a kubeconfig file or the pod's in-cluster config.

Each call builds its own `Configuration`, never kubernetes_asyncio's process-wide default, so two
clients (two clusters, or a test beside pilot) never share credentials. The caller owns the
client and closes it (`await client.close()`) when done. In-cluster, the service-account token
is re-read from its file as kubernetes_asyncio's loader refreshes it (projected tokens rotate).
"""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config


class KubeConfigError(Exception):
    """No usable cluster configuration: names the file (or in-cluster) and the reason."""


async def client_from_kubeconfig(path: Path | str, context: str | None = None) -> ApiClient:
    """A client for the cluster of `context` (the file's current context when None) in `path`."""
    config = Configuration()
    try:
        await load_kube_config(config_file=str(path), context=context, client_configuration=config,
                               persist_config=False)
    except (ConfigException, OSError, KeyError, ValueError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc}") from exc
    return ApiClient(configuration=config)


def client_in_cluster() -> ApiClient:
    """A client from the pod's service account (KUBERNETES_SERVICE_HOST/PORT, token and CA files)."""
    config = Configuration()
    try:
        load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as exc:
        raise KubeConfigError(f"in-cluster config: {exc}") from exc
    return ApiClient(configuration=config)


async def make_client(kubeconfig: Path | str | None = None, *, in_cluster: bool = False,
                      context: str | None = None) -> ApiClient:
    """The client the settings ask for: in-cluster, or from `kubeconfig`."""
    if in_cluster:
        return client_in_cluster()
    if kubeconfig is None:
        raise KubeConfigError("no cluster configuration: give a kubeconfig or in-cluster")
    return await client_from_kubeconfig(kubeconfig, context)
