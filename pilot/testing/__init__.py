"""Test helpers shipped with pilot, for users' tests and ours: an in-process ADS client."""
