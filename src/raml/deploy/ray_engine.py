"""Ray Data as the scale-out engine of ``raml index --engine ray`` (optional: ``pip install raml[ray]``).

Contract: ``ray_engine(RayOptions(...))`` -> a :data:`raml.deploy.index.ShardEngine`: given a
:class:`~raml.deploy.shards.ShardPlan`, it fills every missing or damaged shard. The missing shards (their index,
first row, paths, the paths' stamps and the shard key) are a Ray dataset, one row per shard; ``map_batches``
runs them through a pool of actors that each load the network once (one actor per GPU, else one per CPU slot)
and write the shards they embed (:func:`~raml.deploy.shards.write_shard`) into the work folder, which must
therefore be on a file system every node sees (a local folder on one machine, a shared one on a cluster).

Each shard is embedded like the single-process engine embeds it with the PyTorch runtime
(:func:`raml.retrieval.extract.extract_embeddings` over the shard's paths in batches of ``batch_size``), so the
rows are bit-identical to that engine's run with ``--cpu-runtime torch`` and the same batch size (not to a run
through onnxruntime: the last bits differ; the runtime and the batch size are in the shard key). An actor
that dies (a killed process, a lost node) is restarted and its shard retried by Ray Data (its default fault
tolerance: without a limit); a rewritten shard replaces the earlier file atomically and the index reads each
shard once, so every row ends up exactly once. A shard whose embedding raises (an unreadable image) fails the
job at once and leaves the work folder as it is: the next run resumes from it. The actor's exception is raised
again out of Ray's wrappers, so an unreadable image is the same one-line error as with the local engine.

Actor pool: Ray's read and write tasks need a CPU of their own, so on a local instance the pool gets one actor
per CPU less one (at least one), and the instance declares at least ``actors + 1`` CPUs; with ``num_cpus=2`` and
two actors holding both CPUs the job would wait forever. A local instance binds 127.0.0.1 only, without the
dashboard and usage reporting.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raml.deploy.shards import ShardPlan

logger = logging.getLogger(__name__)

__all__ = ["RayOptions", "actor_pool", "ray_engine"]


@dataclass(frozen=True)
class RayOptions:
    """How to run the extraction on Ray.

    Attributes:
        network_path: The network checkpoint (each actor loads it; a path every node can read).
        image_size: Database resolution DR.
        batch_size: Images per forward pass.
        address: A running Ray cluster (``ray start --head`` ...); None starts a local instance on 127.0.0.1.
        actors: Embedding actors; default one per GPU of the cluster, else one per CPU less one.
        data_root: Where published network names are looked up / downloaded.
        num_cpus: CPUs the local instance declares (default this machine's count, at least ``actors + 1``).
    """

    network_path: str
    image_size: int
    batch_size: int = 32
    address: str | None = None
    actors: int | None = None
    data_root: str = "data"
    num_cpus: int | None = None


def actor_pool(cpus: float, gpus: float, actors: int | None) -> tuple[int, bool]:
    """``(number of actors, one GPU each)`` for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    Raises:
        ValueError: If the actors would hold every CPU (the read and write tasks would wait forever).
    """
    if gpus >= 1:
        count = actors or int(gpus)
        if count > gpus:
            raise ValueError(f"--ray-actors {count} exceeds the cluster's {int(gpus)} GPUs (one actor per GPU).")
        return count, True
    slots = int(cpus) - 1
    if slots < 1:
        raise ValueError(
            f"The Ray cluster has {cpus:g} CPU(s); the embedding actors need one each and Ray's read and write "
            "tasks at least one more. Give the local instance more CPUs or join a larger cluster."
        )
    count = actors or slots
    if count > slots:
        raise ValueError(
            f"--ray-actors {count} would hold every CPU of the Ray cluster ({cpus:g}); Ray's read and write tasks "
            f"need one more and the job would never finish. Use at most {slots} actors."
        )
    return count, False


class _ShardEmbedder:
    """A Ray actor: holds the network, embeds whole shards and writes them."""

    def __init__(self, network_path: str, image_size: int, batch_size: int, data_root: str, use_gpu: bool) -> None:
        import torch

        from raml.models import load_network

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.network = load_network(network_path, data_root=data_root, device=self.device)
        self.image_size = image_size
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import resource

        from raml.deploy.shards import write_shard
        from raml.retrieval.extract import extract_embeddings

        written = []
        items = zip(batch["shard"], batch["start"], batch["paths"], batch["stamps"], batch["key"], batch["directory"])
        for shard, start, paths, stamps, key, directory in items:
            paths = [str(p) for p in paths]
            rows = extract_embeddings(
                self.network, paths, self.image_size, self.device, self.batch_size, 0, False, f"shard {shard}"
            ).numpy()
            stamps = [str(s) for s in stamps]
            write_shard(Path(str(directory)), int(shard), int(start), paths, rows, stamps, str(key))
            written.append(int(shard))
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {
            "shard": np.asarray(written, dtype=np.int64),
            "peak_rss_mib": np.full(len(written), peak_kib / 1024.0),
            "pid": np.full(len(written), os.getpid(), dtype=np.int64),
        }


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:  # pragma: no cover - the extra is installed in the dev environment
        raise ImportError("--engine ray needs Ray Data; install it with `pip install raml[ray]`.") from error
    return ray


def _start_ray(ray: Any, options: RayOptions) -> bool:
    """Connect to ``options.address`` or start a local instance; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network access besides the cluster
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
        return True
    cpus = options.num_cpus or os.cpu_count() or 1
    if options.actors is not None:
        cpus = max(cpus, options.actors + 1)
    ray.init(
        num_cpus=cpus,
        num_gpus=None,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def _cause(error: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's wrappers (``RayTaskError`` and its ``RayTaskError(X)``
    twins, Ray Data's ``UserCodeException``): the first exception down the chain of causes that is not Ray's own;
    ``error`` itself when there is none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.split(".")[0] != "ray":
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return error


def ray_engine(options: RayOptions) -> Any:
    """The Ray engine for :func:`raml.deploy.index.index_images` (see the module docstring)."""

    def run(plan: ShardPlan) -> dict[str, Any]:
        todo = plan.missing()
        if not todo:
            return {"engine": "ray", "shards": plan.num_shards, "shards_computed": 0}
        ray = _import_ray()
        started = _start_ray(ray, options)
        context: Any = None
        raise_original = None
        try:
            resources = ray.cluster_resources()
            actors, use_gpu = actor_pool(resources.get("CPU", 0), resources.get("GPU", 0), options.actors)
            actors = min(actors, len(todo))
            logger.info(
                "Ray: %d shard(s) of %s over %d actor(s) (%s)",
                len(todo),
                plan.directory,
                actors,
                "one GPU each" if use_gpu else "one CPU each",
            )
            items = []
            for i in todo:
                start, _ = plan.bounds(i)
                items.append(
                    {
                        "shard": i,
                        "start": start,
                        "paths": plan.shard_paths(i),
                        "stamps": plan.shard_stamps(i),
                        "key": plan.shard_key(i),
                        "directory": str(plan.directory),
                    }
                )
            # an actor's exception (an unreadable image) reaches the driver as itself, not as Ray Data's
            # UserCodeException whose cause is lost on the way (set for this job only, restored below)
            context = ray.data.DataContext.get_current()
            raise_original = getattr(context, "raise_original_map_exception", None)
            if raise_original is not None:
                context.raise_original_map_exception = True
            dataset = ray.data.from_items(items, override_num_blocks=len(items))
            done = dataset.map_batches(
                _ShardEmbedder,
                fn_constructor_kwargs={
                    "network_path": options.network_path,
                    "image_size": options.image_size,
                    "batch_size": options.batch_size,
                    "data_root": options.data_root,
                    "use_gpu": use_gpu,
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=0 if use_gpu else 1,
                num_gpus=1 if use_gpu else 0,
                # fault tolerance: Ray Data's default (a dead actor is restarted, its shard retried); passing
                # max_restarts / max_task_retries through the remote args is deprecated since Ray 2.60
            )
            try:
                rows = list(done.iter_rows())
            except Exception as error:
                cause = _cause(error)
                if cause is error:
                    raise
                raise cause from None  # an unreadable image: the caller's one-line error, not Ray's wrapping
            peaks: dict[int, float] = {}
            for row in rows:
                peaks[int(row["pid"])] = max(peaks.get(int(row["pid"]), 0.0), float(row["peak_rss_mib"]))
            logger.info("Ray wrote %d shard(s) with %d actor process(es)", len(rows), len(peaks))
            return {
                "engine": "ray",
                "shards": plan.num_shards,
                "shards_computed": len(rows),
                "actors": actors,
                "actor_peak_rss_mib": sorted(peaks.values()),
            }
        finally:
            if raise_original is not None:
                context.raise_original_map_exception = raise_original
            if started:
                ray.shutdown()

    run.key_fields = lambda images: {"runtime": "torch", "batch": options.batch_size}  # type: ignore[attr-defined]
    return run
