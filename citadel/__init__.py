"""Citadel: the mesh CA (SPIFFE identities, CSR signing, root rotation) and the workload agent.

Shape (the same as pilot's): a pure core over `cryptography` objects (`identity`, `keys`, `ca`,
`rotation`, `tokens`, `csr`, `authn`) that tests call directly, thin stateful holders (`store`
persists the CA directory, `authority` holds the current signing state, `service` runs a request)
and a thin gRPC server (`server`, with `client`) speaking Istio's
`istio.v1.auth.IstioCertificateService`; `app` wires them from `settings`, `testing` helps tests.
The workload agent (`citadel.agent`) is a client of the CSR service and an SDS server for its Envoy.
Only `server`, `client` and `agent` import gRPC. Nothing in pilot imports citadel.
"""
