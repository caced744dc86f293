"""The workload agent against a real CSR server over TLS on 127.0.0.1, serving SDS on a real Unix socket.

Every SDS exchange goes through a real gRPC client over the agent's socket (`citadel.agent.testing`),
speaking Envoy's discovery messages; certificates are checked with real X.509 path validation.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from citadel.agent import AgentSettings, WorkloadAgent
from citadel.agent.credential import (
    Backoff,
    CertificateResponseError,
    WorkloadCredential,
    accept_response,
    new_request,
    renewal_delay,
)
from citadel.agent.metrics import AgentMetrics
from citadel.agent.sds import DeltaStream, SDSError, SotwStream, prepare_socket_path
from citadel.agent.secrets import ROOT_SECRET, SECRET_TYPE_URL, WORKLOAD_SECRET, SecretStore
from citadel.agent.testing import SDSStream, decode, names_of
from citadel.app import Citadel
from citadel.ca import CABundle, sign_workload
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, cert_pem, certs_pem, fingerprint, private_key_pem, same_public_key
from citadel.settings import CitadelSettings
from citadel.testing import write_cacerts
from tests.unit.test_citadel_ca import verify_with_cryptography, verify_with_openssl

TD = "cluster.local"
CART = SpiffeId(TD, "shop", "cart")
REPO = Path(__file__).resolve().parents[2]
GUARD = 30.0  # seconds a condition may take before a test fails instead of hanging


def citadel_settings(tmp: Path, ttl: timedelta = timedelta(hours=1), port: int = 0) -> CitadelSettings:
    return CitadelSettings(ca_dir=tmp / "ca", grpc_port=port, workload_cert_ttl=ttl,
                           max_workload_cert_ttl=timedelta(hours=48), check_interval=timedelta(hours=1))


@dataclass
class Mesh:
    """A running CA, a workload token and a short socket directory for one test."""

    tmp: Path
    sockets: Path
    citadel: Citadel
    ttl: timedelta

    @property
    def port(self) -> int:
        return self.citadel.port

    def roots_file(self) -> Path:
        path = self.tmp / "root-cert.pem"
        path.write_text(certs_pem(self.citadel.ca.trust_bundle()))
        return path

    def token_file(self, namespace: str = "shop", service_account: str = "cart") -> Path:
        path = self.tmp / f"token-{namespace}-{service_account}"
        self.citadel.issue_workload_token(path, namespace, service_account)
        return path

    def agent_settings(self, **kw: object) -> AgentSettings:
        base: dict[str, object] = {
            "namespace": "shop", "service_account": "cart", "ca_address": f"127.0.0.1:{self.port}",
            "ca_root_file": self.roots_file(), "token_file": self.token_file(),
            "sds_socket": self.sockets / "sds.sock", "backoff_initial": timedelta(milliseconds=100),
            "backoff_max": timedelta(milliseconds=500)}
        return AgentSettings(**(base | kw))  # type: ignore[arg-type]

    async def restart_citadel(self) -> None:
        """A new CA process on the same port and directory (the same root)."""
        self.citadel = Citadel(citadel_settings(self.tmp, self.ttl, self.port), CollectorRegistry())
        await self.citadel.start()


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path may exceed the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="agent-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=[timedelta(hours=1)])
async def mesh(request: pytest.FixtureRequest, tmp_path: Path, sockets: Path) -> AsyncIterator[Mesh]:
    ttl: timedelta = request.param
    running = Citadel(citadel_settings(tmp_path, ttl), CollectorRegistry())
    await running.start()
    state = Mesh(tmp_path, sockets, running, ttl)
    try:
        yield state
    finally:
        await state.citadel.stop()


def short_ttl(seconds: float) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("mesh", [timedelta(seconds=seconds)], indirect=True)


async def eventually(check: Callable[[], bool] | Callable[[], Awaitable[bool]], what: str,
                     timeout: float = GUARD) -> None:
    """Poll `check` until true; fail naming `what` after the guard timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.05)


