"""The control plane's Kubernetes objects, rendered from a few install options.

`render(options)` returns every object `meshctl install` applies, in apply order: the
Namespace, the CRDs (`meshctl.crds`), then istiod's ServiceAccount, RBAC, mesh ConfigMap,
Service, Deployment, PodDisruptionBudget and the two webhook configurations. `to_yaml` prints
them as one multi-document stream with sorted keys, so the same options always give the same
bytes (`manifests/*.yaml` are committed renders, checked by tests/unit/test_install_render.py).

Names follow Istio (`istiod`, `istio` ConfigMap, `istio-sidecar-injector`,
`istio-validator-<namespace>`) so existing runbooks and `kubectl` habits fit. The RBAC rules
are one table, `RULES`, each with the reason it exists; manifests/README.md lists them.

Pure: no I/O, no clock, no environment. A full render costs ~0.2 s (mostly the CRD schemas), YAML ~0.1 s more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from meshctl import __version__
from meshctl.crds import NAMES, crds, served_kinds

Manifest = dict[str, Any]
APP_LABELS = {"app": "istiod", "istio": "pilot"}
PART_OF = {"app.kubernetes.io/part-of": "meshctl"}
PROXY_UID = 1337  # Istio's: the control plane runs as the same non-root UID as its sidecars
INJECTOR_NAME = "istio-sidecar-injector"
INJECT_PATH, VALIDATE_PATH = "/inject", "/validate"
# Container ports (Istio's): plaintext xDS, xDS + CA over TLS, monitoring/debug, webhooks.
XDS_PORT, XDS_TLS_PORT, DEBUG_PORT, WEBHOOK_PORT = 15010, 15012, 15014, 15017


@dataclass(frozen=True)
class InstallOptions:
    """What a user chooses at install time; everything else follows Istio's defaults."""

    namespace: str = "istio-system"
    image: str = f"meshctl/control-plane:{__version__}"
    proxy_image: str = f"meshctl/proxy:{__version__}"
    trust_domain: str = "cluster.local"
    replicas: int = 1

    @property
    def validator_name(self) -> str:
        """`istio-validator-<namespace>`: Istio's name, unique per control-plane namespace."""
        return f"istio-validator-{self.namespace}"

    @property
    def cluster_role_name(self) -> str:
        return f"istiod-clusterrole-{self.namespace}"


@dataclass(frozen=True)
class Rule:
    """One RBAC rule and why istiod needs it (cluster-wide unless `namespaced`)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    namespaced: bool = False
    resource_names: tuple[str, ...] = ()

    def as_dict(self) -> Manifest:
        out: Manifest = {"apiGroups": list(self.api_groups), "resources": list(self.resources),
                         "verbs": list(self.verbs)}
        if self.resource_names:
            out["resourceNames"] = list(self.resource_names)
        return out


def _mesh_resources(suffix: str = "") -> dict[str, tuple[str, ...]]:
    """group -> plurals (with `suffix`, e.g. `/status`) of every served mesh kind."""
    out: dict[str, list[str]] = {}
    for group, kind, _versions, _model in served_kinds():
        out.setdefault(group, []).append(NAMES[kind].plural + suffix)
    return {group: tuple(sorted(plurals)) for group, plurals in out.items()}


def rules(options: InstallOptions) -> list[Rule]:
    """Every permission istiod has, least privilege: the verbs its components call, nothing else."""
    mesh = [Rule((group,), plurals, ("get", "list", "watch"), f"config source: list+watch the {group} kinds")
            for group, plurals in sorted(_mesh_resources().items())]
    status = [Rule((group,), plurals, ("get", "patch", "update"), "leader: write status.conditions on mesh objects")
              for group, plurals in sorted(_mesh_resources("/status").items())]
    webhooks = (INJECTOR_NAME, options.validator_name)
    return [
        *mesh, *status,
        Rule(("",), ("namespaces", "pods", "services"), ("get", "list", "watch"),
             "service registry and discovery selectors: Services, Pods (proxies, subsets), Namespaces"),
        Rule(("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch"), "service registry: endpoints"),
        Rule(("",), ("secrets",), ("get", "list", "watch"),
             "Gateway credentialName: TLS secrets in the gateway's namespace, any namespace"),
        Rule(("",), ("configmaps",), ("create", "get", "list", "watch", "update"),
             "the istio-ca-root-cert ConfigMap (mesh root) published in every namespace"),
        Rule(("authentication.k8s.io",), ("tokenreviews",), ("create",),
             "CA: TokenReview of a workload's projected service-account token"),
        Rule(("authorization.k8s.io",), ("subjectaccessreviews",), ("create",),
             "gateway secrets over SDS: may this gateway's service account list secrets in its namespace"),
        Rule(("admissionregistration.k8s.io",), ("mutatingwebhookconfigurations",), ("get", "patch"),
             "patch the injector's caBundle at start (its own configuration only)",
             resource_names=(webhooks[0],)),
        Rule(("admissionregistration.k8s.io",), ("validatingwebhookconfigurations",), ("get", "patch"),
             "patch the validator's caBundle at start (its own configuration only)",
             resource_names=(webhooks[1],)),
        Rule(("coordination.k8s.io",), ("leases",), ("create", "get", "update"),
             "leader election (singleton duties: status writes, root rotation, root ConfigMaps and caBundles)",
             namespaced=True),
        Rule(("",), ("secrets",), ("create", "update"),
             "CA: the first replica creates istio-ca-secret (root key and certificate), the rotation leader "
             "updates it; every replica reads and watches it (cluster-wide rule above)", namespaced=True),
    ]


def render(options: InstallOptions) -> list[Manifest]:
    """Every object `meshctl install` applies, in apply order (CRDs before anything that may use them)."""
    return [namespace(options), *crds(), *control_plane(options)]


def namespace(options: InstallOptions) -> Manifest:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": options.namespace, "labels": PART_OF}}


def control_plane(options: InstallOptions) -> list[Manifest]:
    """istiod and what it needs, all in (or bound to) the control plane's namespace."""
    return [service_account(options), *rbac(options), mesh_config(options), service(options),
            deployment(options), disruption_budget(options), injector_webhook(options),
            validator_webhook(options)]


