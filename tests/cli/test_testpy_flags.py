"""``python test.py`` / ``raml test`` (and ``raml extract``) accept the reference's flags and aliases.

Flags are looked up in the parser's own option-string table, never in help text. The reference's test.py
flags, types and defaults are written out here from its source (``pavelsuma/raml`` ``test.py``).
"""

from __future__ import annotations

import argparse
import os
import shlex

import pytest

from raml.cli import evaluate as test_cli
from raml.cli import extract as extract_cli
from raml.cli.common import WORKERS_HELP, default_workers
from raml.entry import DEFAULT_POOL, DEFAULT_WHITENING


def _subparser(module) -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="raml")
    subparsers = root.add_subparsers(dest="command")
    module.add_parser(subparsers)
    (parser,) = subparsers.choices.values()
    return parser


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return _subparser(test_cli)


@pytest.fixture(scope="module")
def extract_parser() -> argparse.ArgumentParser:
    return _subparser(extract_cli)


# (option strings of the reference, dest, our default after parsing, the reference's default as it parses)
REFERENCE_TEST_FLAGS = [
    (("--student", "-s"), "student", None, "resnet50"),  # unreachable there: the group is required
    (("--student-path", "-spath"), "student_path", None, None),
    (("--teacher", "-t"), "teacher", None, None),
    (("--teacher-path", "-tpath"), "teacher_path", None, None),
    (("--pool", "-p"), "pool", None, "gem"),  # None = not given: gem for ARCH, the checkpoint's meta otherwise
    (("--whitening", "-w"), "whitening", None, 0),  # likewise: 0 for ARCH
    (("--data-root",), "data_root", "data", None),
    (("--datasets", "-d"), "datasets", ["cub-test"], "cub-test"),
    # None = not given: the student's first trained size (meta["image_sizes"]), 224 for a network without one
    (("--image-size", "-imsize"), "image_size", None, 224),
    (("--teacher-image-size", "-timsize"), "teacher_image_size", 448, 448),
    (("--multiscale", "-ms"), "multiscale", (1.0,), "[1]"),
    (("--workers", "-j"), "workers", default_workers(), 8),
    (("--gpu-id", "-g"), "gpu_id", "0", "0"),
    (("--sym",), "sym", False, False),
]


@pytest.mark.parametrize(("options", "dest", "default", "reference_default"), REFERENCE_TEST_FLAGS)
def test_every_reference_flag_and_alias_is_an_option(parser, options, dest, default, reference_default):
    actions = {parser._option_string_actions[option] for option in options}  # KeyError = missing flag
    assert len(actions) == 1, f"{options} are not aliases of one flag"
    (action,) = actions
    assert action.dest == dest
    assert set(options) <= set(action.option_strings)
    parsed_default = parser.parse_args(["-s", "resnet18"]).__dict__[dest]
    if dest == "student":
        return
    assert parsed_default == default
    assert type(parsed_default) is type(default)


def test_defaults_resolve_to_the_reference_values(parser):
    args = parser.parse_args(["--student-path", "x"])
    assert (args.image_size or test_cli.DEFAULT_TEST_SIZE) == 224 and args.teacher_image_size == 448
    assert args.datasets == ["cub-test"]  # the reference splits its string on commas
    assert args.multiscale == (1.0,)  # the reference's '[1]'
    assert args.gpu_id == "0" and isinstance(args.gpu_id, str)
    assert args.workers == min(8, os.cpu_count() or 1)
    assert (args.pool or DEFAULT_POOL) == "gem" and (args.whitening or DEFAULT_WHITENING) == 0
    assert args.sym is False and args.teacher is None and args.teacher_path is None


def test_workers_help_says_the_default_is_capped(parser):
    action = parser._option_string_actions["-j"]
    assert action.help == WORKERS_HELP.format(os.cpu_count() or 1)
    assert action.default == min(8, os.cpu_count() or 1)


