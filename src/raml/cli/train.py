"""``raml train`` (and ``python main.py``): every flag of the seed's ``main.py`` plus a few of ours.

Precedence: command-line flags > ``--config FILE.yaml`` > the reference's defaults (SPEC section 6).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from raml.cli.choices import OPTIMIZER_NAMES, SCHEDULER_NAMES
from raml.cli.common import (
    WORKERS_HELP,
    add_bad_images_arg,
    check_output_files,
    default_workers,
    devices_from_gpu_id,
    image_sizes_arg,
    optional_comma_list,
    parse_gpu_id,
    seed_int,
    setup_logging,
    workers_int,
    write_json,
)
from raml.engine.config import (
    AML_VARIANTS,
    LOGGERS,
    LOSSES,
    MAX_WHITENING,
    MIXUP_PARTNERS,
    PER_INVOCATION,
    RUN_CONFIG_NAME,
    SEARCH_OBJECTIVES,
    TrainConfig,
    load_yaml_config,
)
from raml.engine.methods import METHODS, method_help
from raml.entry import InputFiles, dataset_inputs, network_inputs

logger = logging.getLogger("raml")

#: flags given as a pair where one excludes the other; a flag on the command line drops its twin from YAML
EXCLUSIVE = (("student", "student_path"), ("teacher", "teacher_path"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        description=textwrap.fill(
            "Train with labels (--mode sym) or distil a low-resolution student from a frozen high-resolution "
            "teacher without labels (--mode ts_aug, the paper's method, or another method below).",
            100,
        ),
        epilog=method_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    d = TrainConfig()
    net = parser.add_argument_group("networks")
    for role, short in (("student", "s"), ("teacher", "t")):
        group = net.add_mutually_exclusive_group()
        group.add_argument(
            f"--{role}-path",
            f"-{short}path",
            metavar="NETWORK",
            help=f"{role} checkpoint: file, name in <data-root>/networks/, or published name",
        )
        group.add_argument(
            f"--{role}", f"-{short}", metavar="ARCH", help=f"{role} architecture (torchvision or timm name)"
        )
    net.add_argument("--pool", "-p", metavar="POOL", help=f"global pooling: gem, gemmp, mac, spoc (default {d.pool})")
    net.add_argument(
        "--whitening",
        "-w",
        type=int,
        metavar="DIM",
        help=f"linear whitening output dimension, 0 = none, at most {MAX_WHITENING} (default {d.whitening})",
    )
    net.add_argument(
        "--not-pretrained",
        dest="pretrained",
        action="store_false",
        default=None,
        help="start the student (--student ARCH) from random weights",
    )
    net.add_argument(
        "--pretrained-weights",
        metavar="TAG",
        help="ImageNet weights for --student/--teacher ARCH: v1 (default; torchvision's IMAGENET1K_V1, what the "
        "reference's pretrained=True loads), default (torchvision's DEFAULT, e.g. V2 for ResNet-50), a "
        "torchvision weights name such as IMAGENET1K_V2, or a timm pretrained tag",
    )
    net.add_argument(
        "--train-bn",
        dest="freeze_bn",
        action="store_false",
        default=None,
        help="update the student's BatchNorm statistics (default: frozen, as in the reference; "
        "use this when training from random weights)",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--training-dataset", "-d", metavar="DATASET", help=f"default {d.training_dataset}")
    data.add_argument(
        "--test-datasets",
        "-td",
        type=optional_comma_list,
        metavar="DATASETS",
        help="comma-separated test splits, evaluated every --val-freq epochs as monitoring and at the end "
        "(default cub-test)",
    )
    data.add_argument("--data-root", metavar="DATA_DIR", help=f"default {d.data_root}")
    data.add_argument("--directory", metavar="EXPORT_DIR", help=f"run outputs (default {d.directory})")
    add_bad_images_arg(data, default=None)
    data.add_argument("--val-ratio", type=float, help=f"share of training classes held out (default {d.val_ratio})")
    sched = parser.add_argument_group("schedule")
    sched.add_argument(
        "--no-val",
        dest="val",
        action="store_false",
        default=None,
        help="no periodic evaluation (of the test datasets; of the val classes with --select-on-val)",
    )
    sched.add_argument("--val-freq", type=int, metavar="N", help=f"evaluate every N epochs (default {d.val_freq})")
    sched.add_argument("--save-freq", type=int, metavar="N", help=f"default {d.save_freq}")
    sched.add_argument("--epochs", type=int, metavar="N", help=f"default {d.epochs}")
    sched.add_argument(
        "--select-on-val",
        dest="trainval",
        action="store_false",
        default=None,
        help="ours: train on the train classes only, validate on the held-out val classes and keep the epoch "
        "with the best val mAP (default: the reference's protocol: train on train + val, monitor the test "
        "datasets, keep and test the last epoch)",
    )
    method = parser.add_argument_group("method")
    # the registry when the parser is built: methods registered before (register_method) are choices
    modes = tuple(METHODS)
    method.add_argument("--mode", "-m", choices=modes, help=f"training method, listed below (default {d.mode})")
    method.add_argument(
        "--loss",
        choices=LOSSES,
        help="sym-mode loss: triplet (the reference) or normsoftmax (proxy loss, learns fast from random "
        f"weights; default {d.loss})",
    )
    method.add_argument("--loss-margin", "-lm", type=float, metavar="LM", help=f"default {d.loss_margin}")
    method.add_argument(
        "--image-size",
        type=image_sizes_arg,
        metavar="N[,N...]",
        help=f"student / query size QR (default {d.image_size}); several sizes (e.g. 24,32,48, distillation modes "
        "only) train one student for all of them, one size drawn per batch",
    )
    method.add_argument(
        "--per-size-bn",
        action="store_true",
        default=None,
        help="with several --image-size sizes: after training, estimate BatchNorm statistics per size on the "
        "training images, chosen by the query's size at inference (see docs/resolutions.md)",
    )
    method.add_argument(
        "--teacher-image-size",
        type=int,
        metavar="N",
        help=f"teacher / database size DR (default {d.teacher_image_size})",
    )
    method.add_argument("--neg-num", "-nn", type=int, metavar="N", help=f"negatives per anchor (default {d.neg_num})")
    method.add_argument(
        "--pos-num", "-pn", type=int, metavar="N", help=f"coupled views per image (default {d.pos_num})"
    )
    method.add_argument("--query-size", "-qs", type=int, metavar="N", help=f"images per epoch (default {d.query_size})")
    method.add_argument(
        "--pool-size", "-ps", type=int, metavar="N", help=f"negative mining pool (default {d.pool_size})"
    )
    method.add_argument("--lam-1", type=float, metavar="L1", help=f"weight of relative term 1 (default {d.lam_1})")
    method.add_argument("--lam-2", type=float, metavar="L2", help=f"weight of relative term 2 (default {d.lam_2})")
    method.add_argument(
        "--mixup-partner",
        choices=MIXUP_PARTNERS,
        help="ts_aug mixup partner of each view: dataset (default, the reference: a random image of the whole "
        "training set rendered with the view's random draws) or batch (ours: a view of another image of the "
        "batch, cheaper to load)",
    )
    method.add_argument(
        "--no-mixup",
        dest="mixup",
        action="store_false",
        default=None,
        help="view-based methods (ts_aug, aml, rkd, csd, d3, rop): no mixup, the views as rendered (an ablation)",
    )
    method.add_argument(
        "--uncoupled-views",
        action="store_true",
        default=None,
        help="view-based methods: independent crop/flip/jitter draws for the teacher's view of an image instead "
        "of the student's (an ablation)",
    )
    method.add_argument(
        "--fused-views",
        action="store_true",
        default=None,
        help="view-based methods: render each view once at DR with one fused colour matrix and downsize it to QR "
        "(faster; not the reference's pixels: a blurrier student view, hue by a rotation, one clip; "
        "docs/fidelity.md)",
    )
    others = parser.add_argument_group("settings of the other distillers (defaults: raml.losses docstrings)")
    others.add_argument("--aml-variant", choices=AML_VARIANTS, help=f"aml loss (default {d.aml_variant})")
    others.add_argument("--aml-margin", type=float, metavar="M", help=f"aml margin (default {d.aml_margin})")
    for flag, kind, text in (
        ("rkd-distance-weight", float, "rkd distance-wise weight"),
        ("rkd-angle-weight", float, "rkd angle-wise weight"),
        ("csd-k", int, "csd context size, the image included"),
        ("csd-temperature", float, "csd softmax temperature"),
        ("csd-first-order-weight", float, "csd first-order term weight"),
        ("d3-k", int, "d3 top-k, the image included"),
        ("d3-alpha", float, "d3 first-order weight"),
        ("d3-beta", float, "d3 hard-pair weight"),
        ("d3-gamma", float, "d3 easy-pair weight"),
        ("rop-k", int, "rop top-k, the image included"),
        ("rop-temperature", float, "rop temperature of the student's indicator"),
        ("rop-rank-weight", float, "rop scale of the teacher's similarities in the rank weights"),
    ):
        default = getattr(d, flag.replace("-", "_"))
        others.add_argument(f"--{flag}", type=kind, metavar="X", help=f"{text} (default {default})")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--batch-size",
        "-b",
        type=int,
        metavar="N",
        help=f"default {d.batch_size}; sym: whole groups of 4 images of a class, rounded down (docs/fidelity.md 27)",
    )
    opt.add_argument(
        "--update-every", "-u", type=int, metavar="N", help=f"gradient accumulation (default {d.update_every})"
    )
    opt.add_argument(
        "--flush-accumulation",
        action="store_true",
        default=None,
        help="ours: step on the last incomplete --update-every accumulation of an epoch (default: dropped, as "
        "in the reference)",
    )
    opt.add_argument("--lr", "--learning-rate", type=float, metavar="LR", help=f"learning rate (default {d.lr})")
    opt.add_argument("--optimizer", "-o", choices=list(OPTIMIZER_NAMES), help=f"default {d.optimizer}")
    opt.add_argument("--scheduler", choices=list(SCHEDULER_NAMES), help=f"default {d.scheduler}")
    opt.add_argument(
        "--group-lr-peaks",
        action="store_true",
        default=None,
        help="ours: onecycle/cyclic peak at each parameter group's own lr (GeM p at 10 x lr); default: one "
        "max_lr = --lr for every group, as in the reference",
    )
    opt.add_argument("--momentum", type=float, metavar="M", help=f"SGD momentum (default {d.momentum})")
    opt.add_argument("--weight-decay", "--wd", type=float, metavar="W", help=f"default {d.weight_decay}")
    opt.add_argument("--seed", type=seed_int, help=f"0 to 2**63 - 1 (default {d.seed})")
    opt.add_argument("--optimize", action="store_true", default=None, help="optuna search, then train on train+val")
    opt.add_argument("--trials", type=int, metavar="N", help=f"search trials (default {d.trials})")
    opt.add_argument(
        "--search-objective",
        choices=SEARCH_OBJECTIVES,
        help="score of a search trial: its last validation (default, the reference) or its best epoch (ours)",
    )
    run_group = parser.add_argument_group("runtime")
    run_group.add_argument("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...; wins over -g")
    run_group.add_argument(
        "--gpu-id",
        "-g",
        metavar="N",
        help="the reference's GPU string: '0' (default), or '0,1' to put the teacher on the second GPU; "
        "falls back to the CPU where no GPU exists",
    )
    run_group.add_argument(
        "--workers", "-j", type=workers_int, metavar="N", help=WORKERS_HELP.format(default_workers())
    )
    run_group.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on GPU")
    run_group.add_argument("--print-freq", type=int, metavar="N", help=f"default {d.print_freq}")
    run_group.add_argument("--comment", "-c", help="free text stored with the run's configuration")
    run_group.add_argument("--logger", choices=LOGGERS, help="tensorboard writes scalars to <directory>/tensorboard")
    run_group.add_argument(
        "--resume-student",
        metavar="FILENAME",
        help="continue from a training checkpoint: a file in --directory (as the reference), a path, or 'last'",
    )
    run_group.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="allow replacing checkpoints already in --directory",
    )
    run_group.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="flag values from a YAML file (the command line wins; every on/off flag has its opposite to set back "
        "what the file sets: --no-FLAG, or FLAG without its --no-/--not- prefix, e.g. --no-amp, --val, --pretrained)",
    )
    run_group.add_argument("--json", metavar="PATH", help="write the final test results (percent) as JSON")
    run_group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run_group.add_argument("--verbose", action="store_true", help="debug logging")
    add_opposite_flags(parser)
    parser.set_defaults(func=run)


def opposite_flag(flag: str) -> str:
    """The flag that sets the other value of an on/off setting: ``--no-val`` -> ``--val``, ``--not-pretrained`` ->
    ``--pretrained``, ``--amp`` -> ``--no-amp``."""
    for prefix in ("--no-", "--not-"):
        if flag.startswith(prefix):
            return "--" + flag[len(prefix) :]
    return "--no-" + flag[2:]


def add_opposite_flags(parser: argparse.ArgumentParser) -> None:
    """Give every on/off setting of a run its opposite flag, so that the command line can set back what a
    ``--config`` file sets (flags > --config): each one-way flag whose setting is a :class:`TrainConfig` field and
    "not given" by default (None) gets :func:`opposite_flag`, storing the other value in the same setting. Listed
    in ``--config``'s help, not one by one."""
    fields = TrainConfig.__dataclass_fields__
    for action in list(parser._actions):
        if not isinstance(action, argparse._StoreConstAction) or action.default is not None:
            continue
        if action.dest not in fields or action.dest in PER_INVOCATION or not isinstance(action.const, bool):
            continue  # a setting of one invocation (--overwrite) is never in a --config file
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        parser.add_argument(
            *(opposite_flag(flag) for flag in long_flags),
            dest=action.dest,
            action=_OppositeFlag,
            const=not action.const,
            default=None,
            help=argparse.SUPPRESS,
        )


