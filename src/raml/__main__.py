"""``python -m raml`` and the ``raml`` command (also what ``torchrun -m raml`` and ``torchrun $(which raml)`` run)."""

import sys
from typing import NoReturn

from raml.cli.main import main


def run() -> NoReturn:
    """Run the command line and end the process with its status; a process that joined a process group ends
    through :func:`raml.distributed.exit_process` (without the interpreter's finalisation)."""
    code = main()
    if "raml.distributed" in sys.modules:  # only then can the command have joined a process group
        from raml.distributed import exit_process

        exit_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    run()
