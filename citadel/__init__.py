"""Citadel: the mesh CA (SPIFFE identities, CSR signing) and the workload agent serving SDS.

Not built yet.
"""
