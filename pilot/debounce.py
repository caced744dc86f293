"""The debounce: how long a push waits for config changes to settle, and which wait applies.

Istio batches config events the same way (`PILOT_DEBOUNCE_AFTER`, 100 ms by default): a push
waits until no change came for the quiet time, and never longer than a maximum delay while changes
keep coming (`debounce_max_ms`). A burst of edits (a `kubectl apply` of many objects) then costs
one push, not one per object. Endpoint moves (WorkloadEntry, a Kubernetes Service's ready
endpoints) take a shorter quiet time of their own (`endpoint_debounce_ms`), as they reach proxies
over the EDS fast path and a scale-up should not wait out the batching meant for rule edits.

Pure policy around the store's change event: the pusher (`pilot.push.Pusher.run`) calls
`settle` once per push. Cost: one wait per change that arrives during it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

# Kinds whose changes only move endpoints (EDS), eligible for the short debounce: WorkloadEntry,
# and the ready endpoints of a Kubernetes Service (`pilot.kube.registry.ServiceEndpoints`).
ENDPOINT_KINDS = frozenset({"WorkloadEntry", "ServiceEndpoints"})


async def settle(store: Any, built_revision: int, revision: int, *, quiet: float, endpoint_quiet: float,
                 longest: float) -> tuple[int, bool]:
    """Wait until no change came for the quiet time, or `longest` seconds passed.

    `store` is the config store (`kinds_changed_since`, `wait_for_change`), `built_revision` the
    revision the last push was built from and `revision` the last one seen. While every change
    since that build is to `ENDPOINT_KINDS`, the quiet time is `endpoint_quiet`, else `quiet`.
    Returns the last revision seen and whether the push went with the endpoint quiet time.
    """
    deadline = time.monotonic() + longest
    while (left := deadline - time.monotonic()) > 0:
        kinds = store.kinds_changed_since(built_revision)
        fast = kinds is not None and kinds <= ENDPOINT_KINDS
        try:
            async with asyncio.timeout(min(endpoint_quiet if fast else quiet, left)):
                revision = await store.wait_for_change(revision)
        except TimeoutError:
            return revision, fast
    return revision, False
