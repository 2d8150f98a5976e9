"""The benchmarks: each script runs as a module from the repository root, so that bench/ and the toolkit import
as packages (`.venv/bin/python -m bench.bench_dedup`, `make bench` for all); results in docs/BENCHMARKS.md."""
