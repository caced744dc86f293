"""The CA on Kubernetes: one root for every replica, kept in Secrets of the control-plane namespace.

Istio's names and precedence (`pilot/pkg/bootstrap/istio_ca.go`, `security/pkg/pki/ca`):

- Secret `cacerts` (a plugged-in CA: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`)
  wins when it exists at start; a change to it is reloaded (a bad new set keeps the old CA serving).
- Otherwise the self-signed CA lives in Secret `istio-ca-secret` (type `istio.io/ca-root`; `ca-cert.pem`
  and `ca-key.pem` are the signing root and its key, `root-cert.pem` the trust bundle, `cert-chain.pem`
  empty). The first replica to start creates it; a replica that loses that race (409 AlreadyExists)
  reads the winner's. meshctl's phased rotation (`citadel.rotation`) adds what Istio's single-step
  rotator has no use for: the annotation `meshctl.io/ca-rotation` (phase and since when) and, for
  the trusted root that is not signing, its key under `root-key-<id>.pem`. A Secret written by Istio
  (no annotation) loads as a stable CA with its signing root.

Writes (rotation steps, by the holder of the rotation Lease only) carry the `resourceVersion` last
seen, so a write based on stale roots is refused (409) and the watch brings the current ones. Every
replica watches both Secrets and adopts what another replica wrote: the trust bundle then holds the
old and the new root during a rotation, on every replica.

Concurrency: `open` and `run` are on the event loop (one watch per Secret, handlers on the loop).
`save` is called by a rotation step in a worker thread; it runs the write on the loop and waits for
it, so the Secret's resourceVersion is only touched on the loop. Cost: two watches of one object
each; one write per rotation step (a few per root lifetime).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from citadel.ca import describe
from citadel.errors import CAConfigError
from citadel.keys import KeyAlgorithm, cert_pem, certs_pem, fingerprint, load_certs, load_signing_key, private_key_pem
from citadel.rotation import Phase, Root, RootState, initial_state
from citadel.store import SelfSignedStore, cacerts_bundle, new_root
from pilot.kube.leader import KubeRequestError, api_request
from pilot.kube.watch import Resource, Watch

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from citadel.authority import CertificateAuthority

log = logging.getLogger(__name__)

CA_SECRET = "istio-ca-secret"  # Istio's self-signed CA secret
CACERTS_SECRET = "cacerts"  # Istio's plugged-in CA secret
CA_SECRET_TYPE = "istio.io/ca-root"
ROTATION_ANNOTATION = "meshctl.io/ca-rotation"
SECRETS = Resource("", "v1", "secrets", "Secret")
SAVE_TIMEOUT_S = 30.0


def secret_name(name: str, namespace: str) -> str:
    """How errors and logs name a Secret (never as `name: value`, which log redaction masks)."""
    return f"Secret {name} (namespace {namespace})"


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode("ascii")


def secret_data(state: RootState) -> dict[str, str]:
    """`state` as the Secret's `data` (base64 values): Istio's keys plus the non-signing root's key."""
    data = {"ca-cert.pem": _b64(cert_pem(state.active.cert)), "ca-key.pem": _b64(private_key_pem(state.active.key)),
            "cert-chain.pem": "", "root-cert.pem": _b64(certs_pem([r.cert for r in state.trusted]))}
    for root in state.trusted:
        if root.id != state.active.id:
            data[f"root-key-{root.id}.pem"] = _b64(private_key_pem(root.key))
    return data


def rotation_annotation(state: RootState) -> str:
    return json.dumps({"phase": state.phase.value, "changed_at": state.changed_at.isoformat()}, sort_keys=True)


def ca_secret(namespace: str, state: RootState, resource_version: str | None = None) -> dict[str, Any]:
    """The whole `istio-ca-secret` object for `state` (with `resource_version` for an update)."""
    meta: dict[str, Any] = {"name": CA_SECRET, "namespace": namespace,
                            "annotations": {ROTATION_ANNOTATION: rotation_annotation(state)}}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "type": CA_SECRET_TYPE, "metadata": meta,
            "data": secret_data(state)}


