"""Benchmarks of kvm-borg against plain command sequences (not part of the test suite)."""
