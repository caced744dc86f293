"""Envoy retry policies as Istio builds them, including Istio's default when ``retries`` is absent.

Istio's default (``pilot/pkg/networking/core/route/retry``, current release 1.30): 2 retries on
``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`` with *no*
retriable status code (since Istio 1.24 an HTTP 503 is not retried by default: the app may have
acted on the request), preferring hosts not tried yet (5 host selection attempts). A route whose
lone destination hashes (DestinationRule ``consistentHash``) gets no previous-hosts predicate, so
a retry stays on the hashed host. ``attempts: 0`` disables retries. Numbers in ``retryOn`` are
status codes: they go to ``retriable_status_codes`` and turn on ``retriable-status-codes``.
Inbound routes (to the local app) retry only ``reset-before-request`` twice (Istio 1.24): a
request the app never saw is safe to resend, whatever its method.
"""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2 as pp_pb2

from pilot.model import mesh as m

DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_ATTEMPTS = 2
INBOUND_RETRY_ON = "reset-before-request"
HOST_SELECTION_ATTEMPTS = 5
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
RETRIABLE_STATUS_CODES = "retriable-status-codes"


def parse_retry_on(text: str) -> tuple[str, tuple[int, ...]]:
    """``"5xx,503,reset"`` -> (``"5xx,reset,retriable-status-codes"``, (503,))."""
    conditions: list[str] = []
    codes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if part.isascii() and part.isdigit():
            codes.append(int(part))
        elif part:
            conditions.append(part)
    if codes and RETRIABLE_STATUS_CODES not in conditions:
        conditions.append(RETRIABLE_STATUS_CODES)
    return ",".join(conditions), tuple(codes)


def _previous_hosts() -> Any:
    predicate = rc.RetryPolicy.RetryHostPredicate(name=PREVIOUS_HOSTS)
    predicate.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    return predicate


def default_retry_policy(consistent_hash: bool = False) -> Any:
    """Istio's default policy; without the previous-hosts predicate when the route hashes."""
    policy = rc.RetryPolicy(retry_on=DEFAULT_RETRY_ON)
    policy.num_retries.value = DEFAULT_ATTEMPTS
    if not consistent_hash:
        policy.retry_host_predicate.append(_previous_hosts())
    policy.host_selection_retry_max_attempts = HOST_SELECTION_ATTEMPTS
    return policy


def inbound_retry_policy() -> Any:
    """Istio's inbound default: resend a request reset before it reached the app, twice."""
    policy = rc.RetryPolicy(retry_on=INBOUND_RETRY_ON)
    policy.num_retries.value = DEFAULT_ATTEMPTS
    return policy


def retry_policy(retries: m.Retries | None, consistent_hash: bool = False) -> Any | None:
    """The route's retry policy: Istio's default when absent, None when ``attempts`` is 0.

    ``consistent_hash``: the route has one destination and its DestinationRule hashes.
    """
    if retries is None:
        return default_retry_policy(consistent_hash)
    if retries.attempts <= 0:
        return None
    policy = default_retry_policy(consistent_hash)
    policy.num_retries.value = retries.attempts
    if retries.retry_on:
        conditions, codes = parse_retry_on(retries.retry_on)
        policy.retry_on = conditions
        policy.retriable_status_codes.extend(codes)
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.FromTimedelta(retries.per_try_timeout)
    if retries.retry_ignore_previous_hosts is not None:  # explicit: Istio honours it either way
        del policy.retry_host_predicate[:]
        if retries.retry_ignore_previous_hosts:
            policy.retry_host_predicate.append(_previous_hosts())
    if retries.retry_remote_localities:
        priority = policy.retry_priority
        priority.name = PREVIOUS_PRIORITIES
        priority.typed_config.Pack(pp_pb2.PreviousPrioritiesConfig(update_frequency=2))
    if retries.backoff is not None:
        policy.retry_back_off.base_interval.FromTimedelta(retries.backoff)
    return policy
