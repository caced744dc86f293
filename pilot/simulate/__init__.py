"""What Envoy would do with one request, computed from the xDS resources pilot generates.

`simulate(resources, request) -> Trace` walks Envoy's own decision steps on the proxy's listeners,
routes, clusters and endpoints: listener and filter chain, route configuration, virtual host,
first matching route, its action (cluster, weighted clusters, redirect, direct response) and the
filters that act on the way (RBAC, JWT requirement, fault, retry, timeout, mirror, upstream TLS).
Everything here is pure: resources are the JSON form of the protobufs (as `/debug/config_dump`
and Envoy's admin print them) and nothing is read from the network or the clock. A simulation
costs one pass over the chosen listener's routes; regexes are compiled by RE2, Envoy's engine.
"""

from pilot.simulate.request import Request, RequestError, parse_request
from pilot.simulate.resources import Resources
from pilot.simulate.trace import Trace, simulate

__all__ = ["Request", "RequestError", "Resources", "Trace", "parse_request", "simulate"]
