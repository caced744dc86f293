"""Envoy runtime values meshctl's bootstrap sets, which API validation must hold config to.

A leaf module (no imports) so that the bootstrap, which every `meshctl proxy run` renders, does not
load the API models to learn one number.
"""

# Envoy refuses a regex whose compiled RE2 program is larger than the runtime value
# `re2.max_program_size.error_level` (100 by default, source/common/common/regex.cc). Istio's
# bootstrap raises it to 32768, and so does meshctl's (`pilot.bootstrap.layered_runtime`): every
# sidecar and gateway applies this number.
ENVOY_RE2_MAX_PROGRAM_SIZE = 32768
