"""Benchmarks of numareuse against baselines measured in the same run: `make bench` runs bench.run."""
