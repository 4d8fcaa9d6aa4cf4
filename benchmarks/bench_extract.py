"""Extraction images/s against the reference's loader: a thin wrapper of ``raml bench extract``.

Usage: ``python benchmarks/bench_extract.py [--num-images N] [--sizes S ...] [--workers W] [--bf16] [--json PATH]``
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from raml.bench.extract import main
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from raml.bench.extract import main

if __name__ == "__main__":
    raise SystemExit(main())
