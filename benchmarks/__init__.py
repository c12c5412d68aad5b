"""Throughput and memory benchmarks (GPU); see benchmarks/README.md."""
