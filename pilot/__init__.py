"""Pilot: turns mesh configuration into Envoy xDS and streams it to every proxy."""
