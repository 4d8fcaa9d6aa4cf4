"""The training configuration: one typed object holding every flag of the seed's ``main.py``.

Defaults are the reference's (SPEC section 6). The CLI fills a :class:`TrainConfig` from flags and an
optional YAML file; the resolved configuration is written next to every run's outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raml.engine.methods import METHODS
from raml.utils import MAX_SEED, MAX_WORKERS  # noqa: F401 (also read from here)

logger = logging.getLogger(__name__)

#: the settings that belong to one method or another; each method names those it reads (``Method.reads``), and a
#: value other than the default of one it does not read is reported by :meth:`TrainConfig.validate`
METHOD_SETTINGS = (
    "loss", "loss_margin", "neg_num", "pool_size", "pos_num", "lam_1", "lam_2", "mixup_partner", "mixup",
    "uncoupled_views", "fused_views", "aml_variant", "aml_margin", "rkd_distance_weight", "rkd_angle_weight",
    "csd_k", "csd_temperature", "csd_first_order_weight", "d3_k", "d3_alpha", "d3_beta", "d3_gamma", "rop_k",
    "rop_temperature", "rop_rank_weight",
)  # fmt: skip
#: (mode, setting, value) already reported in this process: validate() runs more than once per run
_REPORTED_IGNORED: set[tuple[str, str, str]] = set()

MIXUP_PARTNERS = ("dataset", "batch")
SEARCH_OBJECTIVES = ("last", "best")
LOSSES = ("triplet", "normsoftmax")
LOGGERS = ("none", "tensorboard")
AML_VARIANTS = ("contrastive", "regression")
#: the largest --whitening output dimension: its layer holds (backbone dim x DIM) weights, and embeddings of
#: 65,536 floats (256 KiB each) are far beyond any retrieval use; a larger value is a typo, not a setting
MAX_WHITENING = 65536
#: settings of one invocation, not of the run: what it may overwrite, where it writes its results, which checkpoint
#: it resumes. A run's config.yaml records them at their defaults and a --config file may not set them otherwise,
#: so that replaying a run's config.yaml into another --directory never overwrites it, another run's results file
#: or resumes another run's checkpoint; only the command line gives them
#: the file a run records its configuration in, in its --directory (:meth:`TrainConfig.record`)
RUN_CONFIG_NAME = "config.yaml"
PER_INVOCATION = ("overwrite", "json", "resume_student")

#: float settings and the range each must lie in, besides being finite: ``(low, high, low_open, high_open)``,
#: None = unbounded on that side
_FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, True, False),
    "weight_decay": (0.0, None, False, False),
    "momentum": (0.0, 1.0, False, True),
    "loss_margin": (0.0, None, False, False),
    "lam_1": (0.0, None, False, False),
    "lam_2": (0.0, None, False, False),
    "val_ratio": (0.0, 1.0, True, True),
    "aml_margin": (0.0, None, True, False),
    "csd_temperature": (0.0, None, True, False),
    "rop_temperature": (0.0, None, True, False),
    "rkd_distance_weight": (0.0, None, False, False),
    "rkd_angle_weight": (0.0, None, False, False),
    "csd_first_order_weight": (0.0, None, False, False),
    "d3_alpha": (0.0, None, False, False),
    "d3_beta": (0.0, None, False, False),
    "d3_gamma": (0.0, None, False, False),
    "rop_rank_weight": (0.0, None, False, False),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _given_flag(name: str, value: Any) -> str:
    """How a setting's value is given on the command line: ``--lam-1 0.7``, ``--no-mixup``, ``--fused-views``,
    ``--no-fused-views`` (the opposite flag a ``--config`` file's value can be overridden with)."""
    if name == "mixup":
        return "--mixup" if value else "--no-mixup"
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + _flag(name)[2:]
    return f"{_flag(name)} {value}"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _check_float(name: str, value: float) -> None:
    """Refuse a float setting that is not finite (nan, inf) or outside its range, naming its flag."""
    low, high, low_open, high_open = _FLOAT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_flag(name)} must be a number, got {value!r}.")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(
            f"{_flag(name)} must be a finite number {_range_text(low, high, low_open, high_open)}, got {value}."
        )