class _OppositeFlag(argparse.Action):
    """An opposite flag (:func:`add_opposite_flags`): stores ``const``, and takes no value. Two of them
    (``--pretrained``, ``--mixup``) were once abbreviations of ``--pretrained-weights`` and ``--mixup-partner``:
    given a value, the error names the longer flag instead of leaving the value unrecognized."""

    def __init__(self, option_strings: list[str], dest: str, const: Any = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", const=const, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if isinstance(values, str):  # nargs "?": the const when no value follows
            longer = sorted(s for s in parser._option_string_actions if s.startswith(f"{option_string}-"))
            # the flag it once abbreviated, where it was the only one (--val was ambiguous: --val-freq, --val-ratio)
            hint = f"; for {longer[0]}, spell it out: {longer[0]} {values}" if len(longer) == 1 else ""
            parser.error(f"{option_string} takes no value (it sets back a --config file's setting){hint}")
        setattr(namespace, self.dest, self.const)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults < YAML < command line into a :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_yaml_config(args.config))
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    for first, second in EXCLUSIVE:
        given = first in explicit or second in explicit
        if not given and values.get(first) is not None and values.get(second) is not None:
            raise ValueError(
                f"{args.config} sets both {first} and {second}, which exclude each other (--{first} or "
                f"--{second.replace('_', '-')}); keep one, or give one on the command line."
            )
        if first in explicit:
            values.pop(second, None)
        if second in explicit:
            values.pop(first, None)
    values.update(explicit)
    if "image_size" in explicit:  # --image-size N or N,N,...: the first size is the default one
        given = explicit["image_size"]
        values["image_size"], values["image_sizes"] = (given[0], given) if isinstance(given, list) else (given, None)
    elif values.get("image_sizes") and "image_size" not in values:  # a YAML file with image_sizes only
        values["image_size"] = values["image_sizes"][0]
    if "workers" not in values:
        values["workers"] = default_workers()
    if values.get("gpu_id") is not None:
        try:
            parse_gpu_id(values["gpu_id"])
        except argparse.ArgumentTypeError as error:
            raise ValueError(str(error)) from None
    config = TrainConfig(**values)
    config.validate()
    return config


