"""Docstring-only package: benchmarks that time raml against a baseline measured in the same run.

Each module exposes ``main(argv: list[str] | None = None) -> int`` (wired to ``raml bench <name>``) and a
``run_*_benchmark`` function returning a JSON-serialisable dict of the measurements.
"""
