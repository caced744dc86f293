"""Mixer: request-time policy (ext_authz), quotas (rate-limit service) and telemetry intake.

Not built yet; ALLOW/DENY AuthorizationPolicy will compile to Envoy RBAC in pilot instead.
"""
