"""The workload agent: one per sidecar, it keeps the workload's private key and serves it to Envoy.

Shape (as the rest of citadel): a pure core (`credential`: key and CSR, checking the CA's answer,
renewal time, backoff; `secrets`: the Envoy `Secret`s `default` and `ROOTCA`; `credentials`: a
gateway's `credentialName` secrets from the local secret store), a thin SDS server
over a Unix socket (`sds`), the renewal loop (`agent`), and a runnable entry
(`python -m citadel.agent`, in `__main__`). Settings in `settings`, metrics in `metrics`.
"""

from citadel.agent.agent import WorkloadAgent
from citadel.agent.settings import AgentSettings

__all__ = ["AgentSettings", "WorkloadAgent"]