def decoded(secret: Mapping[str, Any], where: str) -> dict[str, bytes]:
    """The Secret's data, base64-decoded (CAConfigError naming `where` and the key when one is not)."""
    out: dict[str, bytes] = {}
    for key, value in sorted((secret.get("data") or {}).items()):
        try:
            out[key] = base64.b64decode(value or "", validate=True)
        except ValueError:
            raise CAConfigError(f"{where}: data.{key} is not base64") from None
    return out


def state_from_secret(secret: Mapping[str, Any], where: str) -> RootState:
    """The `RootState` an `istio-ca-secret` holds (see the module docstring); CAConfigError naming
    `where` and the key when it is incomplete."""
    data = decoded(secret, where)
    if not data.get("ca-cert.pem") or not data.get("ca-key.pem"):
        raise CAConfigError(f"{where}: needs data ca-cert.pem and ca-key.pem (the self-signed root and its key)")
    certs = load_certs(data["ca-cert.pem"], f"{where}: data.ca-cert.pem")
    if len(certs) != 1:
        raise CAConfigError(f"{where}: data.ca-cert.pem must hold one certificate, found {len(certs)}")
    active = Root(certs[0], load_signing_key(data["ca-key.pem"], f"{where}: data.ca-key.pem"))
    raw = ((secret.get("metadata") or {}).get("annotations") or {}).get(ROTATION_ANNOTATION)
    if not raw:  # written by Istio (or by hand): a stable CA with its signing root
        return initial_state(active, active.cert.not_valid_before_utc)
    try:
        doc = json.loads(raw)
        phase, changed_at = Phase(doc["phase"]), datetime.fromisoformat(doc["changed_at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CAConfigError(f"{where}: annotation {ROTATION_ANNOTATION} is unreadable ({exc})") from None
    trusted: list[Root] = []
    for cert in load_certs(data.get("root-cert.pem", b""), f"{where}: data.root-cert.pem") or [active.cert]:
        if fingerprint(cert) == fingerprint(active.cert):
            trusted.append(active)
            continue
        root_id = fingerprint(cert)[:16]
        key = data.get(f"root-key-{root_id}.pem")
        if not key:
            raise CAConfigError(f"{where}: data.root-key-{root_id}.pem missing (the key of trusted root {root_id})")
        trusted.append(Root(cert, load_signing_key(key, f"{where}: data.root-key-{root_id}.pem")))
    try:
        return RootState(phase, active, tuple(trusted), changed_at)
    except ValueError as exc:
        raise CAConfigError(f"{where}: {exc}") from None


class NamespaceMissingError(CAConfigError):
    """The control-plane namespace does not exist, so no Secret can hold the roots."""


class KubeRootStore:
    """`istio-ca-secret` as the self-signed CA's store (the `RootStore` a `CertificateAuthority` saves to)."""

    def __init__(self, api: ApiClient, namespace: str, loop: asyncio.AbstractEventLoop) -> None:
        self.api, self.namespace, self._loop = api, namespace, loop
        self.resource_version: str | None = None
        self._pending: set[asyncio.Task[None]] = set()  # writes scheduled by `save` on the loop
        self.where = secret_name(CA_SECRET, namespace)

    @property
    def path(self) -> str:
        return f"{SECRETS.path(self.namespace)}/{CA_SECRET}"

    async def get(self) -> dict[str, Any] | None:
        status, body = await api_request(self.api, "GET", self.path)
        if status == 404:
            return None
        if status != 200:
            raise CAConfigError(f"{self.where}: GET answered {status}: {(body or {}).get('message', '')}")
        self.resource_version = body["metadata"].get("resourceVersion")
        return dict(body)

    async def load_or_create(self, algorithm: KeyAlgorithm, trust_domain: str, root_ttl: timedelta,
                             now: datetime) -> tuple[RootState, bool]:
        """The shared roots, created (with a new root) if this replica is the first; the flag says so."""
        found = await self.get()
        if found is not None:
            return state_from_secret(found, self.where), False
        state = initial_state(new_root(algorithm, trust_domain, now, root_ttl), now)
        status, body = await api_request(self.api, "POST", SECRETS.path(self.namespace),
                                         ca_secret(self.namespace, state))
        if status == 409:  # another replica created it first: use the winner's
            found = await self.get()
            if found is None:
                raise CAConfigError(f"{self.where}: created by another replica, then gone")
            return state_from_secret(found, self.where), False
        if status == 404:
            raise NamespaceMissingError(f"{self.where}: the namespace does not exist")
        if status not in (200, 201):
            raise CAConfigError(f"{self.where}: create answered {status}: {(body or {}).get('message', '')}")
        self.resource_version = body["metadata"].get("resourceVersion")
        return state, True

    def save(self, state: RootState) -> None:
        """Write `state`. From a worker thread (how rotation steps run) the write runs on the loop and
        this waits for it: a refused write raises CAConfigError and the step is not applied. Called on
        the loop itself (an operator's step, a test), it cannot wait: the write is scheduled and a
        failure logged; the watch then brings the roots the Secret really holds."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            asyncio.run_coroutine_threadsafe(self._write(state), self._loop).result(SAVE_TIMEOUT_S)
            return
        task = self._loop.create_task(self._write(state), name="ca-secret-write")
        self._pending.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("citadel: %s", task.exception())

    async def _write(self, state: RootState) -> None:
        if self.resource_version is None:
            status, body = await api_request(self.api, "POST", SECRETS.path(self.namespace),
                                             ca_secret(self.namespace, state))
        else:
            status, body = await api_request(self.api, "PUT", self.path,
                                             ca_secret(self.namespace, state, self.resource_version))
            if status == 404:  # deleted meanwhile: create it again with the roots in use
                self.resource_version = None
                return await self._write(state)
        if status == 409:
            raise CAConfigError(f"{self.where}: changed by another replica meanwhile; this step is dropped and "
                                "the watch brings the current roots")
        if status not in (200, 201):
            raise CAConfigError(f"{self.where}: write answered {status}: {(body or {}).get('message', '')}")
        self.resource_version = body["metadata"].get("resourceVersion")


class _SecretHandler:
    """A `WatchHandler` for one named Secret: `changed(obj)` on add/update, nothing on delete."""

    def __init__(self, changed: Callable[[dict[str, Any]], None]) -> None:
        self._changed = changed

    def replace(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            self._changed(obj)

    def upsert(self, obj: dict[str, Any]) -> None:
        self._changed(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        log.warning("citadel: Secret %s/%s deleted; the CA keeps its roots in memory", meta.get("namespace"),
                    meta.get("name"))


class KubeCA:
    """Points a `CertificateAuthority` at the control-plane namespace's Secrets and keeps it in step."""

    def __init__(self, api: ApiClient, namespace: str, ca: CertificateAuthority,
                 store: KubeRootStore | None, *, plugged: bool) -> None:
        self.api, self.namespace, self.ca, self.store = api, namespace, ca, store
        self.plugged = plugged  # from Secret cacerts; neither this nor a store: the state directory's CA
        self.adopted = 0  # root changes taken from another replica's write (tests, logs)

    @classmethod
    async def open(cls, api: ApiClient, namespace: str, ca: CertificateAuthority, *,
                   algorithm: KeyAlgorithm, root_ttl: timedelta, fallback_dir: Path) -> KubeCA:
        """Load `cacerts` if present, else `istio-ca-secret` (created by the first replica), into `ca`;
        CAConfigError (naming the Secret) if the cluster cannot be read or refuses."""
        try:
            return await cls._open(api, namespace, ca, algorithm=algorithm, root_ttl=root_ttl,
                                   fallback_dir=fallback_dir)
        except KubeRequestError as exc:
            raise CAConfigError(f"the CA's Secrets in namespace {namespace}: {exc}") from None

    @classmethod
    async def _open(cls, api: ApiClient, namespace: str, ca: CertificateAuthority, *,
                    algorithm: KeyAlgorithm, root_ttl: timedelta, fallback_dir: Path) -> KubeCA:
        status, body = await api_request(api, "GET", f"{SECRETS.path(namespace)}/{CACERTS_SECRET}")
        if status == 200:
            where = secret_name(CACERTS_SECRET, namespace)
            bundle = cacerts_bundle(decoded(body, where), where, ca.clock(), separator=": data.")
            ca.use_bundle(bundle)
            log.info("citadel: plugged-in CA, signing with %s (from %s)", describe(bundle.signing_cert), where)
            return cls(api, namespace, ca, None, plugged=True)
        if status != 404:
            message = (body or {}).get("message", "") if isinstance(body, dict) else ""
            raise CAConfigError(f"{secret_name(CACERTS_SECRET, namespace)}: GET answered {status} {message}")
        store = KubeRootStore(api, namespace, asyncio.get_running_loop())
        try:
            state, created = await store.load_or_create(algorithm, ca.trust_domain, root_ttl, ca.clock())
        except NamespaceMissingError as exc:  # a workstation against a cluster without the namespace
            log.warning("citadel: %s: using the CA in %s; replicas will NOT share a root until the namespace "
                        "exists and this replica restarts", exc, fallback_dir)
            local = SelfSignedStore(fallback_dir)
            state, _ = await asyncio.to_thread(local.load_or_create, algorithm, ca.trust_domain, ca.clock(), root_ttl)
            ca.use_store(local, state)
            return cls(api, namespace, ca, None, plugged=False)
        ca.use_store(store, state)
        log.info("citadel: %s the mesh root %s (in %s)", "created" if created else "loaded",
                 describe(state.active.cert), store.where)
        return cls(api, namespace, ca, store, plugged=False)

    async def run(self) -> None:
        """Watch the CA's Secret and adopt every change another replica (or an operator) makes."""
        if not self.plugged and self.store is None:
            return  # the state directory's CA: nothing in the cluster to follow
        name = CACERTS_SECRET if self.plugged else CA_SECRET
        handler = _SecretHandler(self._cacerts_changed if self.plugged else self._roots_changed)
        await Watch(self.api, SECRETS, handler, namespace=self.namespace,
                    field_selector=f"metadata.name={name}").run()

    def _roots_changed(self, obj: dict[str, Any]) -> None:
        if self.store is None:  # only registered with a store
            return
        version = obj["metadata"].get("resourceVersion")
        if version == self.store.resource_version:  # our own write coming back
            return
        try:
            state = state_from_secret(obj, self.store.where)
        except CAConfigError as exc:
            log.error("citadel: %s; keeping the current roots", exc)
            return
        self.store.resource_version = version
        if self.ca.adopt(state):
            self.adopted += 1
            log.info("citadel: adopted the roots another replica wrote (phase %s, signing %s, trusted %s; from %s)",
                     state.phase, state.active.id, [r.id for r in state.trusted], self.store.where)

    def _cacerts_changed(self, obj: dict[str, Any]) -> None:
        where = secret_name(CACERTS_SECRET, self.namespace)
        try:
            bundle = cacerts_bundle(decoded(obj, where), where, self.ca.clock(), separator=": data.")
        except CAConfigError as exc:
            log.error("citadel: %s; keeping the current CA", exc)
            return
        if self.ca.use_bundle(bundle):
            self.adopted += 1
            log.info("citadel: reloaded the plugged-in CA, signing with %s (from %s)", describe(bundle.signing_cert),
                     where)
