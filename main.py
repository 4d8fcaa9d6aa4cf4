#!/usr/bin/env python
"""The reference's ``python main.py ...`` command, kept verbatim: a thin shim over ``raml train``."""

import sys
from pathlib import Path

try:
    from raml.cli.main import main
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from raml.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
