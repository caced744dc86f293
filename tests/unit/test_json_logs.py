"""Structured logs: one JSON object per line, the change id on every line of a change's handling,
and no key material in any line."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pilot.app import Pilot
from pilot.logs import change_id, configure, redact
from pilot.settings import PilotSettings

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {name}}}}}
"""


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure("info", "json", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_every_line_is_json_and_a_changes_lines_carry_its_id(json_log: io.StringIO, tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SERVICE.format(name="a"))
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20, debounce_ms=20,
                             file_settle_ms=50)
    async with Pilot(settings) as pilot:
        first = pilot.changes.push_status()["change_id"]
        (tmp_path / "b.yaml").write_text(SERVICE.format(name="b"))
        (tmp_path / "c.yaml").write_text("kind: VirtualService\nmetadata: {name: bad}\nspec: {hosts: 3}\n")
        for _ in range(100):
            second = pilot.changes.push_status()["change_id"]
            if second != first and any(e["change_id"] == second for e in lines(json_log)):
                break
            await asyncio.sleep(0.05)
    entries = lines(json_log)
    assert entries and all(set(e) >= {"time", "level", "logger", "message", "change_id"} for e in entries)
    assert all(e["time"].endswith("+00:00") and e["level"] in ("INFO", "WARNING", "ERROR") for e in entries)
    built = [e for e in entries if e["logger"] == "pilot.push" and "mesh built" in e["message"]]
    assert [e["change_id"] for e in built][:2] == [first, second]  # each push's line names its change
    assert second != first


def test_secrets_never_reach_a_log_line(json_log: io.StringIO) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    body = pem.splitlines()[1]  # a line of the key material
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJlLWJ5dGVz"
    log = logging.getLogger("pilot.credentials")
    log.warning("credential default/gw-cert: loaded key %s", pem)
    log.warning("workload token=%s password: hunter22 Authorization: Bearer abcdefgh12345678", token)
    try:
        raise ValueError(f"bad secret {pem}")
    except ValueError:
        log.exception("secret default/gw-cert rejected")
    text = json_log.getvalue()
    entries = lines(json_log)
    assert len(entries) == 3
    for secret in (body, token, "hunter22", "abcdefgh12345678"):
        assert secret not in text
    assert "gw-cert" in entries[0]["message"] and "[REDACTED]" in entries[0]["message"]
    assert "ValueError" in entries[2]["exception"] and body not in entries[2]["exception"]


def test_redact_keeps_ordinary_text() -> None:
    line = "revision 4: mesh built in 3.1 ms, 2 classes generated and published"
    assert redact(line) == line
    assert redact("tls.key: abc") == "tls.key: [REDACTED]"


def test_text_format_names_the_change() -> None:
    def log_in_and_out_of_a_change() -> None:
        token = change_id.set("0123abcd")
        logging.getLogger("pilot.push").info("hello")
        change_id.reset(token)
        logging.getLogger("pilot.push").info("outside")

    stream = io.StringIO()
    root_level = logging.getLogger().level
    handler = configure("info", "text", stream)
    try:
        contextvars.Context().run(log_in_and_out_of_a_change)  # a context no change id was set in
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(root_level)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO pilot.push: hello [change 0123abcd]") and second.endswith("pilot.push: outside")
