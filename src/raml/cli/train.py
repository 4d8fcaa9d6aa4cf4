"""``raml train`` (and ``python main.py``): every flag of the seed's ``main.py`` plus a few of ours.

Precedence: command-line flags > ``--config FILE.yaml`` > the reference's defaults (SPEC section 6).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from raml.cli.common import (
    add_bad_images_arg,
    default_workers,
    device_from_args,
    optional_comma_list,
    setup_logging,
    write_json,
)
from raml.engine.config import LOGGERS, LOSSES, MODES, TrainConfig, load_yaml_config
from raml.engine.optim import OPTIMIZERS, SCHEDULERS
from raml.retrieval.evaluate import format_results_table

logger = logging.getLogger("raml")

#: flags given as a pair where one excludes the other; a flag on the command line drops its twin from YAML
EXCLUSIVE = (("student", "student_path"), ("teacher", "teacher_path"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a teacher (sym) or distil a student (ts_aug, ts_reg)",
        description="Train with labels (--mode sym) or distil a low-resolution student from a frozen "
        "high-resolution teacher without labels (--mode ts_aug, the paper's method, or ts_reg).",
        argument_default=None,
    )
    d = TrainConfig()
    net = parser.add_argument_group("networks")
    for role in ("student", "teacher"):
        group = net.add_mutually_exclusive_group()
        group.add_argument(
            f"--{role}-path",
            metavar="NETWORK",
            help=f"{role} checkpoint: file, name in <data-root>/networks/, or published name",
        )
        group.add_argument(f"--{role}", metavar="ARCH", help=f"{role} architecture (torchvision or timm name)")
    net.add_argument("--pool", help=f"global pooling: gem, gemmp, mac, spoc (default {d.pool})")
    net.add_argument(
        "--whitening",
        type=int,
        metavar="DIM",
        help=f"linear whitening output dimension, 0 = none (default {d.whitening})",
    )
    net.add_argument(
        "--not-pretrained",
        dest="pretrained",
        action="store_false",
        default=None,
        help="start the student (--student ARCH) from random weights",
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
    data.add_argument("--training-dataset", metavar="DATASET", help=f"default {d.training_dataset}")
    data.add_argument("--test-datasets", type=optional_comma_list, metavar="DATASETS", help="default cub-test")
    data.add_argument("--data-root", metavar="DATA_DIR", help=f"default {d.data_root}")
    data.add_argument("--directory", metavar="EXPORT_DIR", help=f"run outputs (default {d.directory})")
    add_bad_images_arg(data, default=None)
    data.add_argument("--val-ratio", type=float, help=f"share of training classes held out (default {d.val_ratio})")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--no-val", dest="val", action="store_false", default=None, help="no validation")
    sched.add_argument("--val-freq", type=int, metavar="N", help=f"default {d.val_freq}")
    sched.add_argument("--save-freq", type=int, metavar="N", help=f"default {d.save_freq}")
    sched.add_argument("--epochs", type=int, metavar="N", help=f"default {d.epochs}")
    method = parser.add_argument_group("method")
    method.add_argument("--mode", choices=MODES, help=f"default {d.mode}")
    method.add_argument(
        "--loss",
        choices=LOSSES,
        help="sym-mode loss: triplet (the reference) or normsoftmax (proxy loss, learns fast from random "
        f"weights; default {d.loss})",
    )
    method.add_argument("--loss-margin", type=float, metavar="LM", help=f"default {d.loss_margin}")
    method.add_argument("--image-size", type=int, metavar="N", help=f"student / query size QR (default {d.image_size})")
    method.add_argument(
        "--teacher-image-size",
        type=int,
        metavar="N",
        help=f"teacher / database size DR (default {d.teacher_image_size})",
    )
    method.add_argument("--neg-num", type=int, metavar="N", help=f"negatives per anchor (default {d.neg_num})")
    method.add_argument("--pos-num", type=int, metavar="N", help=f"coupled views per image (default {d.pos_num})")
    method.add_argument("--query-size", type=int, metavar="N", help=f"images per epoch (default {d.query_size})")
    method.add_argument("--pool-size", type=int, metavar="N", help=f"negative mining pool (default {d.pool_size})")
    method.add_argument("--lam-1", type=float, metavar="L1", help=f"weight of relative term 1 (default {d.lam_1})")
    method.add_argument("--lam-2", type=float, metavar="L2", help=f"weight of relative term 2 (default {d.lam_2})")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, metavar="N", help=f"default {d.batch_size}")
    opt.add_argument("--update-every", type=int, metavar="N", help=f"gradient accumulation (default {d.update_every})")
    opt.add_argument("--lr", type=float, metavar="LR", help=f"learning rate (default {d.lr})")
    opt.add_argument("--optimizer", choices=list(OPTIMIZERS), help=f"default {d.optimizer}")
    opt.add_argument("--scheduler", choices=list(SCHEDULERS), help=f"default {d.scheduler}")
    opt.add_argument("--momentum", type=float, metavar="M", help=f"SGD momentum (default {d.momentum})")
    opt.add_argument("--weight-decay", type=float, metavar="W", help=f"default {d.weight_decay}")
    opt.add_argument("--seed", type=int, help=f"default {d.seed}")
    opt.add_argument("--optimize", action="store_true", default=None, help="optuna search, then train on train+val")
    opt.add_argument("--trials", type=int, metavar="N", help=f"search trials (default {d.trials})")
    run_group = parser.add_argument_group("runtime")
    run_group.add_argument("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    run_group.add_argument("--gpu-id", type=int, metavar="N", help="CUDA device index (same as --device cuda:N)")
    run_group.add_argument(
        "--workers", type=int, metavar="N", help=f"data loader workers (default {default_workers()})"
    )
    run_group.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on GPU")
    run_group.add_argument("--print-freq", type=int, metavar="N", help=f"default {d.print_freq}")
    run_group.add_argument("--comment", help="free text stored with the run's configuration")
    run_group.add_argument("--logger", choices=LOGGERS, help="tensorboard writes scalars to <directory>/tensorboard")
    run_group.add_argument("--resume-student", metavar="FILENAME", help="continue from a training checkpoint")
    run_group.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="allow replacing checkpoints already in --directory",
    )
    run_group.add_argument("--config", type=Path, metavar="FILE.yaml", help="flag values from a YAML file")
    run_group.add_argument("--json", metavar="PATH", help="write the final test results (percent) as JSON")
    run_group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run_group.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults < YAML < command line into a :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_yaml_config(args.config))
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    for first, second in EXCLUSIVE:
        if first in explicit:
            values.pop(second, None)
        if second in explicit:
            values.pop(first, None)
    values.update(explicit)
    if "workers" not in values:
        values["workers"] = default_workers()
    if args.gpu_id is not None and values.get("device", "auto") == "auto":
        values["device"] = f"cuda:{args.gpu_id}"
    config = TrainConfig(**values)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    from raml.distributed import init_distributed
    from raml.engine.search import optimize_and_train
    from raml.engine.trainer import Trainer

    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"raml train: error: {error}") from error
    # Under torchrun every process joins the group and gets its own device; otherwise choose one as usual.
    dist, dist_device = init_distributed(config.device)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    args.device = config.device
    device = dist_device or device_from_args(args)
    progress = not args.no_progress
    if config.optimize:
        if dist.enabled:
            raise SystemExit("raml train: --optimize runs in a single process; launch it without torchrun.")
        best, result = optimize_and_train(config, device, progress)
        logger.info("Search picked %s", best)
    else:
        trainer = Trainer(config, device, progress=progress, dist=dist)
        result = trainer.run()
        result.test = trainer.test() if config.test_datasets else {}
    if not dist.is_main:
        return 0
    logger.info("Best checkpoint: %s (epoch %d)", result.best_checkpoint, result.best_epoch)
    if result.test:
        print(format_results_table(result.test))
    if config.json is not None:
        write_json(config.json, result.test)
    return 0
