"""What a checkpoint's load costs with and without the random initialisation it throws away (raml.models.skip_init).

For each architecture, one run builds a random network, saves it as a checkpoint, then times, alternated:

- **baseline**: the plain path, written here: read the file (``load_checkpoint_file``), build the network with
  its random initialisation (``build_network``), load the state dict strictly;
- **raml**: ``raml.models.load_network`` as shipped (the same, the initialisers skipped while building).

Both must give the same state dict, bit for bit (checked). Each timing is the best of ``--repeats`` in one
process on ``--threads`` torch threads; the ratio is baseline / raml.

    python benchmarks/network_load.py --architectures resnet18,resnet50,test_resnet --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from raml.models.checkpoints import load_checkpoint_file, load_network, save_checkpoint
from raml.models.network import build_network
from raml.utils import cpu_model


def _baseline(path: Path) -> torch.nn.Module:
    checkpoint = load_checkpoint_file(path)
    meta, state = checkpoint["meta"], checkpoint["state_dict"]
    whitening = int(state["whiten.weight"].shape[0]) if "whiten.weight" in state else 0
    network = build_network(meta["architecture"], pooling=meta["pooling"], whitening=whitening, pretrained=False)
    network.load_state_dict(state, strict=True)
    return network.eval()


def _timed(load, path: Path) -> tuple[float, torch.nn.Module]:
    start = time.perf_counter()
    network = load(path)
    return time.perf_counter() - start, network


def measure(architectures: list[str], repeats: int, whitening: int, folder: Path) -> list[dict]:
    rows = []
    for architecture in architectures:
        torch.manual_seed(0)
        path = folder / f"{architecture.replace('/', '_')}.pth"
        save_checkpoint(path, build_network(architecture, whitening=whitening, pretrained=False))
        _baseline(path), load_network(path)  # warm: imports, file cache
        baseline_s = raml_s = float("inf")
        for _ in range(repeats):  # alternated, so that a slow phase of the machine hits both
            seconds, plain = _timed(_baseline, path)
            baseline_s = min(baseline_s, seconds)
            seconds, ours = _timed(load_network, path)
            raml_s = min(raml_s, seconds)
        plain_state, our_state = plain.state_dict(), ours.state_dict()
        identical = list(plain_state) == list(our_state) and all(
            torch.equal(plain_state[k], our_state[k]) for k in plain_state
        )
        if not identical:
            raise AssertionError(f"{architecture}: the two loads gave different state dicts")
        rows.append(
            {
                "architecture": architecture,
                "parameters": sum(p.numel() for p in ours.parameters()),
                "baseline_ms": 1000.0 * baseline_s,
                "raml_ms": 1000.0 * raml_s,
                "ratio": baseline_s / raml_s,
                "identical": identical,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="resnet18,resnet50,test_resnet")
    parser.add_argument("--repeats", type=int, default=5, help="alternated timings of each path (best kept)")
    parser.add_argument("--whitening", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = measure([a for a in args.architectures.split(",") if a], args.repeats, args.whitening, Path(folder))
    print(f"checkpoint load, best of {args.repeats}, {args.threads} torch thread(s), {cpu_model()}")
    print(f"{'architecture':<14} {'parameters':>11} {'baseline ms':>12} {'raml ms':>9} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['architecture']:<14} {row['parameters']:>11,} {row['baseline_ms']:>12.1f} {row['raml_ms']:>9.1f} "
            f"{row['ratio']:>5.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
