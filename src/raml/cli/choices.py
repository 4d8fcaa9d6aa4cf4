"""The names a parser offers (``choices=``, help text) whose registries live in modules that import torch.

Building a parser, printing ``--help`` or reporting a usage error imports none of torch, torchvision, timm, faiss,
onnx, onnxruntime, ray or uvicorn; so the names of these registries are spelled here, and
``tests/cli/test_cli_startup.py`` checks that each equals its registry.
"""

from __future__ import annotations

from pathlib import Path

#: ``sorted(raml.models.pooling.POOLINGS)``
POOLING_NAMES: tuple[str, ...] = ("gem", "gemmp", "mac", "spoc")  # sorted

#: ``list(raml.engine.optim.OPTIMIZERS)``, in the registry's order
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "adamW")

#: ``raml.engine.optim.SCHEDULERS``
SCHEDULER_NAMES: tuple[str, ...] = ("onecycle", "cyclic", "exponential", "none")

#: ``list(raml.engine.methods.METHODS)``, in the registry's order: the ``--mode`` names ``raml --help`` lists
METHOD_NAMES: tuple[str, ...] = ("ts_aug", "ts_reg", "sym", "aml", "rkd", "csd", "d3", "rop", "ugd")

#: ``list(raml.reproduce.PAPER_RESULTS)``: the datasets ``raml reproduce`` knows
REPRODUCE_DATASETS: tuple[str, ...] = ("cub", "cars", "sop")

#: the fields of ``raml.demo.DemoSettings()``: ``raml demo``'s defaults
DEMO_SETTINGS: dict[str, object] = {
    "out": Path("demo"),
    "num_classes": 60,
    "images_per_class": 16,
    "image_size": 64,
    "pattern_period": (22.0, 28.0),
    "architecture": "resnet18",
    "whitening": 128,
    "teacher_size": 64,
    "student_size": 32,
    "teacher_epochs": 15,
    "teacher_lr": 0.001,
    "teacher_batch_size": 32,
    "student_epochs": 10,
    "student_lr": 0.0003,
    "pos_num": 4,
    "lam_1": 0.7,
    "lam_2": 0.7,
    "seed": 0,
    "workers": 0,
    "threads": 2,
    "latency_batch": 16,
}

#: the fields of ``raml.deploy.service.service.ServiceLimits()``: ``raml serve``'s defaults
SERVICE_LIMITS: dict[str, object] = {
    "max_batch": 32,
    "max_wait_ms": 5.0,
    "queue_size": 256,
    "max_queue_wait_ms": None,
    "max_bytes": 20 * 2**20,
    "max_pixels": 40_000_000,
    "max_k": 100,
    "poll_interval_s": 1.0,
    "max_uploads": 32,
    "max_decodes": 16,
    "max_decode_pixels": 64_000_000,
    "header_timeout_s": 10.0,
    "body_timeout_s": 30.0,
    "max_connections": 256,
    "queue_wait_counts_front_end": False,
    "defer_early_arrivals": False,
    "overload_margin": True,
    "late_budget": 0.0,
}

#: ``raml.deploy.service.decode.DEFAULT_INLINE_DECODE_PIXELS``
INLINE_DECODE_PIXELS = 16384

#: ``raml.deploy.faiss_index.INDEX_TYPES``
INDEX_TYPES: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")

#: ``raml.deploy.shards.DEFAULT_SHARD_SIZE``
SHARD_SIZE = 4096

#: ``raml.deploy.export``'s ``EXPORTERS``, ``MIN_OPSET`` and ``DEFAULT_TOLERANCE``
EXPORTERS: tuple[str, ...] = ("auto", "torchscript", "dynamo")
MIN_OPSET = 17
EXPORT_TOLERANCE = 1e-4

#: ``raml.deploy.quantize``'s ``CALIBRATION_METHODS``, ``DEFAULT_MIN_COSINE`` and ``DEFAULT_MIN_WORST_COSINE``
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")
MIN_COSINE = 0.95
MIN_WORST_COSINE = 0.9

#: each name above -> (the module that defines it, its name there; ``()``: the default instance of that class,
#: compared field by field), for ``tests/cli/test_cli_startup.py``
SOURCES: dict[str, tuple[str, str]] = {
    "POOLING_NAMES": ("raml.models.pooling", "POOLINGS"),
    "OPTIMIZER_NAMES": ("raml.engine.optim", "OPTIMIZERS"),
    "SCHEDULER_NAMES": ("raml.engine.optim", "SCHEDULERS"),
    "METHOD_NAMES": ("raml.engine.methods", "METHODS"),
    "REPRODUCE_DATASETS": ("raml.reproduce", "PAPER_RESULTS"),
    "DEMO_SETTINGS": ("raml.demo", "DemoSettings()"),
    "SERVICE_LIMITS": ("raml.deploy.service.service", "ServiceLimits()"),
    "INLINE_DECODE_PIXELS": ("raml.deploy.service.decode", "DEFAULT_INLINE_DECODE_PIXELS"),
    "INDEX_TYPES": ("raml.deploy.faiss_index", "INDEX_TYPES"),
    "SHARD_SIZE": ("raml.deploy.shards", "DEFAULT_SHARD_SIZE"),
    "EXPORTERS": ("raml.deploy.export", "EXPORTERS"),
    "MIN_OPSET": ("raml.deploy.export", "MIN_OPSET"),
    "EXPORT_TOLERANCE": ("raml.deploy.export", "DEFAULT_TOLERANCE"),
    "CALIBRATION_METHODS": ("raml.deploy.quantize", "CALIBRATION_METHODS"),
    "MIN_COSINE": ("raml.deploy.quantize", "DEFAULT_MIN_COSINE"),
    "MIN_WORST_COSINE": ("raml.deploy.quantize", "DEFAULT_MIN_WORST_COSINE"),
}
