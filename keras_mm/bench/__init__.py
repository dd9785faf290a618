"""Benchmarks behind ``kmm bench``; each module has ``run(argv) -> dict`` (printed as JSON)."""