def refuse_config_file_as_record(config_file: Path | None, config: TrainConfig) -> None:
    """Refuse (one line, exit 2) a ``--config`` file that is the run's own record, ``<directory>/config.yaml``,
    when the run would rewrite it with other content (its comments, its layout, settings changed on the command
    line, or ``--optimize``'s searched values), even with ``--overwrite``: the user's file would be lost. A replay
    of a record raml wrote, unchanged, rewrites the same text and goes on."""
    if config_file is None:
        return
    record = Path(config.directory) / RUN_CONFIG_NAME
    if config_file.resolve() != record.resolve():
        return
    if not config.optimize and config_file.is_file() and config_file.read_bytes() == config.record_text().encode():
        return
    how = "with the searched values" if config.optimize else "with other content (its comments and layout are lost)"
    raise SystemExit(
        f"raml train: error: --config {config_file} is the run's own record {record}, which this run rewrites {how}; "
        "nothing was changed. Copy it elsewhere and pass the copy to --config, or use another --directory."
    )


#: the --optimize study's SQLite database and its side files (raml.engine.search: ``<directory>/optuna.db``), and
#: a trial's folder (``<directory>/trial_<n>``)
_STUDY_FILE = re.compile(r"optuna\.db(-journal|-wal|-shm)?")
_TRIAL_FOLDER = re.compile(r"trial_\d+")