def _meta(options: InstallOptions, name: str, *, namespaced: bool = True) -> Manifest:
    meta: Manifest = {"name": name, "labels": {**APP_LABELS, **PART_OF}}
    if namespaced:
        meta["namespace"] = options.namespace
    return meta


def service_account(options: InstallOptions) -> Manifest:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(options, "istiod")}


def rbac(options: InstallOptions) -> list[Manifest]:
    """ClusterRole + binding for cluster-wide rules, Role + binding for the namespace's own."""
    subject = {"kind": "ServiceAccount", "name": "istiod", "namespace": options.namespace}
    group = "rbac.authorization.k8s.io"
    all_rules = rules(options)
    cluster = [r.as_dict() for r in all_rules if not r.namespaced]
    local = [r.as_dict() for r in all_rules if r.namespaced]
    name = options.cluster_role_name
    return [
        {"apiVersion": f"{group}/v1", "kind": "ClusterRole", "metadata": _meta(options, name, namespaced=False),
         "rules": cluster},
        {"apiVersion": f"{group}/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(options, name, namespaced=False), "subjects": [subject],
         "roleRef": {"apiGroup": group, "kind": "ClusterRole", "name": name}},
        {"apiVersion": f"{group}/v1", "kind": "Role", "metadata": _meta(options, "istiod"), "rules": local},
        {"apiVersion": f"{group}/v1", "kind": "RoleBinding", "metadata": _meta(options, "istiod"),
         "subjects": [subject], "roleRef": {"apiGroup": group, "kind": "Role", "name": "istiod"}},
    ]


def mesh_config(options: InstallOptions) -> Manifest:
    """The `istio` ConfigMap: MeshConfig under `mesh`, as Istio keeps it."""
    mesh = {
        "trustDomain": options.trust_domain,
        "rootNamespace": options.namespace,
        "discoverySelectors": [],
        "defaultConfig": {"discoveryAddress": f"istiod.{options.namespace}.svc:{XDS_TLS_PORT}"},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(options, "istio"),
            "data": {"mesh": yaml.safe_dump(mesh, sort_keys=True)}}


