"""``python -m raml`` (also the entry point that ``torchrun -m raml`` uses)."""

import sys

from raml.cli.main import main

if __name__ == "__main__":
    code = main()
    if "raml.distributed" in sys.modules:  # the command may have joined a process group: end without finalising
        from raml.distributed import exit_process

        exit_process(code)
    raise SystemExit(code)
