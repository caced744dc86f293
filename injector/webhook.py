"""The admission webhooks' HTTP handlers: AdmissionReview v1 in, AdmissionReview v1 out.

`POST /inject` (mutating, for Pod CREATE): decodes the pod, asks `injector.inject` for the
injected pod and answers with the JSONPatch between the two (`injector.patch`); a pod that is not
injected gets `allowed: true` and no patch; a pod whose annotations cannot be honoured (TPROXY, a
bad port list) is refused with a message naming the pod, the annotation and why.
`POST /validate` (validating, for the mesh kinds): `injector.validate.review_object`.
`GET /ready`: 200 once the server answers (the control plane's readiness probe can use it).
Both reviews are counted under Istio's metric names (`injector.metrics`), in pilot's registry
when the control plane passes it.

Concurrency: handlers run on the aiohttp event loop; the only await besides reading the body is
the namespace lookup (`NamespaceLabels`), so a slow API server delays one review, never others.
Each review costs one JSON decode, a deep copy of the pod and one JSON diff: about a millisecond.
The TLS listener around these handlers is `injector.app`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from injector.inject import ENROLLED, InjectionError, decide, inject
from injector.metrics import WebhookMetrics
from injector.patch import encode_patch, pod_patch
from injector.settings import InjectSettings
from injector.validate import review_object

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 8 * 2**20  # the API server sends at most ~3 MiB (an object and its old version)

NamespaceLabels = Callable[[str], Awaitable[Mapping[str, str]]]


async def assume_enrolled(namespace: str) -> Mapping[str, str]:
    """The lookup when the webhook configuration's namespaceSelector is the enrolment check (Istio's
    model): being called means the namespace is enrolled, or the pod asked with its label."""
    return ENROLLED


class ReviewError(Exception):
    """The request body is not an AdmissionReview v1 with a request: answered 400, not reviewed."""


def parse_review(body: bytes) -> dict[str, Any]:
    """The `request` of an AdmissionReview v1 body (ReviewError when it is not one)."""
    try:
        review = json.loads(body)
    except ValueError as exc:
        raise ReviewError(f"body is not JSON: {exc}") from None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise ReviewError("body is not an AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise ReviewError(f"AdmissionReview apiVersion must be {API_VERSION}, not {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise ReviewError("AdmissionReview has no request with a uid")
    return request


def review_response(uid: str, allowed: bool, *, message: str = "", code: int = 400,
                    patch: list[dict[str, Any]] | None = None, warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    """An AdmissionReview v1 response body."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": code, "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = encode_patch(patch)
    if warnings:
        response["warnings"] = list(warnings)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


class Webhooks:
    """The handlers, with the settings and the namespace lookup they need."""

    def __init__(self, settings: InjectSettings, namespace_labels: NamespaceLabels = assume_enrolled,
                 metrics: WebhookMetrics | None = None,
                 mesh_metadata: Callable[[], Mapping[str, str]] = dict) -> None:
        """`metrics`: where reviews are counted (a registry of their own when not given).
        `mesh_metadata()`: the mesh config's `defaultConfig.proxyMetadata` now (asked per pod, so a
        ConfigMap edit applies to the next pod, as in Istio)."""
        self.settings = settings
        self.namespace_labels = namespace_labels
        self.metrics = metrics or WebhookMetrics(CollectorRegistry())
        self.mesh_metadata = mesh_metadata

    async def review_pod(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The response for one pod admission request."""
        uid = str(request["uid"])
        kind = request.get("kind") or {}
        pod = request.get("object")
        if (kind.get("group"), kind.get("kind")) != ("", "Pod") or request.get("operation") != "CREATE" \
                or not isinstance(pod, dict):
            return review_response(uid, True)
        namespace = str(request.get("namespace") or "default")
        before = copy.deepcopy(pod)
        meta = before.setdefault("metadata", {})
        if not meta.get("namespace"):
            meta["namespace"] = namespace
        try:
            labels = await self.namespace_labels(namespace)
        except Exception as exc:  # the API server may be briefly unreachable: refuse, it retries
            log.warning("injector: cannot read the labels of namespace %s: %r", namespace, exc)
            self.metrics.injection_failure.inc()
            return review_response(uid, False, code=500, message=f"injector: cannot read namespace {namespace}: {exc}")
        decision = decide(before, self.settings, labels)
        if not decision.inject:
            self.metrics.injection_skip.inc()
        try:
            after = inject(before, self.settings, labels, mesh_metadata=self.mesh_metadata())
        except InjectionError as exc:
            log.info("injector: refused: %s", exc)
            self.metrics.injection_failure.inc()
            return review_response(uid, False, message=str(exc))
        ops = pod_patch(before, after)
        log.info("injector: %s/%s: %s (%s)", namespace, _pod_name(pod),
                 "injected" if ops else "not injected", decision.reason)
        return review_response(uid, True, patch=ops)

    async def handle_inject(self, request: web.Request) -> web.Response:
        """`POST /inject`."""
        metrics, began = self.metrics, time.perf_counter()
        metrics.injection_requests.inc()
        try:
            try:
                review = parse_review(await request.read())
            except ReviewError as exc:
                metrics.injection_failure.inc()
                raise web.HTTPBadRequest(text=str(exc)) from None
            response = web.json_response(await self.review_pod(review))
            metrics.injection_success.inc()
            return response
        finally:
            metrics.injection_time.observe(time.perf_counter() - began)

    async def handle_validate(self, request: web.Request) -> web.Response:
        """`POST /validate`."""
        try:
            review = parse_review(await request.read())
        except ReviewError as exc:
            self.metrics.validation_http_error.inc("400")
            raise web.HTTPBadRequest(text=str(exc)) from None
        verdict = review_object(review)
        if verdict.failure is not None:
            self.metrics.validated(review, verdict.failure)
        if not verdict.allowed:
            log.info("validation: refused: %s", verdict.message)
        return web.json_response(review_response(str(review["uid"]), verdict.allowed, message=verdict.message,
                                                  warnings=verdict.warnings))

    async def handle_ready(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def application(self) -> web.Application:
        """The aiohttp application serving the three paths."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/inject", self.handle_inject)
        app.router.add_post("/validate", self.handle_validate)
        app.router.add_get("/ready", self.handle_ready)
        return app


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("name") or f"{meta.get('generateName', '')}*")