def service(options: InstallOptions) -> Manifest:
    ports = [("grpc-xds", XDS_PORT, XDS_PORT), ("https-dns", XDS_TLS_PORT, XDS_TLS_PORT),
             ("http-monitoring", DEBUG_PORT, DEBUG_PORT), ("https-webhook", 443, WEBHOOK_PORT)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(options, "istiod"),
            "spec": {"selector": dict(APP_LABELS), "ports": [
                {"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in ports]}}


def control_plane_args(options: InstallOptions) -> list[str]:
    """istiod's arguments to `meshctl` (the image's entrypoint): in-cluster, every port on the pod's address."""
    return ["up", "--in-cluster", f"--ads=0.0.0.0:{XDS_PORT}", f"--xds-tls=0.0.0.0:{XDS_TLS_PORT}",
            f"--debug=0.0.0.0:{DEBUG_PORT}", f"--mesh-namespace={options.namespace}",
            f"--trust-domain={options.trust_domain}",
            "--state-dir=/var/lib/meshctl"]


def control_plane_env(options: InstallOptions) -> list[Manifest]:
    """The pod's identity (downward API) and the injector's settings (`injector.settings`, MESHCTL_INJECT_*):
    sidecars dial `istiod.<namespace>.svc:15012` and check that name, which `meshctl up` puts in its
    certificate from `--mesh-namespace` (`citadel.settings.istiod_dns_names`)."""
    field = [(name, {"fieldRef": {"apiVersion": "v1", "fieldPath": path}})
             for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"))]
    host = f"istiod.{options.namespace}.svc"
    address = f"{host}:{XDS_TLS_PORT}"
    plain = [("MESHCTL_INJECT_PROXY_IMAGE", options.proxy_image),
             ("MESHCTL_INJECT_TRUST_DOMAIN", options.trust_domain),
             ("MESHCTL_INJECT_DISCOVERY_ADDRESS", address), ("MESHCTL_INJECT_CA_ADDRESS", address)]
    return [{"name": n, "valueFrom": v} for n, v in field] + [{"name": n, "value": v} for n, v in plain]


def _probe(period: int, failures: int) -> Manifest:
    return {"httpGet": {"path": "/ready", "port": DEBUG_PORT}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def deployment(options: InstallOptions) -> Manifest:
    """istiod: pilot + citadel + injector in one container; non-root, read-only root, no capabilities."""
    ports = [("grpc-xds", XDS_PORT), ("tls-xds", XDS_TLS_PORT), ("http-monitoring", DEBUG_PORT),
             ("https-webhooks", WEBHOOK_PORT)]
    container = {
        "name": "discovery", "image": options.image, "imagePullPolicy": "IfNotPresent",
        "args": control_plane_args(options), "env": control_plane_env(options),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        # Startup allows five minutes for the first sync of a big cluster; liveness then restarts a
        # wedged pod after a minute; readiness takes it out of the Service within ~10 s.
        "startupProbe": _probe(2, 150), "livenessProbe": _probe(10, 6), "readinessProbe": _probe(3, 3),
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "state", "mountPath": "/var/lib/meshctl"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    labels = {**APP_LABELS, "sidecar.istio.io/inject": "false"}  # never inject the control plane itself
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": "istiod", "containers": [container],
            "securityContext": {"fsGroup": PROXY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "state", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(options, "istiod"),
            "spec": {"replicas": options.replicas, "selector": {"matchLabels": dict(APP_LABELS)},
                     "strategy": {"rollingUpdate": {"maxSurge": "100%", "maxUnavailable": "25%"}},
                     "template": pod}}


def disruption_budget(options: InstallOptions) -> Manifest:
    """At most one istiod down by eviction; an unready one may always go (a single replica never blocks drains)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(options, "istiod"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(APP_LABELS)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def _client(options: InstallOptions, path: str) -> Manifest:
    # No caBundle: istiod patches it at start (meshctl.cabundle). Leaving it out of the applied
    # object means a second `meshctl install` (server-side apply) never wipes the patched bundle.
    return {"service": {"name": "istiod", "namespace": options.namespace, "path": path, "port": 443}}


def _injector_hook(options: InstallOptions, name: str, namespace_selector: Sequence[Manifest],
                   object_selector: Sequence[Manifest]) -> Manifest:
    return {
        "name": name, "clientConfig": _client(options, INJECT_PATH),
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "namespaceSelector": {"matchExpressions": list(namespace_selector)},
        "objectSelector": {"matchExpressions": list(object_selector)},
        # Fail closed only where injection was asked for: the selectors keep every other pod away.
        "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
        "reinvocationPolicy": "Never", "timeoutSeconds": 10,
    }


def injector_webhook(options: InstallOptions) -> Manifest:
    """Pods in namespaces labeled istio-injection=enabled or istio.io/rev=default, or pods labeled inject=true."""
    not_false = {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}
    no_label = [{"key": "istio-injection", "operator": "DoesNotExist"},
                {"key": "istio.io/rev", "operator": "DoesNotExist"}]
    hooks = [
        _injector_hook(options, "namespace.sidecar-injector.istio.io",
                       [{"key": "istio-injection", "operator": "In", "values": ["enabled"]}], [not_false]),
        _injector_hook(options, "rev.namespace.sidecar-injector.istio.io",
                       [{"key": "istio.io/rev", "operator": "In", "values": ["default"]},
                        {"key": "istio-injection", "operator": "DoesNotExist"}], [not_false]),
        _injector_hook(options, "object.sidecar-injector.istio.io", no_label,
                       [{"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]),
    ]
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": _meta(options, INJECTOR_NAME, namespaced=False), "webhooks": hooks}


def validator_webhook(options: InstallOptions) -> Manifest:
    """Creates and updates of every mesh kind go through `/validate`.

    `failurePolicy: Ignore`, as Istio installs it: while no istiod answers (first install, all
    replicas down) config writes are not blocked; pilot still validates everything it reads.
    """
    groups = sorted(_mesh_resources())
    hook = {
        "name": "rev.validation.istio.io", "clientConfig": _client(options, VALIDATE_PATH),
        "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": groups, "apiVersions": ["*"],
                   "resources": ["*"]}],
        "failurePolicy": "Ignore", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 10,
    }
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": _meta(options, options.validator_name, namespaced=False), "webhooks": [hook]}


class _NoAliases(yaml.SafeDumper):
    """Never `&id001` anchors: each object reads on its own (kubectl and humans both)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(objects: Sequence[Manifest]) -> str:
    """One YAML stream, documents separated by `---`, keys sorted: deterministic bytes."""
    return "".join("---\n" + yaml.dump(obj, Dumper=_NoAliases, sort_keys=True, width=120) for obj in objects)
