"""Citadel's CSR signing cost: throughput and p50/p99 latency, in-process and over gRPC/TLS.

    python -m benchmarks.csr_sign --requests 2000 --concurrency 16

For each case (the CA's key algorithm and the workload CSR's key algorithm) it measures:

- **core**: `CertificateAuthority.sign_csr` called in a loop (parse + CSR signature check + identity
  check + build and sign the leaf), one request at a time: what one CA core can sign per second;
- **grpc**: `CreateCertificate` over TLS on 127.0.0.1 against a running `Citadel` in the same
  process (its own event loop), `--concurrency` requests in flight on one channel, each with a
  workload token: what a caller sees, including authentication, protobuf and TLS framing.

CSRs (and their keys) are made before timing and reused round-robin: key generation is the
agent's cost, not the CA's. The load average before and after is printed, because the machine
may be shared. Figures are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import click
from prometheus_client import CollectorRegistry

from citadel.app import Citadel
from citadel.authority import CertificateAuthority
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, generate_key
from citadel.settings import CitadelSettings

CASES = [
    (KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P256),
    (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_2048),
    (KeyAlgorithm.RSA_2048, KeyAlgorithm.ECDSA_P256),
    (KeyAlgorithm.RSA_4096, KeyAlgorithm.RSA_2048),
]
IDENTITY = SpiffeId("cluster.local", "bench", "client")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(label: str, latencies: list[float], elapsed: float) -> None:
    print(f"  {label:<6} {len(latencies) / elapsed:9.0f} certs/s   p50 {statistics.median(latencies) * 1e3:7.2f} ms"
          f"   p99 {percentile(latencies, 0.99) * 1e3:7.2f} ms   ({len(latencies)} requests, {elapsed:.2f} s)")


def bench_core(ca: CertificateAuthority, csrs: list[str], requests: int) -> None:
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        ca.sign_csr(csrs[i % len(csrs)], 0, IDENTITY)
        latencies.append(time.perf_counter() - t0)
    report("core", latencies, time.perf_counter() - start)


async def bench_grpc(citadel: Citadel, csrs: list[str], requests: int, concurrency: int, token: str) -> None:
    latencies: list[float] = []
    async with CSRClient(f"127.0.0.1:{citadel.port}", certs_pem(citadel.ca.trust_bundle()).encode()) as client:
        await client.create_certificate(csrs[0], 0, token=token)  # TLS handshake outside the timing
        next_index = iter(range(requests))

        async def worker() -> None:
            for i in next_index:
                t0 = time.perf_counter()
                await client.create_certificate(csrs[i % len(csrs)], 0, token=token)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report("grpc", latencies, time.perf_counter() - start)


async def run_case(ca_algorithm: KeyAlgorithm, leaf_algorithm: KeyAlgorithm, requests: int, concurrency: int,
                   pool: int) -> None:
    csrs = [build_csr(generate_key(leaf_algorithm), []) for _ in range(pool)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = CitadelSettings(ca_dir=Path(tmp) / "ca", grpc_port=0, key_algorithm=ca_algorithm)
        citadel = Citadel(settings, CollectorRegistry())
        print(f"CA key {ca_algorithm}, workload key {leaf_algorithm}")
        bench_core(citadel.ca, csrs, requests)
        token = citadel.issue_workload_token(Path(tmp) / "token", IDENTITY.namespace, IDENTITY.service_account,
                                             timedelta(hours=1))
        async with citadel:
            await bench_grpc(citadel, csrs, requests, concurrency, token)



@click.command()
@click.option("--requests", default=2000, show_default=True, help="requests per case and mode")
@click.option("--concurrency", default=16, show_default=True, help="gRPC requests in flight")
@click.option("--pool", default=20, show_default=True, help="distinct CSRs (keys) reused round-robin")
def main(requests: int, concurrency: int, pool: int) -> None:
    """Print CSR signing throughput and latency for each CA/workload key case."""
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}  (cores: {os.cpu_count()})")

    async def all_cases() -> None:
        for ca_algorithm, leaf_algorithm in CASES:
            await run_case(ca_algorithm, leaf_algorithm, requests, concurrency, pool)

    asyncio.run(all_cases())
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
