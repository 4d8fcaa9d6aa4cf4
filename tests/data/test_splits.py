"""Splits: sizes, class order and paths against independently parsed fixture truth; every error path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from raml.data import splits as splits_mod
from raml.data.splits import (
    DATASETS,
    DOWNLOAD_COMMANDS,
    DatasetNotFoundError,
    Split,
    available_datasets,
    get_split,
    register_dataset,
    split_from_lists,
)

# ------------------------------------------------------------------------------------ independent truth


def _first_appearance(pairs: list[tuple[int, str]]) -> list[list[str]]:
    """Obvious grouping: walk the rows, open a new class the first time its id is seen."""
    order: list[int] = []
    members: dict[int, list[str]] = {}
    for cls, path in pairs:
        if cls not in members:
            order.append(cls)
            members[cls] = []
        members[cls].append(path)
    return [members[c] for c in order]


def _cub_truth(root: Path) -> tuple[list[int], list[list[str]]]:
    pairs = []
    for line in (root / "cub" / "images.txt").read_text().splitlines():
        _, rel = line.split(" ")
        pairs.append((int(rel[:3]), "images/" + rel))
    order = list(dict.fromkeys(c for c, _ in pairs))
    return order, _first_appearance(pairs)


def _flatten(classes: list[list[str]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    paths = tuple(p for c in classes for p in c)
    labels = tuple(i for i, c in enumerate(classes) for _ in c)
    return paths, labels


def _assert_split(split: Split, classes: list[list[str]]) -> None:
    paths, labels = _flatten(classes)
    assert split.paths == paths
    assert split.labels == labels
    assert split.num_classes == len(classes)
    assert len(split) == len(paths)


# ------------------------------------------------------------------------------------ registered datasets


def test_cub_parts_follow_first_appearance(cub_root: Path) -> None:
    order, classes = _cub_truth(cub_root)
    assert order != sorted(order)  # the fixture really shuffles the class order
    train, val, test = (get_split(n, cub_root) for n in ("cub", "cub-val", "cub-test"))
    _assert_split(train, classes[:50])
    _assert_split(val, classes[50:100])
    _assert_split(test, classes[100:])
    assert (train.num_classes, val.num_classes, test.num_classes) == (50, 50, 100)
    assert (len(train), len(val), len(test)) == (100, 100, 200)
    assert train.name == "cub" and test.name == "cub-test"
    assert train.root == cub_root / "cub"
    assert all(p.is_file() for p in test.abspaths())


def test_cub_trainval_concatenates_train_then_val(cub_root: Path) -> None:
    _, classes = _cub_truth(cub_root)
    trainval = get_split("cub-trainval", cub_root)
    _assert_split(trainval, classes[:100])
    train, val = get_split("cub", cub_root), get_split("cub-val", cub_root)
    assert trainval.paths == train.paths + val.paths
    assert trainval.labels == train.labels + tuple(x + 50 for x in val.labels)
    assert get_split("cub-train", cub_root) == train


def test_val_ratio_moves_the_train_val_boundary(cub_root: Path) -> None:
    _, classes = _cub_truth(cub_root)
    _assert_split(get_split("cub", cub_root, val_ratio=0.25), classes[:75])
    _assert_split(get_split("cub-val", cub_root, val_ratio=0.25), classes[75:100])
    _assert_split(get_split("cub-test", cub_root, val_ratio=0.25), classes[100:])
    _assert_split(get_split("cub", cub_root, val_ratio=0.0), classes[:100])
    with pytest.raises(ValueError, match="cub-val.*empty"):
        get_split("cub-val", cub_root, val_ratio=0.0)


def test_split_classes_and_abspaths(cub_root: Path) -> None:
    split = get_split("cub-val", cub_root)
    classes = split.classes()
    assert len(classes) == 50 and all(len(c) == 2 for c in classes)
    for label, members in enumerate(classes):
        assert all(split.labels[i] == label for i in members)
    assert split.abspaths()[0] == cub_root / "cub" / split.paths[0]


def test_cars_parts_follow_first_appearance(cars_root: Path) -> None:
    mat = scipy.io.loadmat(cars_root / "cars" / "cars_annos.mat", squeeze_me=True)
    pairs = [(int(a["class"]), str(a["relative_im_path"])) for a in mat["annotations"]]
    order = list(dict.fromkeys(c for c, _ in pairs))
    assert order != sorted(order)
    classes = _first_appearance(pairs)
    train, val, test = (get_split(n, cars_root) for n in ("cars", "cars-val", "cars-test"))
    _assert_split(train, classes[:49])
    _assert_split(val, classes[49:98])
    _assert_split(test, classes[98:])
    assert (train.num_classes, val.num_classes, test.num_classes) == (49, 49, 98)
    assert all(p.is_file() for p in train.abspaths())


def test_sop_parts(sop_root: Path) -> None:
    def parse(name: str) -> list[list[str]]:
        rows = (sop_root / "sop" / name).read_text().splitlines()[1:]
        return _first_appearance([(int(r.split()[1]), r.split()[3]) for r in rows])

    train_classes, test_classes = parse("Ebay_train.txt"), parse("Ebay_test.txt")
    assert len(train_classes) == 12 and len(test_classes) == 6
    _assert_split(get_split("sop", sop_root), train_classes[:6])
    _assert_split(get_split("sop-val", sop_root), train_classes[6:])
    test = get_split("sop-test", sop_root)
    _assert_split(test, test_classes)
    assert len(test) == 18
    assert all(p.is_file() for p in test.abspaths())


# ------------------------------------------------------------------------------------ own data


def test_own_split_json(own_root: Path) -> None:
    raw = json.loads((own_root / "mine" / "split.json").read_text())
    _assert_split(get_split("mine", own_root), raw["train"])
    _assert_split(get_split("mine-val", own_root), raw["val"])
    _assert_split(get_split("mine-test", own_root), raw["test"])
    _assert_split(get_split("mine-trainval", own_root), raw["train"] + raw["val"])
    split = get_split("mine-test", own_root)
    assert split.num_classes == 3 and len(split) == 9 and split.root == own_root / "mine"


def test_json_path_name_with_part(own_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.loads((own_root / "mine" / "split.json").read_text())
    path = own_root / "mine" / "split.json"
    _assert_split(get_split(str(path), "/nonexistent"), raw["train"])
    test = get_split(f"{path}:test", "/nonexistent")
    _assert_split(test, raw["test"])
    assert test.root == own_root / "mine"
    _assert_split(get_split(f"{path}:trainval", "/nonexistent"), raw["train"] + raw["val"])
    # relative to the working directory, then relative to the data root
    monkeypatch.chdir(own_root)
    _assert_split(get_split("mine/split.json:val", tmp_path / "elsewhere"), raw["val"])
    monkeypatch.chdir(tmp_path)
    _assert_split(get_split("mine/split.json:val", own_root), raw["val"])
    assert all(p.is_file() for p in get_split("mine/split.json:val", own_root).abspaths())


def test_json_missing_val_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": [["a.jpg"], ["b.jpg", "c.jpg"]], "test": [["d.jpg"]]}))
    assert get_split(f"{path}:trainval", tmp_path).paths == ("a.jpg", "b.jpg", "c.jpg")
    with pytest.raises(ValueError, match="empty.*val"):
        get_split(f"{path}:val", tmp_path)


def test_folder_layout(folder_root: Path) -> None:
    train = get_split("folders", folder_root)
    assert train.paths == (
        "train/ant/a.png",
        "train/ant/b.png",
        "train/bee/a.png",
        "train/bee/b.PNG",
        "train/cat/x.png",
        "train/cat/y.png",
    )
    assert train.labels == (0, 0, 1, 1, 2, 2)
    test = get_split("folders-test", folder_root)
    assert test.num_classes == 2 and len(test) == 6 and test.paths[0] == "test/dog/1.png"
    assert all(p.is_file() for p in test.abspaths())
    assert get_split("folders-trainval", folder_root).paths == train.paths
    with pytest.raises(ValueError, match="folders-val.*empty"):
        get_split("folders-val", folder_root)


def test_folder_layout_empty_class_is_an_error(folder_root: Path) -> None:
    (folder_root / "folders" / "train" / "empty").mkdir()
    (folder_root / "folders" / "train" / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*holds no images"):
        get_split("folders", folder_root)


def test_folder_layout_skips_hidden_class_folders(folder_root: Path, image_factory) -> None:
    image_factory(folder_root / "folders" / "train" / ".ipynb_checkpoints" / "a.png")
    (folder_root / "folders" / "train" / ".thumbnails").mkdir()  # empty: no "holds no images" error either
    assert get_split("folders", folder_root).num_classes == 3


def test_folder_layout_class_in_train_and_val_is_one_class(
    folder_root: Path, image_factory, caplog: pytest.LogCaptureFixture
) -> None:
    val = folder_root / "folders" / "val"
    for rel in ("cat/z.png", "fox/1.png", "fox/2.png"):
        image_factory(val / rel)
    with caplog.at_level("WARNING", logger="raml.data.splits"):
        trainval = get_split("folders-trainval", folder_root)
    assert trainval.paths[:7] == (
        "train/ant/a.png",
        "train/ant/b.png",
        "train/bee/a.png",
        "train/bee/b.PNG",
        "train/cat/x.png",
        "train/cat/y.png",
        "val/cat/z.png",
    )
    assert trainval.labels == (0, 0, 1, 1, 2, 2, 2, 3, 3)  # cat is one class; fox follows the train classes
    assert "1 class name(s) in both train/ and val/ (cat) are the same classes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="raml.data.splits"):
        assert get_split("folders-val", folder_root).labels == (0, 1, 1)
    assert "holds no classes out" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="raml.data.splits"):
        get_split("folders", folder_root)
    assert not caplog.text  # the train part alone is unaffected


def test_own_folder_named_with_part_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "my-test"
    folder.mkdir()
    (folder / "split.json").write_text(json.dumps({"train": [["a.jpg"]], "test": [["b.jpg"]]}))
    assert get_split("my-test", tmp_path).paths == ("a.jpg",)


def test_available_datasets(own_root: Path, tmp_path: Path) -> None:
    (own_root / "random_folder").mkdir()
    assert available_datasets(own_root) == ["cub", "cars", "sop", "synth", "mine"]
    assert available_datasets(tmp_path / "missing") == ["cub", "cars", "sop", "synth"]


def test_register_dataset_custom_loader(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    seen = {}

    def loader(folder: Path, val_ratio: float) -> dict[str, list[list[str]]]:
        seen["args"] = (folder, val_ratio)
        return {"train": [["a.jpg"], ["b.jpg"]], "val": [["c.jpg"]], "test": [["d.jpg"], ["e.jpg"]]}

    register_dataset("toy", loader)
    try:
        assert get_split("toy-test", tmp_path, val_ratio=0.3).paths == ("d.jpg", "e.jpg")
        assert seen["args"] == (tmp_path / "toy", 0.3)
        assert get_split("toy-trainval", tmp_path).labels == (0, 1, 2)
    finally:
        DATASETS.pop("toy")


@pytest.mark.parametrize("name", ["", "a/b", "x:y", "thing-test", "thing-val", "thing-trainval"])
def test_register_dataset_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        register_dataset(name, lambda folder, r: {})


def test_register_dataset_rejects_non_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        register_dataset("thing", "not a function")  # type: ignore[arg-type]


def test_split_from_lists(tmp_path: Path) -> None:
    split = split_from_lists("x", tmp_path, [["a.jpg", "b.jpg"], ["c.jpg"]])
    assert split.labels == (0, 0, 1) and split.root == tmp_path


def test_split_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        Split("x", Path("."), ("a", "b"), (0,))


# ------------------------------------------------------------------------------------ not found


@pytest.mark.parametrize("name", ["cub", "cars-test", "sop-val"])
def test_missing_data_root_lists_download_commands(tmp_path: Path, name: str) -> None:
    base = name.split("-")[0]
    with pytest.raises(DatasetNotFoundError) as info:
        get_split(name, tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg
    assert DOWNLOAD_COMMANDS[base] in msg
    assert isinstance(info.value, FileNotFoundError)


def test_download_commands_match_seed_readme() -> None:
    # the project's shared folder sits beside the checkout (shared/seed/README.md, the user's request)
    readme = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "README.md"
    if not readme.is_file():
        pytest.skip(f"the seed README is not beside this checkout (looked for {readme}); nothing to compare with")
    text = readme.read_text()
    for commands in DOWNLOAD_COMMANDS.values():
        assert commands in text


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        get_split("cars", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cars") in msg and "cars_annos.mat" in msg and DOWNLOAD_COMMANDS["cars"] in msg


def test_missing_index_files(sop_root: Path, cub_root: Path) -> None:
    (sop_root / "sop" / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="Ebay_test.txt") as info:
        get_split("sop", sop_root)
    assert DOWNLOAD_COMMANDS["sop"] in str(info.value)
    (cub_root / "cub" / "images.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="images.txt"):
        get_split("cub-test", cub_root)


def test_unknown_name_lists_valid_names(own_root: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        get_split("cubb", own_root)
    msg = str(info.value)
    assert "'cubb'" in msg
    for name in ("cub", "cars", "sop", "mine"):
        assert name in msg
    assert "split.json" in msg and "register_dataset" in msg


def test_unknown_name_with_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="Data root not found"):
        get_split("mydata", tmp_path / "nowhere")


def test_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nope.json"):
        get_split("nope.json:test", tmp_path)


# ------------------------------------------------------------------------------------ malformed inputs


def _write_json(tmp_path: Path, data: object) -> str:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "a/../../outside.jpg"])
def test_escaping_paths_are_refused(tmp_path: Path, bad: str) -> None:
    name = _write_json(tmp_path, {"train": [["ok.jpg", bad]]})
    with pytest.raises(ValueError, match="allow_absolute_paths"):
        get_split(name, tmp_path)
    assert get_split(name, tmp_path, allow_absolute_paths=True).paths == ("ok.jpg", bad)


def test_inner_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    name = _write_json(tmp_path, {"train": [["a/../b.jpg"]]})
    assert get_split(name, tmp_path).paths == ("a/../b.jpg",)


def test_symlinks_inside_the_dataset_folder_are_followed(tmp_path: Path, image_factory) -> None:
    # the documented rule: paths are checked as text; a dataset may be assembled from links to images elsewhere
    image_factory(tmp_path / "store" / "0.jpg")
    folder = tmp_path / "data" / "mine"
    folder.mkdir(parents=True)
    (folder / "linked").symlink_to(tmp_path / "store", target_is_directory=True)
    (folder / "split.json").write_text(json.dumps({"train": [["linked/0.jpg"]]}))
    split = get_split("mine", tmp_path / "data")
    assert split.paths == ("linked/0.jpg",) and split.abspaths()[0].resolve() == tmp_path / "store" / "0.jpg"


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    name = _write_json(tmp_path, {"train": [["a.jpg"], []]})
    with pytest.raises(ValueError, match="'train' class 1 is empty"):
        get_split(name, tmp_path)


def test_duplicate_path_is_an_error(tmp_path: Path) -> None:
    name = _write_json(tmp_path, {"train": [["a.jpg"], ["b.jpg", "a.jpg"]]})
    with pytest.raises(ValueError, match="'a.jpg' in 'train' class 1, already listed in 'train' class 0"):
        get_split(name, tmp_path)
    name = _write_json(tmp_path, {"train": [["a.jpg"]], "val": [["a.jpg"]]})
    with pytest.raises(ValueError, match="duplicate image 'a.jpg'"):
        get_split(f"{name}:trainval", tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"train": [["c1/0.jpg", "c1/./0.jpg"]]}, r"'c1/\./0.jpg' in 'train' class 0, already listed as 'c1/0.jpg'"),
        ({"train": [["c1/1.jpg"], ["c1//1.jpg"]]}, r"'c1//1.jpg' in 'train' class 1, already listed as 'c1/1.jpg'"),
        ({"train": [["c1/x/../2.jpg", "c1/2.jpg"]]}, "already listed as 'c1/x/../2.jpg'"),
    ],
    ids=["dot", "double-slash", "dotdot"],
)
def test_duplicate_images_spelled_differently_are_an_error(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_split(_write_json(tmp_path, data), tmp_path)


def test_the_same_image_in_two_parts_is_an_error_whichever_part_is_selected(tmp_path: Path) -> None:
    name = _write_json(tmp_path, {"train": [["a.jpg", "b.jpg"]], "test": [["c.jpg"], ["./b.jpg"]]})
    for part in ("train", "test", "trainval"):
        with pytest.raises(ValueError, match=r"'\./b.jpg' in 'test' class 1, .*'train' class 0 \(test images"):
            get_split(f"{name}:{part}", tmp_path)
    folder = tmp_path / "own"  # the same through <data_root>/<name>/split.json
    folder.mkdir()
    (folder / "split.json").write_text(json.dumps({"train": [["a.jpg"]], "val": [["a.jpg"]]}))
    with pytest.raises(ValueError, match="duplicate image 'a.jpg' in 'val' class 0"):
        get_split("own", tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([["a.jpg"]], "must be a dict"),
        ({"train": "a.jpg"}, "'train' must be a list"),
        ({"train": [["a.jpg", 3]]}, "class 0 must be a list of path strings"),
        ({"train": ["a.jpg"]}, "class 0 must be a list of path strings"),
        ({"train": [[""]]}, "empty image path"),
    ],
)
def test_malformed_split_json(tmp_path: Path, data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_split(_write_json(tmp_path, data), tmp_path)


def test_invalid_json_text(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_split(str(tmp_path / "s.json"), tmp_path)


def test_a_split_file_nested_too_deeply_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("[" * 100_000 + "]" * 100_000)  # json's parser recursed into RecursionError
    with pytest.raises(ValueError, match="nests its values too deeply"):
        get_split(str(tmp_path / "s.json"), tmp_path)


def test_unknown_part_suffix_on_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown part 'tset'"):
        get_split(_write_json(tmp_path, {"train": [["a"]]}) + ":tset", tmp_path)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half"])
def test_bad_val_ratio(tmp_path: Path, ratio: object) -> None:
    with pytest.raises(ValueError, match="val_ratio"):
        get_split("cub", tmp_path, val_ratio=ratio)  # type: ignore[arg-type]


def test_bad_name_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        get_split("", tmp_path)


def _cub(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "cub").mkdir(exist_ok=True)
    (tmp_path / "cub" / "images.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_cub_odd_class_count(tmp_path: Path) -> None:
    root = _cub(tmp_path, ["1 001.A/a.jpg", "2 002.B/b.jpg", "3 003.C/c.jpg"])
    with pytest.raises(ValueError, match="3 classes, an odd number"):
        get_split("cub", root)


@pytest.mark.parametrize("bad", ["3 004.D/d.jpg extra", "x 004.D/d.jpg", "3 DDD.D/d.jpg", "3 d.jpg"])
def test_cub_malformed_line(tmp_path: Path, bad: str) -> None:
    root = _cub(tmp_path, ["1 001.A/a.jpg", "2 002.B/b.jpg", bad])
    with pytest.raises(ValueError, match=r"images.txt, line 3"):
        get_split("cub", root)


def test_cub_index_file_ignores_blank_lines(tmp_path: Path) -> None:
    root = _cub(tmp_path, ["1 002.B/b.jpg", "", "2 001.A/a.jpg", "3 002.B/c.jpg"])
    assert get_split("cub-test", root).paths == ("images/001.A/a.jpg",)
    assert get_split("cub-trainval", root).paths == ("images/002.B/b.jpg", "images/002.B/c.jpg")


def test_sop_malformed_line(sop_root: Path) -> None:
    path = sop_root / "sop" / "Ebay_test.txt"
    path.write_text(path.read_text() + "999 13 x bicycle_final/z.JPG\n")
    with pytest.raises(ValueError, match=r"Ebay_test.txt, line 20"):
        get_split("sop-test", sop_root)


@pytest.mark.parametrize("dataset, index", [("cub", "images.txt"), ("sop", "Ebay_train.txt"), ("sop", "Ebay_test.txt")])
def test_an_index_file_that_is_not_utf8_names_the_file_and_line(
    cub_root: Path, sop_root: Path, dataset: str, index: str
) -> None:
    root = cub_root if dataset == "cub" else sop_root
    path = root / dataset / index if dataset == "sop" else root / "cub" / index
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b".jpg", b"\xe9.jpg").replace(b".JPG", b"\xe9.JPG")  # a Latin-1 e-acute
    assert b"\xe9" in lines[2]
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{index}, line 3: not UTF-8 text \(byte 0xe9: invalid continuation byte\)"):
        get_split(f"{dataset}-test", root)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 2.5])
def test_cars_class_that_is_not_a_finite_integer_names_the_annotation(tmp_path: Path, value: float) -> None:
    folder = tmp_path / "cars"
    folder.mkdir()
    fields = ["relative_im_path", "class"]
    annotations = np.empty((1, 4), dtype=[(f, "O") for f in fields])
    for i in range(4):
        cls = np.array([[value]]) if i == 2 else np.array([[i // 2 + 1]], dtype=np.uint8)
        annotations[0, i] = (np.array([f"car_ims/{i + 1:06d}.jpg"]), cls)
    scipy.io.savemat(folder / "cars_annos.mat", {"annotations": annotations})
    with pytest.raises(ValueError, match=r"cars_annos.mat, annotation 3: expected a string relative_im_path and an "):
        get_split("cars", tmp_path)


def test_cars_mat_without_annotations(tmp_path: Path) -> None:
    (tmp_path / "cars").mkdir()
    scipy.io.savemat(tmp_path / "cars" / "cars_annos.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="no 'annotations'"):
        get_split("cars", tmp_path)


def test_cars_mat_not_a_mat_file(tmp_path: Path) -> None:
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cars_annos.mat"):
        get_split("cars", tmp_path)


def test_mat_value_unwraps_nested_arrays() -> None:
    assert splits_mod._mat_value(np.array([[np.array([[7]], dtype=np.uint8)]], dtype=object)) == 7
    assert splits_mod._mat_value(np.array(["car_ims/1.jpg"])) == "car_ims/1.jpg"
    with pytest.raises(ValueError, match="single value"):
        splits_mod._mat_value(np.array([1, 2]))


# ------------------------------------------------------------------------- cars_annos.mat bounded (audit)
@pytest.fixture
def scipy_not_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails a test whose file reaches ``scipy.io.loadmat``: the checks must refuse it before."""

    def loadmat(*_: object, **__: object) -> None:
        raise AssertionError("scipy.io.loadmat was reached")

    monkeypatch.setattr(scipy.io, "loadmat", loadmat)


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "plain"])
def test_cars_mat_larger_than_the_limit_once_inflated_is_refused_before_scipy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scipy_not_reached: None, compressed: bool
) -> None:
    monkeypatch.setattr(splits_mod, "MAX_MAT_BYTES", 1 << 20)  # 2 MiB of zeros: a 2 KB bomb above 1 MiB

    def whosmat(*_: object, **__: object) -> None:  # it inflates a variable's first element: not before the check
        raise AssertionError("scipy.io.whosmat was reached")

    monkeypatch.setattr(scipy.io, "whosmat", whosmat)
    index = tmp_path / "cars" / "cars_annos.mat"
    index.parent.mkdir()
    scipy.io.savemat(index, {"annotations": np.zeros(1 << 18)}, do_compression=compressed)
    if compressed:
        assert index.stat().st_size < 1 << 16
    before = index.read_bytes()
    with pytest.raises(ValueError, match=r"cars_annos.mat: holds more than 1 MiB once decompressed .*download it"):
        get_split("cars", tmp_path)
    assert index.read_bytes() == before  # refused, not deleted: the user decides


