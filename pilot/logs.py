"""Pilot's log lines: plain text for people, or one JSON object per line for log pipelines.

Every line logged while pilot handles a config change carries that change's id (`change_id`,
a context variable: the pusher sets it for the build, generate and publish of one change, and
asyncio copies it into the worker thread that builds the mesh and into tasks started meanwhile),
so `jq 'select(.change_id == "...")'` gives one change's whole story, and the same id is the
`meshctl.change_id` attribute of its trace.

Secrets never reach a log line: messages and exception text pass through `redact`, which masks
PEM blocks, JWTs, bearer tokens and `key=value` pairs whose key names a secret.

Cost: a context-variable read per line; JSON formatting is `json.dumps` of a small dict.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

# The id of the config change being handled in this context ("" outside one).
change_id: ContextVar[str] = ContextVar("change_id", default="")

REDACTED = "[REDACTED]"
_SECRETS = (
    re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.DOTALL),  # PEM keys, certificates
    re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # JWTs (service-account tokens)
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}"),
)
_SECRET_PAIRS = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret|token|private[_-]?key|tls\.key|key[_-]?material|credential)s?)"
    r"(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)")


def redact(text: str) -> str:
    """`text` with key material and credentials masked: PEM blocks, JWTs, bearer tokens, secret=value."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: f"{m[1]} {REDACTED}" if m.re.groups == 1 else REDACTED, text)
    return _SECRET_PAIRS.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)


class ChangeIdFilter(logging.Filter):
    """Stamps each record with the current change id (`record.change_id`) and masks secrets in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.change_id = change_id.get()
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger, message, change_id, and the
    exception (redacted) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "change_id": getattr(record, "change_id", "") or change_id.get(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`meshctl up`'s classic line, with `[change <id>]` when the line belongs to a change."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        cid = getattr(record, "change_id", "")
        if record.exc_info:
            line = redact(line)
        return f"{line} [change {cid}]" if cid else line


def configure(level: str = "info", fmt: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """Install one handler on the root logger (replacing any from an earlier call); returns it.

    Called once by `meshctl up` before pilot starts; tests call it with their own stream.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ChangeIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_meshctl", False)]:
        root.removeHandler(old)
    handler._meshctl = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def announce(text: str) -> None:
    """A line for the operator (`meshctl up`'s "pilot: xDS on ..." banner) on stderr: a log record
    (logger `meshctl`) when JSON logs are on, so every line stays one JSON object; else the text."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("meshctl").info(text)
    else:
        print(text, file=sys.stderr, flush=True)