def metric(agent: WorkloadAgent, registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def served_serial(agent: WorkloadAgent) -> int:
    assert agent.credential is not None
    return agent.credential.leaf.serial_number


async def fetch(socket_path: Path) -> discovery_pb2.DiscoveryResponse:
    """FetchSecrets for both secrets."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        call = channel.unary_unary("/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
                                   request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                   response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL,
                                                 resource_names=[WORKLOAD_SECRET, ROOT_SECRET])
        response: discovery_pb2.DiscoveryResponse = await call(request, timeout=10)
        return response


# --- the pure core ---------------------------------------------------------------------------------


def test_renewal_is_about_half_of_the_remaining_lifetime_with_jitter(tmp_path: Path) -> None:
    key, _ = new_request(CART, KeyAlgorithm.ECDSA_P256)

    plugged = write_cacerts(tmp_path / "cacerts")
    now = datetime.now(UTC).replace(microsecond=0)
    bundle = CABundle(plugged.ca_key, plugged.ca_cert, (plugged.ca_cert,), (plugged.root,))
    leaf = sign_workload(bundle, key.public_key(), CART, timedelta(hours=24), now)
    chain = [cert_pem(leaf), cert_pem(plugged.ca_cert), cert_pem(plugged.root)]
    credential = accept_response(CART, key, chain, now)
    assert credential.chain == (leaf, plugged.ca_cert) and credential.roots == (plugged.root,)
    rng = random.Random(7)
    delays = [renewal_delay(credential, now, 0.5, 0.05, rng) for _ in range(500)]
    # Measured from receipt, not the backdated notBefore: 12 h +/- 5%, and not all the same.
    assert all(timedelta(hours=11.4) <= d <= timedelta(hours=12.6) for d in delays)
    assert len(set(delays)) > 100
    assert renewal_delay(credential, now + timedelta(hours=13), 0.5, 0.05, rng) == timedelta(0)


def test_the_ca_answer_is_checked_against_what_was_asked(tmp_path: Path) -> None:
    plugged = write_cacerts(tmp_path / "cacerts")
    now = datetime.now(UTC)
    bundle = CABundle(plugged.ca_key, plugged.ca_cert, (plugged.ca_cert,), (plugged.root,))
    key, _ = new_request(CART, KeyAlgorithm.ECDSA_P256)
    other_key, _ = new_request(CART, KeyAlgorithm.ECDSA_P256)
    rest = [cert_pem(plugged.ca_cert), cert_pem(plugged.root)]
    cases = {
        r"are not \[spiffe://cluster.local/ns/shop/sa/cart\]":
            [cert_pem(sign_workload(bundle, key.public_key(), SpiffeId(TD, "shop", "other"), timedelta(hours=1),
                                    now)), *rest],
        "not for the key": [cert_pem(sign_workload(bundle, other_key.public_key(), CART, timedelta(hours=1), now)),
                            *rest],
        "no root": [cert_pem(sign_workload(bundle, key.public_key(), CART, timedelta(hours=1), now)),
                    cert_pem(plugged.ca_cert)],
        "not PEM": ["garbage"],
        "empty": [],
    }
    for message, chain in cases.items():
        with pytest.raises(CertificateResponseError, match=message):
            accept_response(CART, key, chain, now)


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(timedelta(seconds=1), timedelta(seconds=8))
    rng = random.Random(1)
    delays = [backoff.next_delay(rng) for _ in range(6)]
    caps = [1, 2, 4, 8, 8, 8]
    assert all(timedelta(seconds=c) / 2 <= d <= timedelta(seconds=c) for d, c in zip(delays, caps, strict=True))
    backoff.reset()
    assert backoff.next_delay(rng) <= timedelta(seconds=1)


def test_socket_path_limits_and_stale_sockets(sockets: Path) -> None:
    with pytest.raises(ValueError, match=r"sds_socket .* longer than 107 bytes"):
        AgentSettings(namespace="a", service_account="b", ca_root_file=Path("r"), token_file=Path("t"),
                      sds_socket=sockets / ("x" * 120))
    path = sockets / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed agent leaves
    prepare_socket_path(path)
    assert not path.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(SDSError, match="another process is serving"):
            prepare_socket_path(path)
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(SDSError, match="exists and is not a socket"):
        prepare_socket_path(path)


# --- against the real CSR server --------------------------------------------------------------------


async def test_obtains_a_certificate_for_its_identity_and_serves_it_over_sds(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, registry) as agent:
        await asyncio.wait_for(agent.ready.wait(), GUARD)
        assert stat.S_IMODE(settings.sds_socket.stat().st_mode) == 0o600
        async with SDSStream(settings.sds_socket) as sds:
            await sds.subscribe(WORKLOAD_SECRET, ROOT_SECRET)
            response = await sds.read()
        assert response.type_url == SECRET_TYPE_URL and response.nonce and response.version_info
        assert sorted(names_of(response)) == [ROOT_SECRET, WORKLOAD_SECRET]
        served = decode(list(response.resources))
        leaf = served.chain[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(n.value) for n in san] == [CART.uri]
        assert served.key is not None and same_public_key(served.key.public_key(), leaf.public_key())
        assert served.roots == list(mesh.citadel.ca.trust_bundle())
        assert all(c not in served.roots for c in served.chain)  # chain: leaf (+ intermediates), no root
        verify_with_cryptography(served.chain, served.roots, datetime.now(UTC))
        verify_with_openssl(mesh.tmp, served.chain, served.roots)
        assert metric(agent, registry, "citadel_agent_certificates_issued_total") == 1
        assert metric(agent, registry, "citadel_agent_cert_expiry_timestamp") == leaf.not_valid_after_utc.timestamp()
        key_pem = private_key_pem(served.key)
    # The key never reached a file: nothing under the test's directories holds it.
    for root in (mesh.tmp, mesh.sockets):
        for path in root.rglob("*"):
            if path.is_file():
                assert key_pem.strip().splitlines()[1] not in path.read_bytes(), path
    assert not settings.sds_socket.exists()  # removed on stop


async def test_sotw_ack_nack_stale_nonce_and_subscription_changes(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, registry) as agent, SDSStream(settings.sds_socket) as sds:
        # Envoy opens a stream per secret; here one stream subscribes to `default`, then adds `ROOTCA`.
        await sds.subscribe(WORKLOAD_SECRET)
        first = await sds.read()
        assert names_of(first) == [WORKLOAD_SECRET]
        await sds.ack(first, WORKLOAD_SECRET)
        await sds.ack(first, WORKLOAD_SECRET, ROOT_SECRET)  # a new name: answered with both
        both = await sds.read()
        assert sorted(names_of(both)) == [ROOT_SECRET, WORKLOAD_SECRET] and both.nonce != first.nonce
        await sds.ack(both, WORKLOAD_SECRET, ROOT_SECRET)
        # A stale nonce changes nothing, even with other names.
        await sds.subscribe("unknown", version="x", nonce=first.nonce)
        await eventually(lambda: bool(agent.sds.streams) and agent.sds.streams[0].names == {WORKLOAD_SECRET,
                                                                                          ROOT_SECRET},
                         "the stream keeps its subscription")
        # The ACKs above caused no resend: the next response is the renewal's, with a new certificate.
        old = decode(list(both.resources)).chain[0]
        await agent.obtain()
        renewed = await sds.read()
        new = decode(list(renewed.resources)).chain[0]
        assert new.serial_number != old.serial_number and renewed.version_info != both.version_info
        # ROOTCA is unchanged, but SotW answers with every subscribed secret.
        assert sorted(names_of(renewed)) == [ROOT_SECRET, WORKLOAD_SECRET]
        # A NACK is counted and logged, and the rejected versions are not sent again.
        await sds.nack(renewed, WORKLOAD_SECRET, ROOT_SECRET, message="Failed to load certificate chain")
        await eventually(lambda: metric(agent, registry, "citadel_agent_sds_nacks_total", secret=WORKLOAD_SECRET)
                         == 1, "the NACK is counted")
        assert metric(agent, registry, "citadel_agent_sds_nacks_total", secret=ROOT_SECRET) == 1
        await agent.obtain()
        after_nack = await sds.read()
        assert decode(list(after_nack.resources)).chain[0].serial_number not in {old.serial_number,
                                                                                 new.serial_number}
        assert metric(agent, registry, "citadel_agent_renewals_total") == 2


async def test_a_stream_opened_before_the_first_certificate_waits_for_it(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings(token_file=mesh.tmp / "not-yet")
    async with WorkloadAgent(settings, registry) as agent, SDSStream(settings.sds_socket) as sds:
        await sds.subscribe(ROOT_SECRET)
        await eventually(lambda: metric(agent, registry, "citadel_agent_csr_failures_total", reason="token") >= 1,
                         "a missing token file is a counted failure")
        assert agent.credential is None
        mesh.citadel.issue_workload_token(mesh.tmp / "not-yet", "shop", "cart")  # the token arrives
        response = await sds.read()
        assert names_of(response) == [ROOT_SECRET]
        assert decode(list(response.resources)).roots == list(mesh.citadel.ca.trust_bundle())


async def test_delta_sends_only_changed_or_newly_subscribed_secrets(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, registry) as agent:
        await asyncio.wait_for(agent.ready.wait(), GUARD)
        async with SDSStream(settings.sds_socket, delta=True) as sds:
            await sds.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE_URL,
                                                               resource_names_subscribe=[WORKLOAD_SECRET]))
            first = await sds.read()
            assert names_of(first) == [WORKLOAD_SECRET] and first.resources[0].version
            await sds.send(discovery_pb2.DeltaDiscoveryRequest(response_nonce=first.nonce,
                                                               resource_names_subscribe=[ROOT_SECRET]))
            roots = await sds.read()
            assert names_of(roots) == [ROOT_SECRET]
            await sds.send(discovery_pb2.DeltaDiscoveryRequest(response_nonce=roots.nonce))
            await agent.obtain()
            renewed = await sds.read()
            assert names_of(renewed) == [WORKLOAD_SECRET]  # the roots did not change
            assert renewed.resources[0].version != first.resources[0].version
        # A reconnecting client that already holds the current versions is sent nothing for them.
        versions = {WORKLOAD_SECRET: renewed.resources[0].version, ROOT_SECRET: roots.resources[0].version}
        async with SDSStream(settings.sds_socket, delta=True) as sds:
            await sds.send(discovery_pb2.DeltaDiscoveryRequest(
                type_url=SECRET_TYPE_URL, resource_names_subscribe=[WORKLOAD_SECRET, ROOT_SECRET],
                initial_resource_versions=versions))
            await agent.obtain()
            assert names_of(await sds.read()) == [WORKLOAD_SECRET]


async def test_a_wrong_type_url_ends_the_stream(mesh: Mesh) -> None:
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, CollectorRegistry()) as agent, SDSStream(settings.sds_socket) as sds:
        await asyncio.wait_for(agent.ready.wait(), GUARD)
        await sds.send(discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster", resource_names=["x"]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await sds.read()
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "field type_url" in str(raised.value.details())


async def test_an_identity_the_token_does_not_hold_is_refused_and_nothing_is_served(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings(token_file=mesh.token_file("shop", "payments"))
    async with WorkloadAgent(settings, registry) as agent:
        await eventually(lambda: metric(agent, registry, "citadel_agent_csr_failures_total", reason="rejected") >= 2,
                         "refusals are counted and retried")
        assert agent.credential is None
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fetch(settings.sds_socket)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


@short_ttl(3)
async def test_renews_before_expiry_with_a_short_ttl_and_pushes_each_certificate(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, registry) as agent, SDSStream(settings.sds_socket) as sds:
        await sds.subscribe(WORKLOAD_SECRET)
        seen: list[WorkloadCredential] = []
        while len(seen) < 3:
            response = await sds.read()
            await sds.ack(response, WORKLOAD_SECRET)
            assert agent.credential is not None
            seen.append(agent.credential)
        for old, new in itertools.pairwise(seen):
            assert new.leaf.serial_number != old.leaf.serial_number
            assert new.received_at < old.not_after  # renewed while the old one was still valid
            assert new.leaf.public_key() != old.leaf.public_key()  # a fresh key per certificate
        assert metric(agent, registry, "citadel_agent_renewals_total") >= 2


@short_ttl(4)
async def test_keeps_serving_while_the_ca_is_down_and_recovers_when_it_returns(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    async with WorkloadAgent(settings, registry) as agent, SDSStream(settings.sds_socket) as sds:
        await sds.subscribe(WORKLOAD_SECRET, ROOT_SECRET)
        first = await sds.read()
        await sds.ack(first, WORKLOAD_SECRET, ROOT_SECRET)
        serial = decode(list(first.resources)).chain[0].serial_number
        await mesh.citadel.stop()
        await eventually(lambda: metric(agent, registry, "citadel_agent_csr_failures_total",
                                        reason="unavailable") >= 3, "renewal attempts fail and are retried")
        # Still serving the same certificate to a new client, and nothing new was pushed.
        assert decode(list((await fetch(settings.sds_socket)).resources)).chain[0].serial_number == serial
        assert served_serial(agent) == serial
        assert agent.sds.streams[0].nacks == 0
        await mesh.restart_citadel()
        recovered = await sds.read()
        renewed = decode(list(recovered.resources))
        assert renewed.chain[0].serial_number != serial
        verify_with_cryptography(renewed.chain, renewed.roots, datetime.now(UTC))
        assert metric(agent, registry, "citadel_agent_renewals_total") >= 1


@short_ttl(2)
async def test_follows_a_root_rotation_and_pushes_the_new_trust_bundle(mesh: Mesh) -> None:
    registry = CollectorRegistry()
    settings = mesh.agent_settings()
    ca = mesh.citadel.ca
    old_root = ca.trust_bundle()[0]
    async with WorkloadAgent(settings, registry) as agent, SDSStream(settings.sds_socket) as sds:
        await sds.subscribe(ROOT_SECRET)

        async def roots_served() -> set[str]:
            response = await sds.read()
            await sds.ack(response, ROOT_SECRET)
            return {fingerprint(r) for r in decode(list(response.resources)).roots}

        assert await roots_served() == {fingerprint(old_root)}
        ca.introduce_root()
        new_root = ca.trust_bundle()[1]
        assert await roots_served() == {fingerprint(old_root), fingerprint(new_root)}
        ca.activate_root()  # the CA's serving certificate and new leaves move to the new root
        await eventually(lambda: agent.credential is not None
                         and agent.credential.chain[-1].issuer == new_root.subject, "a leaf of the new root")
        ca.retire_root(force=True)
        assert await roots_served() == {fingerprint(new_root)}
        assert agent.credential is not None
        verify_with_cryptography(list(agent.credential.chain), [new_root], datetime.now(UTC))


async def test_runnable_entry_serves_sds_and_stops_on_sigterm(mesh: Mesh) -> None:
    settings = mesh.agent_settings()
    args = [sys.executable, "-m", "citadel.agent", "--namespace", "shop", "--service-account", "cart",
            "--ca-address", settings.ca_address, "--ca-root-file", str(settings.ca_root_file),
            "--token-file", str(settings.token_file), "--sds-socket", str(settings.sds_socket)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCTL_AGENT_")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: ASYNC220
                            cwd=REPO)
    try:
        async def served() -> bool:
            try:
                response = await fetch(settings.sds_socket)
            except grpc.aio.AioRpcError:
                return False
            return sorted(names_of(response)) == [ROOT_SECRET, WORKLOAD_SECRET]

        await eventually(served, "the agent process serves both secrets")
        proc.send_signal(signal.SIGTERM)
        output = (await asyncio.to_thread(proc.communicate, timeout=GUARD))[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert not settings.sds_socket.exists()
    assert "certificate obtained" in output and CART.uri in output
    assert "PRIVATE KEY" not in output and settings.token_file.read_text() not in output


# --- the SDS state machines under random request sequences -------------------------------------------


@functools.cache
def _credentials() -> list[WorkloadCredential]:
    """Three certificates for CART from one plugged-in CA (built once: hypothesis calls the test many times)."""
    directory = Path(tempfile.mkdtemp(prefix="agent-creds-"))
    try:
        plugged = write_cacerts(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    now = datetime.now(UTC)
    bundle = CABundle(plugged.ca_key, plugged.ca_cert, (plugged.ca_cert,), (plugged.root,))
    out = []
    for _ in range(3):
        key, _csr = new_request(CART, KeyAlgorithm.ECDSA_P256)
        leaf = sign_workload(bundle, key.public_key(), CART, timedelta(hours=1), now)
        out.append(accept_response(CART, key, [cert_pem(leaf), cert_pem(plugged.ca_cert), cert_pem(plugged.root)],
                                   now))
    return out


NAMES = st.lists(st.sampled_from([WORKLOAD_SECRET, ROOT_SECRET, "file-root:x"]), max_size=3, unique=True)
STEPS = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 2)),
    st.tuples(st.just("request"), NAMES, st.sampled_from(["none", "latest", "old", "junk"]), st.booleans()),
), max_size=25)


@given(steps=STEPS, delta=st.booleans())
@hypothesis_settings(max_examples=150, deadline=None)
def test_random_request_sequences_keep_the_xds_rules(steps: list[tuple[object, ...]], delta: bool) -> None:
    """Never a crash, a fresh nonce per response, only subscribed names, and a new certificate always reaches
    a stream that subscribed to `default` (ACKed or NACKed, whatever came before)."""
    store = SecretStore()
    state: SotwStream | DeltaStream = (DeltaStream if delta else SotwStream)(
        store, AgentMetrics(CollectorRegistry()), "test")
    nonces: list[str] = []
    subscribed: set[str] = set()
    for step in steps:
        if step[0] == "publish":
            store.publish(_credentials()[int(step[1])])  # type: ignore[call-overload]
        else:
            _, names, which, nack = step
            nonce = {"none": "", "latest": nonces[-1] if nonces else "", "old": nonces[0] if nonces else "",
                     "junk": "nope"}[str(which)]
            error = status_pb2.Status(code=13, message="bad") if nack and nonce else None
            wanted = list(names)  # type: ignore[call-overload]
            if delta:
                gone = sorted(subscribed - set(wanted))
                state.handle(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=SECRET_TYPE_URL, resource_names_subscribe=wanted, resource_names_unsubscribe=gone,
                    response_nonce=nonce, error_detail=error))
                subscribed = set(wanted)
            else:
                state.handle(discovery_pb2.DiscoveryRequest(
                    type_url=SECRET_TYPE_URL, resource_names=wanted, response_nonce=nonce, error_detail=error))
                if not nonce or nonce == (nonces[-1] if nonces else ""):
                    subscribed = set(wanted)
        response = state.response()
        if response is not None:
            assert response.nonce not in nonces
            nonces.append(response.nonce)
            assert set(names_of(response)) <= subscribed
    # Whatever happened, a new certificate is pushed to a stream subscribed to `default`.
    if WORKLOAD_SECRET in subscribed:
        for credential in _credentials():
            if store.current and store.current[WORKLOAD_SECRET].version == _served_version(credential):
                continue
            store.publish(credential)
            response = state.response()
            assert response is not None and WORKLOAD_SECRET in names_of(response)
            break


def _served_version(credential: WorkloadCredential) -> str:
    probe = SecretStore()
    probe.publish(credential)
    return probe.current[WORKLOAD_SECRET].version
