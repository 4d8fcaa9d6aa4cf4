"""One rank of the engine tests' persistent two-process gloo pair (``rank_pair`` in tests/engine/conftest.py).

Started (``rank_server.py --preload``) once per pytest worker with torchrun's variables (``RANK``,
``WORLD_SIZE``, ``MASTER_PORT``, ...), it imports torch and raml once and then runs ``python ARGS`` requests,
one JSON line each on stdin, the way a fresh ``python ARGS`` would run them: ``-m MODULE`` through
``runpy.run_module``, a script through ``runpy.run_path``, both as ``__main__`` with ``sys.argv`` set, stdout
and stderr (file descriptors 1 and 2) sent to the request's files, in the request's working directory, with
the torch thread count (``OMP_NUM_THREADS`` of the request, else torch's own default) and, as in a new
process, torch's global random generator seeded afresh (non-deterministically). The exit status
(``SystemExit``'s code; 1 for any other exception, with its traceback on stderr) goes back as one JSON line on
the original stdout.

What stays from one request to the next is what the pair exists to share: the imported modules and the gloo
process group, which ``raml.distributed.init_distributed`` creates once per process. A request that fails may
leave the ranks out of step in their collectives, so the launcher ends the pair after any failure.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from typing import NoReturn


def _run(args: list[str]) -> int:
    """``python ARGS`` in this process; returns the exit status."""
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # what the interpreter does with SystemExit("message")
        return 1
    except BaseException:  # noqa: BLE001  (a fresh interpreter reports any exception and exits with 1)
        traceback.print_exc()
        return 1
    return 0


def _raise_system_exit(code: int) -> NoReturn:
    raise SystemExit(code)


def serve(preload: bool) -> None:
    """Answer requests until stdin closes. ``preload``: import torch and raml first (the cost the pair saves) and
    give each request a fresh process's torch threads and random state; without it (the launcher's own tests,
    whose scripts do not use torch) nothing is imported."""
    torch = None
    if preload:
        import torch

        import raml.cli.main  # noqa: F401
        import raml.distributed

        # a request ends like a fresh process's ``python -m raml`` but without ending this process: the pair keeps
        # its process group for the next request
        raml.distributed.exit_process = _raise_system_exit

        default_threads = torch.get_num_threads()
    control = os.fdopen(os.dup(1), "w")  # replies; fds 1 and 2 go to each request's files
    home = os.getcwd()
    for line in sys.stdin:
        request = json.loads(line)
        if torch is not None:
            threads = request.get("omp_num_threads")
            torch.set_num_threads(int(threads) if threads else default_threads)
            torch.seed()  # a new process's default generator starts from a non-deterministic seed too
        os.chdir(request["cwd"])
        saved = [os.dup(1), os.dup(2)]
        with open(request["stdout"], "w") as out, open(request["stderr"], "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                code = _run(request["args"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
        os.chdir(home)
        control.write(json.dumps({"returncode": code}) + "\n")
        control.flush()


if __name__ == "__main__":
    serve(preload="--preload" in sys.argv[1:])
