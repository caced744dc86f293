"""How a `meshctl proxy` command runs its sidecar until told to stop (local mesh and Pod alike).

Why one place: both commands end the same way: SIGINT or SIGTERM (Ctrl-C, or the kubelet
stopping the Pod) cancels the command's main task, which then stops Envoy and the agent through
their context managers and says so in one line; an Envoy that failed is a `ClickException`
carrying its log tail, not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import click

from meshctl.envoy import EnvoyError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def until_stopped(node_id: str) -> Iterator[None]:
    """Run the block until a stop signal cancels the current task (then print "<node_id>: stopped").

    The signal handlers exist only inside the block. An `EnvoyError` leaves as a `ClickException`.
    """
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("until_stopped must be entered from a task")
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    except asyncio.CancelledError:
        click.echo(f"{node_id}: stopped", err=True)
    except EnvoyError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