@dataclass
class TrainConfig:
    """Every knob of a training run. Field names are the seed's flags with ``-`` -> ``_``."""

    # networks
    student: str | None = None
    student_path: str | None = None
    teacher: str | None = None
    teacher_path: str | None = None
    pool: str = "gem"
    whitening: int = 512
    pretrained: bool = True
    freeze_bn: bool = True
    # data
    training_dataset: str = "cub"
    test_datasets: list[str] = field(default_factory=lambda: ["cub-test"])
    data_root: str = "data"
    directory: str = "exp"
    val_ratio: float = 0.5
    bad_images: str = "error"
    #: ImageNet weights of a backbone built from an architecture name: ``v1`` (what the reference's
    #: ``pretrained=True`` loads, torchvision's IMAGENET1K_V1), ``default`` (torchvision's DEFAULT), or a
    #: torchvision weights name / timm pretrained tag
    pretrained_weights: str = "v1"
    # schedule
    val: bool = True
    val_freq: int = 20
    save_freq: int = 20
    epochs: int = 200
    # method
    mode: str = "ts_aug"
    loss: str = "triplet"
    loss_margin: float = 0.7
    image_size: int = 224
    #: several student (query) sizes, one drawn per batch (``--image-size 24,32,48``, distillation only);
    #: ``image_size`` is then the first of them. None: the single size ``image_size``
    image_sizes: list[int] | None = None
    #: after training, BatchNorm statistics estimated per student size on the training images, chosen by the
    #: query's size at inference (``raml.models.switchable_bn``); needs several sizes
    per_size_bn: bool = False
    teacher_image_size: int = 448
    neg_num: int = 4
    pos_num: int = 8
    query_size: int = 8000
    pool_size: int = 20000
    lam_1: float = 0.0
    lam_2: float = 0.0
    #: ``ts_aug`` mixup partner: ``dataset`` (the reference: a random image of the whole training set per
    #: view, rendered with the view's random draws) or ``batch`` (ours: a view of another image of the batch)
    mixup_partner: str = "dataset"
    #: the paper's ablations of the view-based methods: ``False`` (``--no-mixup``) uses the views unmixed;
    #: ``uncoupled_views`` draws the teacher's crop/flip/jitter independently of the student's
    mixup: bool = True
    uncoupled_views: bool = False
    #: ``fused_views`` (ours, off by default): each view rendered once at DR with one fused colour matrix and
    #: the student's view downsized from it, instead of the reference's per-resolution rendering (faster)
    fused_views: bool = False
    # the other asymmetric distillers (raml.engine.methods, raml.losses: equations and defaults' sources)
    aml_variant: str = "contrastive"
    aml_margin: float = 0.7
    rkd_distance_weight: float = 1.0
    rkd_angle_weight: float = 2.0
    csd_k: int = 16
    csd_temperature: float = 0.1
    csd_first_order_weight: float = 1.0
    d3_k: int = 10
    d3_alpha: float = 100.0
    d3_beta: float = 5.0
    d3_gamma: float = 1.0
    rop_k: int = 256
    rop_temperature: float = 0.1
    rop_rank_weight: float = 0.2
    # optimisation
    batch_size: int = 8
    update_every: int = 25
    lr: float = 1e-4
    optimizer: str = "adamW"
    scheduler: str = "onecycle"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    #: ours: each parameter group's schedule peaks at its own lr (GeM p at 10 x lr); the reference builds
    #: its scheduler with one ``max_lr = lr`` for every group
    group_lr_peaks: bool = False
    #: ours: step on the last incomplete ``--update-every`` accumulation of an epoch; the reference drops it
    flush_accumulation: bool = False
    seed: int = 1234
    # runtime
    workers: int = 8
    device: str = "auto"
    #: the reference's GPU string ('0', '0,1': the teacher on the second GPU); --device (not auto) wins
    gpu_id: str | None = "0"
    amp: bool = False
    print_freq: int = 10
    comment: str = ""
    logger: str = "none"
    eval_batch_size: int = 32
    # search / resume / outputs
    optimize: bool = False
    trials: int = 6
    #: the search scores a trial by its ``last`` validation (the reference) or its ``best`` epoch (ours)
    search_objective: str = "last"
    #: the reference's protocol: train on train + val, monitor the test datasets, keep the last epoch.
    #: ``False`` (``--select-on-val``): train on train only and keep the epoch with the best val mAP
    trainval: bool = True
    resume_student: str | None = None
    overwrite: bool = False
    json: str | None = None

    def validate(self) -> None:
        """Refuse inconsistent settings with messages that say how to fix them."""
        if self.student is None and self.student_path is None:
            raise ValueError("Give the student: --student ARCH (e.g. resnet50) or --student-path NETWORK.")
        if self.mode not in METHODS:  # the registry as it is now: a method registered after import counts
            raise ValueError(f"Unknown --mode {self.mode!r}; valid: {', '.join(METHODS)}.")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown --loss {self.loss!r}; valid: {', '.join(LOSSES)}.")
        part = next((p for p in ("trainval", "train", "val", "test") if self.training_dataset.endswith(f"-{p}")), None)
        if part is not None and not self.training_dataset.endswith(".json"):
            base = self.training_dataset[: -len(part) - 1]
            raise ValueError(
                f"--training-dataset {self.training_dataset!r} names a part of a dataset ('-{part}'); give the "
                f"dataset, {base!r}: a run trains on its train part (train + val with --trainval) and validates on "
                "its val part."
            )
        if self.bad_images not in ("error", "skip"):
            raise ValueError(f"Unknown --bad-images {self.bad_images!r}; valid: error, skip.")
        if self.mixup_partner not in MIXUP_PARTNERS:
            raise ValueError(f"Unknown --mixup-partner {self.mixup_partner!r}; valid: {', '.join(MIXUP_PARTNERS)}.")
        if self.search_objective not in SEARCH_OBJECTIVES:
            raise ValueError(
                f"Unknown --search-objective {self.search_objective!r}; valid: {', '.join(SEARCH_OBJECTIVES)}."
            )
        if self.logger not in LOGGERS:
            raise ValueError(f"Unknown --logger {self.logger!r}; valid: {', '.join(LOGGERS)}.")
        if self.mode != "sym" and self.teacher is None and self.teacher_path is None:
            raise ValueError(
                f"--mode {self.mode} distils from a teacher: give --teacher-path NETWORK (or --teacher ARCH)."
            )
        for name in (
            "epochs",
            "batch_size",
            "update_every",
            "image_size",
            "teacher_image_size",
            "pos_num",
            "query_size",
            "val_freq",
            "save_freq",
            "print_freq",
            "trials",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.image_sizes is not None:
            self._validate_image_sizes()
        if self.per_size_bn and len(self.student_sizes()) < 2:
            raise ValueError(
                "--per-size-bn estimates BatchNorm statistics for each of several student sizes; give them with "
                "--image-size 24,32,48 (or drop --per-size-bn)."
            )
        if self.mode == "sym" and self.neg_num < 1:
            raise ValueError(f"--neg-num must be at least 1 for triplet training, got {self.neg_num}.")
        for name in _FLOAT_RANGES:
            _check_float(name, getattr(self, name))
        self._validate_method_settings()
        self._validate_registry_choices()
        self._warn_ignored_settings()
        for name in ("workers", "neg_num"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}.")
        if self.workers > MAX_WORKERS:
            raise ValueError(f"--workers must be at most {MAX_WORKERS} data loader processes, got {self.workers}.")
        for name in ("pool_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}.")
        self._validate_mining_pool()
        if not 0 <= self.whitening <= MAX_WHITENING:
            raise ValueError(
                f"--whitening must be in [0, {MAX_WHITENING}] (the embedding's dimension; 0 = none), "
                f"got {self.whitening}."
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be in [0, 2**63 - 1], got {self.seed}.")

    def _method_reads(self) -> frozenset[str] | None:
        """``Method.reads`` of ``--mode`` (None where the method does not declare it), checked: a collection of
        :data:`METHOD_SETTINGS` names, else ``ValueError`` naming the method's class."""
        from raml.engine.methods import method_class

        cls = method_class(self.mode, self.loss)
        reads = cls.reads
        if reads is None:
            return None
        if isinstance(reads, str) or not isinstance(reads, set | frozenset | tuple | list):
            raise ValueError(
                f"--mode {self.mode}: {cls.__module__}.{cls.__qualname__}.reads must be a frozenset of method "
                f"setting names (raml.engine.config.METHOD_SETTINGS), got {reads!r}."
            )
        unknown = sorted(str(name) for name in reads if name not in METHOD_SETTINGS)
        if unknown:
            raise ValueError(
                f"--mode {self.mode}: {cls.__module__}.{cls.__qualname__}.reads names {', '.join(unknown)}, which "
                f"{'is not a method setting' if len(unknown) == 1 else 'are not method settings'}; valid: "
                f"{', '.join(METHOD_SETTINGS)}."
            )
        return frozenset(reads)

    def ignored_settings(self) -> list[str]:
        """The :data:`METHOD_SETTINGS` given a value other than their default that ``--mode`` does not read
        (its ``Method.reads``; none for a method that does not declare them: :meth:`validate` warns about that)."""
        reads = self._method_reads()
        if reads is None:
            return []
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        return [name for name in METHOD_SETTINGS if name not in reads and getattr(self, name) != defaults[name]]

    def changed_method_settings(self) -> list[str]:
        """The :data:`METHOD_SETTINGS` that ``--mode`` reads (every one, for a method that does not declare its
        ``Method.reads``) given a value other than their default, as given on the command line
        (``--csd-temperature 1e-40``): what a non-finite loss names beside ``--lr``."""
        reads = self._method_reads()
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        return [
            _given_flag(name, getattr(self, name))
            for name in METHOD_SETTINGS
            if (reads is None or name in reads) and getattr(self, name) != defaults[name]
        ]

    def _warn_ignored_settings(self) -> None:
        if self._method_reads() is None and (self.mode, "reads", "") not in _REPORTED_IGNORED:
            from raml.engine.methods import method_class

            _REPORTED_IGNORED.add((self.mode, "reads", ""))
            cls = method_class(self.mode, self.loss)
            logger.warning(
                "--mode %s: %s.%s declares no Method.reads, so a method setting it does not read cannot be reported "
                "as having no effect. Set reads on the class (a frozenset of raml.engine.config.METHOD_SETTINGS "
                "names; frozenset() for none).",
                self.mode,
                cls.__module__,
                cls.__qualname__,
            )
        ignored = self.ignored_settings()
        new = [name for name in ignored if (self.mode, name, repr(getattr(self, name))) not in _REPORTED_IGNORED]
        if not new:
            return
        _REPORTED_IGNORED.update((self.mode, name, repr(getattr(self, name))) for name in new)
        logger.warning(
            "--mode %s does not use %s: %s no effect on this run (config.yaml records the value as given). Drop "
            "what is listed, or choose the mode it belongs to (docs/methods.md).",
            self.mode,
            ", ".join(_given_flag(name, getattr(self, name)) for name in new),
            "it has" if len(new) == 1 else "they have",
        )

    def _validate_image_sizes(self) -> None:
        from raml.data.sizes import parse_image_sizes

        sizes = parse_image_sizes(self.image_sizes)
        if len(sizes) > 1 and self.mode == "sym":
            raise ValueError(
                f"--image-size {','.join(map(str, sizes))}: several student sizes need a distillation mode "
                "(--mode ts_aug or ts_reg); --mode sym trains at one size."
            )
        if sizes[0] != self.image_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be the first of image_sizes {sizes}; give the list alone "
                "(--image-size 24,32,48) and the first size becomes the default one."
            )
        too_big = [s for s in sizes if s > self.teacher_image_size]
        if too_big:
            raise ValueError(
                f"Student sizes {too_big} exceed --teacher-image-size {self.teacher_image_size}: the student views "
                "are the teacher's views downsized. Use sizes up to the teacher's."
            )

    def student_sizes(self) -> list[int]:
        """The student's training sizes: ``image_sizes``, or ``[image_size]``."""
        return list(self.image_sizes) if self.image_sizes else [self.image_size]

    def _validate_registry_choices(self) -> None:
        """--optimizer, --scheduler and --pool against their registries: the parser checks the flags, but a
        --config file's value was only refused once the networks were built (or, for --pool with a network
        file, never)."""
        from raml.engine.optim import OPTIMIZERS, SCHEDULERS  # torch: not when a parser is built
        from raml.models.pooling import POOLINGS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown --optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}.")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown --scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}.")
        if self.pool.lower() not in POOLINGS:
            raise ValueError(f"Unknown --pool {self.pool!r}; valid: {', '.join(sorted(POOLINGS))}.")

    def _validate_mining_pool(self) -> None:
        """A mode that mines ``--neg-num`` distinct negatives per anchor from a pool of ``--pool-size`` images
        (``sym`` with the triplet loss) needs a pool at least that large: refused here, before any network is built
        or embedded (:func:`raml.engine.mining.distance_weighted_negatives` checks the pool actually drawn)."""
        reads = self._method_reads()
        if reads is not None and {"neg_num", "pool_size"} <= reads and self.pool_size < self.neg_num:
            raise ValueError(
                f"--pool-size {self.pool_size} is smaller than --neg-num {self.neg_num}: --mode {self.mode} "
                f"(--loss {self.loss}) draws {self.neg_num} distinct negatives per anchor from the mining pool. "
                "Raise --pool-size or lower --neg-num."
            )

    def _validate_method_settings(self) -> None:
        if self.aml_variant not in AML_VARIANTS:
            raise ValueError(f"Unknown --aml-variant {self.aml_variant!r}; valid: {', '.join(AML_VARIANTS)}.")
        if self.csd_k < 1:
            raise ValueError(f"--csd-k must be at least 1 (the image itself), got {self.csd_k}.")
        if self.d3_k < 2:
            raise ValueError(f"--d3-k must be at least 2 (the image and one neighbour), got {self.d3_k}.")
        if self.rop_k < 1:
            raise ValueError(f"--rop-k must be at least 1 (the image itself), got {self.rop_k}.")

    def warn_about_rounding(self) -> None:
        """Log what the run will do other than asked: a ``sym`` batch is whole groups of ``GROUP_SIZE`` images of
        one class (the reference's spc), so another ``batch_size`` trains with the multiple of ``GROUP_SIZE``
        below it (at least one group). The reference instead cuts its groups across batches (docs/fidelity.md row
        27); such sizes are not refused, so that the reference's commands keep running."""
        from raml.engine.methods.labelled import GROUP_SIZE  # torch: not when a parser is built (raml train -h)

        if self.mode == "sym" and self.batch_size % GROUP_SIZE:
            low = max(GROUP_SIZE, self.batch_size // GROUP_SIZE * GROUP_SIZE)
            logger.warning(
                "--mode sym batches whole groups of %d images of one class: --batch-size %d trains with batches of "
                "%d (the reference instead cuts groups across batches: docs/fidelity.md row 27); give a multiple of "
                "%d (e.g. %d or %d) to train with the size you ask.",
                GROUP_SIZE, self.batch_size, low, GROUP_SIZE, low, low + GROUP_SIZE,
            )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """The configuration as a run's ``config.yaml`` records it (a valid ``--config`` file): every setting,
        with the :data:`PER_INVOCATION` ones at their defaults."""
        values = self.to_dict()
        for name in PER_INVOCATION:
            values[name] = config_fields()[name].default
        return values

    def record_text(self) -> str:
        """:meth:`record` as the text of ``<directory>/config.yaml``."""
        return yaml.safe_dump(self.record(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


#: what a --config file holds, for the messages that refuse one
EXPECTED_YAML = "a YAML mapping of TrainConfig keys, e.g. 'epochs: 10' and 'lr: 1.0e-4', one per line"
#: the largest --config file read: every flag with a long value fits in a few KiB; a larger file is not a
#: configuration (and is not parsed: nested aliases or nesting can make a small YAML file costly to build)
MAX_CONFIG_BYTES = 1 << 20
#: the YAML scalars a setting's value may be (a list or mapping is never one: str() of a nested alias expands it)
_SCALARS = (str, int, float, bool)


def _yaml_error_place(error: yaml.YAMLError) -> str:
    """`` at line L, column C`` (1-based) where the YAML parser tells, else nothing."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    text = ", ".join(p for p in parts if p)
    return text or str(error).splitlines()[0]


#: YAML 1.1 numbers that a reader of the file takes for decimals: ``010`` (octal: 8) and ``1:30`` (base 60: 90)
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for ``--config`` files, refusing what YAML 1.1 reads silently otherwise than written: a key
    given twice in one mapping (the last one won), a number with a leading zero (octal: ``epochs: 010`` was 8) and
    a number with colons (base 60: ``lr: 1:30`` was 90). A refusal is a ``yaml.YAMLError`` with the line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first.start_mark.line + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def _refuse_ambiguous_number(self, node: yaml.ScalarNode) -> None:
        text = str(node.value).strip()
        if _OCTAL.fullmatch(text):
            reading, advice = "octal", "drop the leading zeros"
        elif _SEXAGESIMAL.fullmatch(text):
            reading, advice = "a base-60 number", "write the number without colons"
        else:
            return
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"{text!r} is {reading} in YAML 1.1 (read as {self._default_number(node)!r}, not as written); {advice}",
            node.start_mark,
        )

    def _default_number(self, node: yaml.ScalarNode) -> Any:
        """The number YAML 1.1 reads ``node`` as, for the message."""
        if node.tag.endswith(":int"):
            return yaml.SafeLoader.construct_yaml_int(self, node)
        return yaml.SafeLoader.construct_yaml_float(self, node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        self._refuse_ambiguous_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        self._refuse_ambiguous_number(node)
        return super().construct_yaml_float(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_yaml_float)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of flag values (keys as flags, ``-`` or ``_``); unknown keys are an error, and so are a key
    given twice and the YAML 1.1 numbers read otherwise than written (``010`` octal, ``1:30`` base 60)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Config file {path} is a folder, expected a YAML file ({EXPECTED_YAML}).")
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"Config file {path} is {size} bytes, more than a configuration holds (at most {MAX_CONFIG_BYTES}); "
            f"expected {EXPECTED_YAML}."
        )
    try:
        text = path.read_bytes()[: MAX_CONFIG_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Config file {path} is not UTF-8 text (byte {error.start} cannot be decoded); expected a YAML file "
            f"({EXPECTED_YAML})."
        ) from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ValueError(
            f"Config file {path} is not valid YAML{_yaml_error_place(error)}: {_yaml_problem(error)}. "
            f"Expected {EXPECTED_YAML}."
        ) from None
    except (RecursionError, MemoryError) as error:  # lists or mappings nested thousands deep: not a configuration
        what = "nests too deeply to read" if isinstance(error, RecursionError) else "is too large to read"
        raise ValueError(
            f"Config file {path} is not valid YAML for a configuration: it {what}. Expected {EXPECTED_YAML}."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of flag: value, got {type(data).__name__}.")
    known = config_fields()
    result: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, _SCALARS):
            raise ValueError(f"Config file {path}: a key must be a flag name, got {_describe(key)}.")
        name = str(key).lstrip("-").replace("-", "_")
        if name == "test_datasets" and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if name not in known:
            raise ValueError(
                f"Config file {path}: unknown key {key!r}. Valid keys are the flags of 'raml train', e.g. "
                + ", ".join(sorted(known)[:12])
                + ", ..."
            )
        result[name] = _coerce(name, known[name].type, value, path)
        if name in PER_INVOCATION and result[name] != known[name].default:
            raise ValueError(
                f"Config file {path}: {key}: {value!r} is a setting of one invocation, which a --config file does "
                f"not give (replayed, it would {_PER_INVOCATION_RISK[name]}); remove it from the file and give "
                f"{_flag(name)} on the command line."
            )
    return result


_PER_INVOCATION_RISK = {
    "overwrite": "replace the checkpoints of any --directory it is used with",
    "json": "overwrite the results file of the run it was written for",
    "resume_student": "resume another run's checkpoint",
}


def _coerce(name: str, annotation: object, value: Any, source: Path) -> Any:
    """Convert a YAML value to the field's type (YAML 1.1 reads ``1e-4`` as a string, for instance)."""
    kind = str(annotation).replace(" ", "")
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"Config file {source}: {name} must not be empty.")
    try:
        if kind.startswith("float"):
            return _float_value(value)
        if kind.startswith("int"):
            return _int_value(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("list"):
            # a flat list of scalars (or one scalar / a comma-separated string for the sizes): a nested list or
            # a mapping is refused before anything turns it into text
            if isinstance(value, list) and not all(isinstance(v, _SCALARS) for v in value):
                raise ValueError
            if kind.startswith("list[int]"):
                from raml.data.sizes import parse_image_sizes

                if not isinstance(value, (list, *_SCALARS)):
                    raise ValueError
                return parse_image_sizes(value if isinstance(value, (str, list)) else [value])
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if kind.startswith("str"):
            if not isinstance(value, _SCALARS):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        hint = ""
        if isinstance(value, bool) and kind.startswith(("int", "float")):
            hint = " (YAML reads yes/no, on/off and true/false as a boolean, not a number)"
        elif kind.startswith("int") and isinstance(value, (float, str)):
            hint = " (a whole number, exactly: an integer, or e.g. 1e3 up to 2**53)"
        raise ValueError(
            f"Config file {source}: {name} expects a value of type {kind}, got {_describe(value)}{hint}."
        ) from None
    return value


#: the largest whole number read from a float or an exponent string (``1e3``): above it a float is not exact
_EXACT_FLOAT_INT = 2**53
_DIGITS = re.compile(r"[+-]?[0-9]+")


def _float_value(value: Any) -> float:
    """A float setting from YAML: a number, or a string Python reads as one (YAML 1.1 reads ``1e-4`` as text).
    A bool (``yes``, ``on``) is not a number: it raised no error and became 1.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    return float(value)


def _int_value(value: Any) -> int:
    """An int setting from YAML, exactly: an int, a digit string, or a whole float / exponent string (``1e3``)
    that a float holds exactly (at most 2**53) and is finite. ``int(float(v))`` rounded large ints (a seed of
    19 digits changed), and ``.inf`` raised OverflowError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    if not isinstance(value, (float, str)):
        raise ValueError
    number = float(value)
    if not math.isfinite(number) or not number.is_integer() or abs(number) > _EXACT_FLOAT_INT:
        raise ValueError
    return int(number)


def _describe(value: Any) -> str:
    """A short description of a YAML value for a message: a scalar's repr (cut), a container's kind and size only
    (the repr of nested aliases is exponentially long)."""
    if isinstance(value, (list, dict)):
        kind, unit = ("a list", "item") if isinstance(value, list) else ("a mapping", "key")
        return f"{kind} of {len(value)} {unit}{'' if len(value) == 1 else 's'}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def part_name(base: str, part: str) -> str:
    """Split name for a part of a dataset: ``cub`` + ``val`` -> ``cub-val``; JSON files use ``file.json:val``."""
    if part == "train":
        return base
    if base.endswith(".json") or ":" in base:
        return f"{base.split(':')[0]}:{part}"
    return f"{base}-{part}"
