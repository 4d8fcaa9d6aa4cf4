"""``python -m raml`` (also the entry point that ``torchrun -m raml`` uses)."""

from raml.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
