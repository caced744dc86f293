"""Generated protobuf messages of Istio's certificate service (see `istio_ca.proto` for how to regenerate)."""
