"""Load benchmarks for pilot's ADS server: simulated Envoys against a real pilot process."""
