"""Envoy v3 resource type URLs and the order in which they are pushed.

The order is the xDS "make before break" order: clusters before the endpoints that
fill them, listeners before the routes they name, route configurations before the virtual
hosts they take over VHDS.
"""

from typing import Final

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Virtual hosts of route configurations that name VHDS (delta xDS only; `pilot.translate.vhds`).
VIRTUAL_HOST: Final = "type.googleapis.com/envoy.config.route.v3.VirtualHost"

PUSH_ORDER: Final = (CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST, SECRET)

# LDS and CDS are wildcard types: an empty subscription means "everything". So is VHDS: Envoy
# subscribes to it with no names and takes whatever virtual hosts the server sends.
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER, VIRTUAL_HOST})
# Types whose removals go in the response with the updates that replace them, not after every
# update was ACKed (make before break): nothing refers to a virtual host, and a domain moving from
# one virtual host to another would otherwise be held twice, which Envoy refuses (domains are
# unique in a route configuration).
REMOVED_WITH_UPDATES: Final = frozenset({VIRTUAL_HOST})
# In SotW, an LDS or CDS response carries the whole subscribed set, wildcard or named: a resource
# left out is removed by the proxy. EDS and RDS responses may carry only what changed.
FULL_STATE_TYPES: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", VIRTUAL_HOST: "VHDS",
                      SECRET: "SDS"}


def short_name(type_url: str) -> str:
    """The familiar three-letter name of a type (CDS, EDS, ...) or the URL's last part.

    Called a few times per response written (metrics, push tracking): a known type costs one
    lookup, without splitting the URL for a default that is not used."""
    found = SHORT_NAMES.get(type_url)
    return found if found is not None else type_url.rsplit(".", 1)[-1]