def _run_files(directory: Path) -> InputFiles:
    """The files a run owns in its ``--directory`` (by the trainer's names: config.yaml, its checkpoints, its lock,
    the skipped-image reports, their temporary files, the TensorBoard event files; with ``--optimize``, the
    study's ``optuna.db`` and its SQLite side files, and the same files of each ``trial_<n>`` folder), as an input
    of :func:`check_output_files`: a report never replaces one of them; any other file in the folder is fine."""
    from raml.engine.trainer import (
        _RUN_CHECKPOINT,
        _RUN_REPORT,
        _RUN_TEMPORARY,
        _TENSORBOARD_EVENTS,
        _TENSORBOARD_FOLDER,
    )
    from raml.locking import LOCK_NAME

    run_folder = os.path.normcase(os.path.realpath(directory))
    events_folder = os.path.normcase(os.path.realpath(directory / _TENSORBOARD_FOLDER))

    def a_run_file(name: str) -> bool:
        return name in (RUN_CONFIG_NAME, LOCK_NAME) or any(
            pattern.fullmatch(name) for pattern in (_RUN_CHECKPOINT, _RUN_REPORT, _RUN_TEMPORARY)
        )

    def a_trial(folder: str) -> bool:  # <directory>/trial_<n>, where --optimize trains its trials
        parent, leaf = os.path.split(folder)
        return parent == run_folder and _TRIAL_FOLDER.fullmatch(leaf) is not None

    def owns(folder: str, name: str) -> bool:
        parent, leaf = os.path.split(folder)
        if folder == events_folder or (leaf == _TENSORBOARD_FOLDER and a_trial(parent)):
            return bool(_TENSORBOARD_EVENTS.fullmatch(name))
        if folder == run_folder:
            return a_run_file(name) or _STUDY_FILE.fullmatch(name) is not None
        return a_trial(folder) and a_run_file(name)

    return InputFiles("--directory", f"a file of the training run in --directory {str(directory)!r}", owns=owns)


