"""Pure xDS generators: `generate(mesh, proxy_class)` -> resources by type URL and name.

Generators read only their arguments (no globals, clock or environment), so a snapshot cache
keyed by ProxyClass is exact. This package imports no gRPC and no Kubernetes client.
"""

from pilot.translate.generate import (
    Parts,
    Resources,
    generate,
    generate_endpoints,
    generate_parts,
    generate_routes,
)

__all__ = ["Parts", "Resources", "generate", "generate_endpoints", "generate_parts", "generate_routes"]
