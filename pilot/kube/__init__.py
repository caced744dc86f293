"""The Kubernetes side of pilot: API client, list+watch, the config source and the service registry.

`watch.Watch` is the one way objects come from the API server; `source.KubeSource` feeds the
mesh kinds into the same `ConfigStore` the file source uses; `registry*` (Services,
EndpointSlices, Pods) builds on the same watch.
"""
