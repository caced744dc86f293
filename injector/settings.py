"""The injector's settings: what a sidecar looks like and where it finds the control plane.

Built once (by `meshctl kube-inject`, the control plane's wiring, or a test) and passed to the
pure `inject` function and the webhook; nothing here reads the environment at import. The
defaults follow Istio 1.30's injection values (ports, UID/GID 1337, resources, probe timings,
token audience `istio-ca`), so existing annotations and habits keep their meaning.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from meshctl import __version__

# The sidecar's ports (Istio's); the capture ports 15001/15006 live with the rules (injector.redirect).
STATUS_PORT = 15020  # the agent: merged metrics and the rewritten app probes (/app-health/...)
HEALTH_PORT = 15021  # Envoy's readiness listener (/healthz/ready)
PROMETHEUS_PORT = 15090  # Envoy's Prometheus stats


class InjectSettings(BaseSettings):
    """What the injector adds to a pod. Environment variables MESHCTL_INJECT_* override."""

    model_config = SettingsConfigDict(env_prefix="MESHCTL_INJECT_", frozen=True)

    proxy_image: str = Field(f"meshctl/proxy:{__version__}",
                             description="image of the sidecar and of the init container (Envoy + agent + iptables)")
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of the injected containers")
    proxy_command: tuple[str, ...] = Field(
        ("meshctl", "proxy", "run", "--kubernetes"),
        description="the sidecar container's command: the workload agent and Envoy, configured from its environment")
    proxy_uid: int = Field(1337, ge=1, description="UID (and GID) Envoy runs as; the redirect rules exempt it")
    proxy_gid: int = Field(1337, ge=1)
    discovery_address: str = Field("istiod.istio-system.svc:15012",
                                   description="pilot's authenticated xDS address, as seen from a pod")
    ca_address: str = Field("istiod.istio-system.svc:15012", description="the CA's CSR service (CA_ADDR)")
    trust_domain: str = Field("cluster.local", description="SPIFFE trust domain of the mesh")
    cluster_id: str = Field("Kubernetes", description="ISTIO_META_CLUSTER_ID (Istio's default cluster name)")
    revision: str = Field("default", description="control-plane revision: namespaces labeled istio.io/rev=<it> enrol")
    token_audience: str = Field("istio-ca", description="audience of the projected service-account token")
    token_expiration_seconds: int = Field(43200, ge=600, description="lifetime of that token (the kubelet renews it)")
    root_cert_configmap: str = Field("istio-ca-root-cert",
                                     description="per-namespace ConfigMap holding the mesh root (root-cert.pem)")
    proxy_cpu: str = "100m"
    proxy_memory: str = "128Mi"
    proxy_cpu_limit: str = "2000m"
    proxy_memory_limit: str = "1024Mi"
    init_cpu: str = "10m"
    init_memory: str = "10Mi"
    init_cpu_limit: str = "2000m"
    init_memory_limit: str = "1024Mi"
    readiness_initial_delay_seconds: int = Field(0, ge=0)
    readiness_period_seconds: int = Field(15, ge=1)
    readiness_failure_threshold: int = Field(4, ge=1)
    startup_failure_threshold: int = Field(600, ge=1, description="startup probe: 600 tries one second apart")
    rewrite_app_probes: bool = Field(True, description="sidecar.istio.io/rewriteAppHTTPProbers when not annotated")
    ignored_namespaces: tuple[str, ...] = Field(("kube-system", "kube-public"),
                                                description="never injected, whatever their labels say")
