"""Guarded background work: a failure is logged with context and counted, never lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)
T = TypeVar("T")


class TaskFailures:
    """Counts failures of background work by task name on the component's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter("pilot_task_failures", "failures of background work", ["task"], registry=registry)

    def record(self, name: str, exc: BaseException) -> None:
        self.counter.labels(name).inc()
        log.error("background task %s failed: %r", name, exc, exc_info=exc)


def spawn(name: str, factory: Callable[[], Awaitable[None]], failures: TaskFailures,
          restart_delay: float = 1.0) -> asyncio.Task[None]:
    """Run `factory()` as a task; if it fails, record it and start it again after a delay."""

    async def guarded() -> None:
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.record(name, exc)
                await asyncio.sleep(restart_delay)

    return asyncio.create_task(guarded(), name=name)
