"""Training methods, one module each; ``--mode NAME`` picks one through :data:`METHODS`.

A method (:class:`raml.engine.methods.base.Method`) says what a training step needs (its epoch's batches,
whether the teacher runs online on views or as cached embeddings, whether labels are used) and computes its
loss on one batch. Everything else (the loop, optimisation, gradient accumulation, DDP, checkpoints,
validation, signals) is the trainer's (:mod:`raml.engine.trainer`).

This module is light on purpose (no torch import): the CLI lists the registry in ``raml train --help`` and the
configuration validates ``--mode`` against it. The classes load on first use.

Adding a method: one new module with a :class:`~raml.engine.methods.base.Method` subclass, registered with
:func:`register_method` (a built-in gets its entry in :data:`METHODS` below; its loss, if new, goes to
:mod:`raml.losses`). The configuration and the CLI read the registry when they are used, so a method
registered before a run is built (or before ``raml.cli.main.main`` builds its parser) is a valid ``--mode``.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raml.engine.methods.base import Method

__all__ = ["METHODS", "MethodEntry", "method_class", "method_help", "register_method"]


@dataclass(frozen=True)
class MethodEntry:
    """One ``--mode``: a one-line summary and where its class lives.

    Attributes:
        summary: One line for ``raml train --help``.
        target: ``"module:Class"``, or a mapping ``--loss`` value -> ``"module:Class"`` for a mode whose
            recipe depends on ``--loss`` (``sym``).
    """

    summary: str
    target: str | dict[str, str]


_PACKAGE = "raml.engine.methods"

METHODS: dict[str, MethodEntry] = {
    "ts_aug": MethodEntry(
        "the paper's distillation: coupled QR/DR views of each image, mixup, absolute + relative terms (no labels)",
        f"{_PACKAGE}.ts_aug:CoupledViewDistillation",
    ),
    "ts_reg": MethodEntry(
        "regression on the teacher's cached DR embeddings of the evaluation-transformed images (no labels)",
        f"{_PACKAGE}.ts_reg:CachedRegression",
    ),
    "sym": MethodEntry(
        "a network trained with labels at one size: triplet with mined negatives (--loss triplet) or "
        "normalised softmax over class proxies (--loss normsoftmax)",
        {"triplet": f"{_PACKAGE}.sym_triplet:TripletTraining", "normsoftmax": f"{_PACKAGE}.sym_proxy:ProxyTraining"},
    ),
    "aml": MethodEntry(
        "asymmetric metric learning (Budnik & Avrithis, CVPR 2021): contrastive loss of student queries against "
        "teacher anchors, on ts_aug's views (no labels)",
        f"{_PACKAGE}.aml:AsymmetricMetricLearning",
    ),
    "rkd": MethodEntry(
        "relational knowledge distillation (Park et al., CVPR 2019): distance- and angle-wise terms over the "
        "batch, on ts_aug's views (no labels)",
        f"{_PACKAGE}.rkd:RelationalDistillation",
    ),
    "csd": MethodEntry(
        "contextual similarity distillation (Wu et al., CVPR 2022): similarities to the teacher's k nearest "
        "neighbours (KL) + first-order term, on ts_aug's views (no labels)",
        f"{_PACKAGE}.csd:ContextualSimilarityDistillation",
    ),
    "d3": MethodEntry(
        "D3still (Xie et al., CVPR 2024): first-order term + decoupled differential terms over the teacher's "
        "top-k neighbours, on ts_aug's views (no labels)",
        f"{_PACKAGE}.d3:DecoupledDifferentialDistillation",
    ),
    "rop": MethodEntry(
        "rank order preservation (Wu et al., ICLR 2023): the student's soft ranking of the teacher's top-k "
        "neighbours matched to the teacher's, rank-weighted, on ts_aug's views (no labels)",
        f"{_PACKAGE}.rop:RankOrderPreservation",
    ),
    "ugd": MethodEntry(
        "unambiguous granularity distillation (Neural Networks 2025): global + region-level distances, the "
        "regions kept where the teacher's class (nearest class prototype) is the label, on ts_aug's views (labels)",
        f"{_PACKAGE}.ugd:UnambiguousGranularityDistillation",
    ),
}


#: ``module:Class``: a dotted module path and a class name
_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def register_method(name: str, summary: str, target: str | dict[str, str]) -> MethodEntry:
    """Add ``--mode name`` to :data:`METHODS`: ``target`` is ``"module:Class"`` (a
    :class:`~raml.engine.methods.base.Method` subclass, imported on first use) or a mapping ``--loss`` value ->
    ``"module:Class"``; ``summary`` is its line in ``raml train --help``.

    Raises:
        ValueError: ``name`` is already registered (a built-in or another plug-in: pick another name; a method is
            never replaced silently), is not a plain identifier, ``summary`` is not a non-empty string, ``target``
            is not ``"module:Class"`` (a dotted module, a class name), or a mapping is empty or has a key that is
            not a ``--loss`` value (:data:`raml.engine.config.LOSSES`).
    """
    from raml.engine.config import LOSSES

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A method's name must be a plain identifier (e.g. 'my_kd'), got {name!r}.")
    if name in METHODS:
        raise ValueError(
            f"--mode {name!r} is already registered ({METHODS[name].target}); register the method under another name."
        )
    if not isinstance(summary, str) or not summary.strip():
        raise ValueError(
            f"A method's summary (its line in raml train --help) must be a non-empty string, got {summary!r}."
        )
    if isinstance(target, dict):
        unknown = [key for key in target if key not in LOSSES]
        if not target or unknown:
            raise ValueError(
                f"A method's --loss mapping needs one or more of the --loss values {', '.join(LOSSES)} as keys, got "
                f"{sorted(map(str, target)) if target else 'none'}."
            )
        target = dict(target)  # the caller's dict may change after this check: keep a copy
    for one in target.values() if isinstance(target, dict) else [target]:
        if not isinstance(one, str) or not _TARGET.fullmatch(one):
            raise ValueError(f"A method's target must be 'module:Class' (e.g. 'my_package.kd:MyKD'), got {one!r}.")
    entry = MethodEntry(summary, target)
    METHODS[name] = entry
    return entry


def method_class(mode: str, loss: str) -> type[Method]:
    """The class of ``--mode mode`` (with ``--loss loss`` where the mode depends on it).

    Raises:
        ValueError: an unknown mode or, for a mode that depends on it, an unknown loss; the message lists the
            valid names.
    """
    if mode not in METHODS:
        raise ValueError(f"Unknown --mode {mode!r}; valid: {', '.join(METHODS)}.")
    target = METHODS[mode].target
    if isinstance(target, dict):
        if loss not in target:
            raise ValueError(f"Unknown --loss {loss!r} for --mode {mode}; valid: {', '.join(target)}.")
        target = target[loss]
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def method_help(width: int = 100) -> str:
    """The registered modes, one entry each (wrapped at ``width``), for ``raml train --help``."""
    lines = ["training methods (--mode NAME):"]
    for name, entry in METHODS.items():
        lines.append(textwrap.fill(entry.summary, width, initial_indent=f"  {name:<8}", subsequent_indent=" " * 10))
    return "\n".join(lines)
