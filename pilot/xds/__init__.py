"""xDS delivery: serialized snapshots, the snapshot cache, the ADS server and proxy status."""
