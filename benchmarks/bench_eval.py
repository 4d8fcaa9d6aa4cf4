"""Exact retrieval evaluation vs the bare similarity matmul, SOP-sized: a thin wrapper of ``raml bench eval``.

Usage: ``python benchmarks/bench_eval.py [--num-images N] [--dim D] [--num-classes C] [--seed S] [--json PATH]``
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from raml.bench.eval import main
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from raml.bench.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