def test_cars_annotations_with_too_many_entries_are_refused_before_loading(
    cars_root: Path, monkeypatch: pytest.MonkeyPatch, scipy_not_reached: None
) -> None:
    monkeypatch.setattr(splits_mod, "MAX_CARS_ANNOTATIONS", 300)  # the fixture has 392
    with pytest.raises(ValueError, match=r"'annotations' is a struct array of shape \(1, 392\); expected a struct"):
        get_split("cars", cars_root)
    assert (cars_root / "cars" / "cars_annos.mat").is_file()


def test_cars_annotations_that_are_not_a_struct_array_are_refused(tmp_path: Path, scipy_not_reached: None) -> None:
    (tmp_path / "cars").mkdir()
    scipy.io.savemat(tmp_path / "cars" / "cars_annos.mat", {"annotations": np.zeros((1, 5))})
    with pytest.raises(ValueError, match=r"'annotations' is a double array .*expected a struct array of at most"):
        get_split("cars", tmp_path)


def test_cars_mat_with_a_damaged_compressed_element(tmp_path: Path) -> None:
    index = tmp_path / "cars" / "cars_annos.mat"
    index.parent.mkdir()
    scipy.io.savemat(index, {"annotations": np.arange(1000.0)}, do_compression=True)
    data = bytearray(index.read_bytes())
    data[128 + 8 + 2 :] = bytes(len(data) - 138)  # zlib header kept, the deflate data zeroed
    index.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cars_annos.mat: cannot read it as a MATLAB file"):
        get_split("cars", tmp_path)


def test_cars_mat_inflated_size_counts_every_element(cars_root: Path, tmp_path: Path) -> None:
    index = cars_root / "cars" / "cars_annos.mat"
    assert splits_mod._mat_inflated_bytes(index, 1 << 30) == index.stat().st_size  # plain: its size
    mat = scipy.io.loadmat(index)
    packed = tmp_path / "packed.mat"
    scipy.io.savemat(packed, {k: v for k, v in mat.items() if not k.startswith("__")}, do_compression=True)
    assert packed.stat().st_size < index.stat().st_size
    inflated = splits_mod._mat_inflated_bytes(packed, 1 << 30)
    assert abs(inflated - index.stat().st_size) <= 16  # the same elements, their tags aside
    assert splits_mod._mat_inflated_bytes(packed, 1000) > 1000  # stops once past the limit
    (tmp_path / "cars").mkdir()
    packed.rename(tmp_path / "cars" / "cars_annos.mat")
    assert get_split("cars-test", tmp_path).paths == get_split("cars-test", cars_root).paths  # both forms load