def run(args: argparse.Namespace) -> int:
    from raml.distributed import init_distributed
    from raml.engine.device import prepare_cuda_device
    from raml.engine.search import optimize_and_train
    from raml.engine.trainer import Trainer
    from raml.retrieval.evaluate import format_results_table

    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"raml train: error: {error}") from error
    if config.optimize and config.resume_student is not None:  # before the search, not after it
        raise SystemExit(
            "raml train: error: --optimize cannot --resume-student: the search trains its trials from the start and "
            "the final run starts from the values it picks. Resume a run without --optimize (its config.yaml lists "
            "its settings), or run the search into a new --directory."
        )
    refuse_config_file_as_record(args.config, config)
    if config.json is not None:  # before training, not after it; never into what the run reads
        inputs = [
            ("--config", args.config),
            *network_inputs("--student-path", config.student_path, config.data_root),
            *network_inputs("--teacher-path", config.teacher_path, config.data_root),
            *dataset_inputs("--training-dataset", config.training_dataset, config.data_root, config.val_ratio),
            *(
                source
                for name in config.test_datasets
                for source in dataset_inputs("--test-datasets", name, config.data_root, config.val_ratio)
            ),
            _run_files(Path(config.directory)),
        ]
        if config.resume_student not in (None, "last"):
            from raml.engine.resume import resume_candidates

            resumed = resume_candidates(config.resume_student, Path(config.directory))
            inputs += [("--resume-student", path) for path in resumed]
        check_output_files([("--json", config.json, None)], inputs)
    # Under torchrun every process joins the group and gets its own device; otherwise choose one as usual.
    dist, dist_device = init_distributed(config.device)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if dist_device is not None:
        device = teacher_device = dist_device
    else:
        try:
            device, teacher_device = devices_from_gpu_id(config.gpu_id, config.device)
        except (RuntimeError, ValueError) as error:
            raise SystemExit(f"raml train: error: {error}") from error
    # The student's GPU becomes the current one (else the pin-memory thread makes a context on GPU 0 with
    # -g 1), cudnn.benchmark goes on, and --amp is refused where bf16 is emulated (see raml.engine.device).
    try:
        prepare_cuda_device(device, config.amp)
    except ValueError as error:
        raise SystemExit(f"raml train: error: {error}") from error
    progress = not args.no_progress
    if config.per_size_bn and (config.optimize or dist.enabled):
        raise SystemExit(
            "raml train: error: --per-size-bn runs in a single process without --optimize; estimate the statistics "
            "of the finished run's checkpoint in a single-process run instead."
        )
    if config.optimize:
        if dist.enabled:
            raise SystemExit("raml train: --optimize runs in a single process; launch it without torchrun.")
        try:
            best, result = optimize_and_train(config, device, progress, teacher_device=teacher_device)
        except ImportError as error:  # optuna missing: say how to install it
            raise SystemExit(f"raml train: error: {error}") from error
        logger.info("Search picked %s", best)
    else:
        # the run folder stays locked until its checkpoint is final (--per-size-bn rewrites it) and tested
        trainer = Trainer(config, device, progress=progress, dist=dist, teacher_device=teacher_device, keep_lock=True)
        try:
            result = trainer.run()
            if config.per_size_bn:
                _add_per_size_bn(trainer, result.best_checkpoint, device, progress)
            result.test = trainer.test() if config.test_datasets else {}
        finally:
            trainer.release_lock()
    if not dist.is_main:
        return 0
    logger.info("Best checkpoint: %s (epoch %d)", result.best_checkpoint, result.best_epoch)
    if result.test:
        print(format_results_table(result.test))
    if config.json is not None:
        write_json(config.json, result.test)
    return 0


def _add_per_size_bn(trainer: Any, checkpoint: Path, device: Any, progress: bool) -> None:
    """``--per-size-bn``: the kept checkpoint gets BatchNorm statistics per student size (training images)."""
    from raml.retrieval.size_bn import recalibrate_checkpoint

    config = trainer.config
    recalibrate_checkpoint(
        checkpoint,
        trainer.train_paths,
        config.student_sizes(),
        device,
        batch_size=config.eval_batch_size,
        workers=config.workers,
        progress=progress,
    )