def _parse(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace:
    argv = shlex.split(line)
    assert argv[:2] == ["python", "test.py"]
    return parser.parse_args(argv[2:])


def test_seed_readme_symmetric_example(parser):
    args = _parse(
        parser,
        "python test.py --datasets 'cub-test' --sym --student-path 'cub-448r-resnet50-512-gem-w' --image-size 224",
    )
    assert args.datasets == ["cub-test"] and args.sym is True
    assert args.student_path == "cub-448r-resnet50-512-gem-w" and args.student is None
    assert args.teacher is None and args.teacher_path is None
    assert args.image_size == 224 and type(args.image_size) is int
    assert args.teacher_image_size == 448 and args.multiscale == (1.0,)


def test_seed_readme_asymmetric_example(parser):
    args = _parse(
        parser,
        "python test.py --datasets 'cub-test' --sym "
        "--student-path 'cub-S224r-T448r-resnet50-512-gem-w' "
        "--teacher-path 'cub-448r-resnet50-512-gem-w' "
        "--image-size 224 --teacher-image-size 448",
    )
    assert args.student_path == "cub-S224r-T448r-resnet50-512-gem-w"
    assert args.teacher_path == "cub-448r-resnet50-512-gem-w"
    assert (args.image_size, args.teacher_image_size) == (224, 448)
    assert args.sym is True and args.datasets == ["cub-test"]


def test_a_line_with_every_short_alias(parser):
    args = _parse(
        parser,
        "python test.py -s resnet50 -t resnet18 -p mac -w 128 --data-root /datasets -d cub-test,cars-test "
        "-imsize 112 -timsize 336 -ms '[1, 1/2**(1/2), 1/2]' -j 2 -g 0,1 --sym",
    )
    assert (args.student, args.teacher) == ("resnet50", "resnet18")
    assert args.pool == "mac" and args.whitening == 128 and type(args.whitening) is int
    assert args.data_root == "/datasets"
    assert args.datasets == ["cub-test", "cars-test"]
    assert (args.image_size, args.teacher_image_size) == (112, 336)
    assert args.multiscale == pytest.approx((1.0, 2**-0.5, 0.5))
    assert args.workers == 2 and args.gpu_id == "0,1" and args.sym is True
    paths = _parse(parser, "python test.py -spath s.pth -tpath t.pth -timsize 64")
    assert (paths.student_path, paths.teacher_path, paths.teacher_image_size) == ("s.pth", "t.pth", 64)


@pytest.mark.parametrize(
    ("argv", "flag", "hint"),
    [
        (["-ms", "[0]"], "-ms/--multiscale", "positive finite"),
        (["-ms", "__import__('os').getcwd()"], "-ms/--multiscale", "not allowed"),
        (["-ms", "[1,"], "-ms/--multiscale", "[1, 1/2**(1/2), 1/2]"),
        (["-g", "a"], "-g/--gpu-id", "'0' or '0,1'"),
        (["-g", "0,"], "-g/--gpu-id", "'0' or '0,1'"),
        (["-g", "-1"], "-g/--gpu-id", "'0' or '0,1'"),
        (["-p", "rmac"], "-p/--pool", "spoc"),
        (["-w", "-1"], "-w/--whitening", ">= 0"),
        (["-w", "big"], "-w/--whitening", ">= 0"),
        (["-j", "-2"], "-j/--workers", "an integer from 0 to 256"),
        (["-j", "257"], "-j/--workers", "an integer from 0 to 256"),
        (["-imsize", "0"], "-imsize/--image-size", "positive integer"),
        (["-d", ","], "-d/--datasets", "comma-separated"),
    ],
)
def test_bad_values_are_clear_argparse_errors(parser, capsys, argv, flag, hint):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["-s", "resnet18", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and hint in err


def test_network_choice_is_required_and_exclusive(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["--sym"])
    required = "one of the arguments -spath/--student-path -s/--student --student-onnx is required"
    assert required in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["-s", "resnet18", "-spath", "x.pth"])
    assert "not allowed with argument" in capsys.readouterr().err


# the reference's extract_features.py flags that apply to one split
REFERENCE_EXTRACT_FLAGS = [
    (("--network-path", "-npath"), "network_path"),
    (("--image-size", "-imsize"), "image_size"),
    (("--multiscale", "-ms"), "multiscale"),
    (("--gpu-id", "-g"), "gpu_id"),
    (("--data-root",), "data_root"),
]


@pytest.mark.parametrize(("options", "dest"), REFERENCE_EXTRACT_FLAGS)
def test_extract_accepts_the_reference_extractor_flags(extract_parser, options, dest):
    (action,) = {extract_parser._option_string_actions[option] for option in options}
    assert action.dest == dest


def test_extract_parses_reference_style_values(extract_parser):
    args = extract_parser.parse_args(
        shlex.split("-npath t.pth --dataset cub-test -imsize 448 -ms '[1, 2**(1/2)]' -g 1 -j 0 --output e.npy")
    )
    assert args.network_path == "t.pth" and args.image_size == 448
    assert args.multiscale == pytest.approx((1.0, 2**0.5)) and args.gpu_id == "1" and args.workers == 0
    defaults = extract_parser.parse_args(["-npath", "t.pth", "--dataset", "cub-test", "--output", "e.npy"])
    assert defaults.multiscale == (1.0,) and defaults.gpu_id == "0" and defaults.pool is None
