"""Two-process training scenarios that need a hand inside each process; run by tests/engine/test_gpu_paths.py as
``python ddp_scenarios.py SCENARIO CONFIG.json OUT_DIR`` in both ranks of the session's gloo pair (the engine
conftest's ``rank_pair``, whose processes run one scenario after another: a scenario leaves no patch behind).

Each rank writes ``OUT_DIR/rank<R>.json`` with what it saw; a rank killed or hung writes nothing.

- ``nan``: rank 1's loss of epoch 1, batch 2 is made NaN; every rank must stop with NonFiniteLossError.
- ``count``: a DDP communication hook counts the gradient all-reduces (bucket 0) against the optimizer steps.
- ``eval``: monitoring and the final test; which ranks score (``retrieval_metrics``) and what each gets.
- ``signal_in_batch``: SIGTERM reaches rank 1 only, during epoch 1's batch 2; every rank must stop after the same
  batch with TrainingInterrupted (none left waiting in an all-reduce).
- ``signal_in_save``: SIGTERM reaches rank 1 only, while epoch 1's checkpoint is saved; every rank must stop after
  epoch 1.
- ``small_batches``: CONFIG.json is ``{"base": {...}, "runs": {NAME: {...}}}``; one training run per entry (the
  base's values updated with the run's, in ``OUT_DIR/NAME``), one after another; each rank reports per run the
  epochs' losses and a digest of its student's weights (the batches of a few images: shares left empty). A run's
  ``_ambiguous_rank: R`` makes no region unambiguous on rank R (``--mode ugd``: its projectors get no gradient).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from raml.distributed import DistContext, init_distributed
from raml.engine.config import TrainConfig
from raml.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted


def _small_batches(settings: dict, out_dir: Path, dist: DistContext, device: torch.device) -> dict[str, object]:
    import raml.engine.methods.ugd as ugd_module

    runs: dict[str, object] = {}
    ugd_loss = ugd_module.ugd_loss
    for name, changes in settings["runs"].items():
        changes = dict(changes)
        if changes.pop("_ambiguous_rank", None) == dist.rank:  # UGD: no region of this rank's shares unambiguous
            ugd_module.ugd_loss = lambda s, t, sr, tr, masks: ugd_loss(s, t, sr, tr, [m & False for m in masks])
        config = TrainConfig(**{**settings["base"], "directory": str(out_dir / name), **changes})
        trainer = Trainer(config, device, progress=False, dist=dist)
        try:
            trainer.run()
        finally:
            ugd_module.ugd_loss = ugd_loss  # the rank servers run the next scenario in this same process
        weights = torch.cat([p.detach().flatten().double() for p in trainer.student.parameters()])
        runs[name] = {
            "losses": [epoch["loss"] for epoch in trainer.history],
            "digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        }
    return runs


def main(scenario: str, config_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist, device = init_distributed("cpu")
    if scenario == "small_batches":
        runs = _small_batches(json.loads(Path(config_path).read_text()), Path(out_dir), dist, device)
        (Path(out_dir) / f"rank{dist.rank}.json").write_text(json.dumps({"rank": dist.rank, "runs": runs}))
        return
    config = TrainConfig(**json.loads(Path(config_path).read_text()))
    trainer = Trainer(config, device, progress=False, dist=dist)
    report: dict[str, object] = {"rank": dist.rank}
    if scenario == "nan":
        original = trainer._batch_loss
        calls = {"n": 0}

        def poisoned(batch, generator):  # noqa: ANN001, ANN202
            result = original(batch, generator)
            calls["n"] += 1
            if dist.rank == 1 and calls["n"] == 2:
                result.loss = result.loss * float("nan")
            return result

        trainer._batch_loss = poisoned
        try:
            trainer.run()
            report["outcome"] = "finished"
        except NonFiniteLossError as error:
            report["outcome"] = "NonFiniteLossError"
            report["message"] = str(error)
    elif scenario == "count":
        counts = {"reduces": 0, "steps": 0}

        def counting_hook(state, bucket):  # noqa: ANN001, ANN202
            if bucket.index() == 0:
                counts["reduces"] += 1
            return default_hooks.allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)
        step = trainer._optimizer_step

        def counted_step() -> None:
            counts["steps"] += 1
            step()

        trainer._optimizer_step = counted_step
        trainer.run()
        report.update(counts, batches=trainer.batches_per_epoch * config.epochs)
    elif scenario == "eval":
        import raml.engine.trainer as trainer_module
        import raml.retrieval.evaluate as evaluate_module

        scored = []
        metrics = evaluate_module.retrieval_metrics

        def counting_metrics(query, database, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            scored.append(str(query.device))
            return metrics(query, database, *args, **kwargs)

        # wherever the trainer scores: through evaluate_split or by itself (restored after: the rank servers of
        # tests/engine/conftest.py run the next scenario in this same process)
        trainer_module.retrieval_metrics = evaluate_module.retrieval_metrics = counting_metrics
        try:
            trainer.run()
            report.update(scored=scored, history=trainer.history, test=trainer.test())
        finally:
            trainer_module.retrieval_metrics = evaluate_module.retrieval_metrics = metrics
    elif scenario in ("signal_in_batch", "signal_in_save"):
        calls = {"n": 0}
        if scenario == "signal_in_batch":
            original_loss = trainer._batch_loss

            def signalled_loss(batch, generator):  # noqa: ANN001, ANN202
                calls["n"] += 1
                if dist.rank == 1 and calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets its flag
                return original_loss(batch, generator)

            trainer._batch_loss = signalled_loss
        else:
            original_save = trainer._save

            def signalled_save(path, epoch, also=()):  # noqa: ANN001, ANN202
                if dist.rank == 1 and path.name == "model_last.pth.tar" and epoch == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return original_save(path, epoch, also)

            trainer._save = signalled_save
        try:
            trainer.run()
            report["outcome"] = "finished"
        except TrainingInterrupted as error:
            report["outcome"] = "TrainingInterrupted"
            report["message"] = str(error)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    (Path(out_dir) / f"rank{dist.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
