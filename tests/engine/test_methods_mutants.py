"""Tests written for the survivors of mutation testing of raml.engine.methods (scripts/mutate.py methods).

Each test asserts behaviour against a plain computation written here, so that a one-line change of a method
(a mutant) that keeps the shapes but changes a number fails it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raml.data.images import EvalTransform, load_image
from raml.data.sizes import draw_batch_sizes
from raml.data.synth import generate_synthetic_dataset
from raml.data.views import mixup_views
from raml.engine.config import TrainConfig
from raml.engine.methods import METHODS, method_help
from raml.engine.methods.coupled import BatchRelationMethod
from raml.engine.methods.labelled import GROUP_SIZE
from raml.engine.methods.sym_triplet import group_positives
from raml.engine.mining import class_grouped_epoch, distance_weighted_negatives, mining_pool, reference_epoch_seed
from raml.engine.trainer import Trainer
from raml.losses import absolute_loss, distillation_loss_terms, normalized_softmax_loss, rkd_loss, triplet_loss
from raml.models import build_network, save_checkpoint
from raml.retrieval.extract import extract_embeddings


def _capture_loader(trainer) -> dict:
    """Replace ``trainer``'s DataLoader factory: it records the dataset it is given (``captured["dataset"]``) and
    returns the batches as they are (a batch sampler, or the whole batches that ``batch_loader_arguments`` passes as
    a sampler with ``batch_size=None``)."""
    captured: dict = {}

    def loader(dataset, batch_sampler=None, sampler=None, batch_size=1):
        captured["dataset"] = dataset
        if sampler is not None:
            assert batch_size is None and batch_sampler is None
            return sampler
        return batch_sampler

    trainer.loader = loader
    return captured


def test_candidates_is_the_rows_outside_the_largest_group_plus_one() -> None:
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    # 6 rows; the largest image (1) has 3 views: a row of it relates to the 3 others and itself
    assert BatchRelationMethod.candidates(groups) == 4
    assert BatchRelationMethod.candidates(torch.tensor([0, 1, 2])) == 3


def test_help_lists_every_mode_with_its_summary_wrapped_at_the_width() -> None:
    text = method_help(width=60)
    lines = text.splitlines()
    assert lines[0] == "training methods (--mode NAME):"
    assert all(len(line) <= 60 for line in lines)
    # every line after the first is an entry's first line ("  name    summary...") or its continuation,
    # indented by 10 columns; without the white space, the entries follow one another in registry order
    assert all(line.startswith("  ") and (line[2] != " " or line.startswith(" " * 10)) for line in lines[1:])
    assert all(line[10] != " " for line in lines[1:])  # continuations indented by exactly 10 columns
    assert any(line[2] == " " for line in lines[1:])  # (there are some at this width)
    firsts = [line for line in lines[1:] if line[2] != " "]
    assert [line.split()[0] for line in firsts] == list(METHODS)
    assert all(line[:10] == f"  {name:<8}" and line[10] != " " for line, name in zip(firsts, METHODS))  # column 10
    # the default width is 100 columns, and the summaries fill it
    default = method_help().splitlines()
    assert max(len(line) for line in default) in range(91, 101) and default == method_help(100).splitlines()
    squeezed = "".join(text.split())
    assert squeezed == "trainingmethods(--modeNAME):" + "".join(
        name + "".join(entry.summary.split()) for name, entry in METHODS.items()
    )


# ------------------------------------------------------------------------------------------ sym --loss triplet
CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """6 classes of 5 images: the training split holds 3 classes of 5, so an epoch keeps 4 of each (12 images)."""
    root = tmp_path_factory.mktemp("labelled")
    generate_synthetic_dataset(root / "cub", num_classes=6, images_per_class=5, image_size=SIZE, seed=2)
    torch.manual_seed(0)
    network = root / "network.pth"
    save_checkpoint(network, build_network("test_resnet", whitening=16, pretrained=False))
    return root, network


def _sym_trainer(labelled, directory: Path, **changes) -> Trainer:
    data_root, network = labelled
    values = dict(
        mode="sym", loss="triplet", student_path=str(network), training_dataset="cub", test_datasets=[],
        data_root=str(data_root), directory=str(directory), image_size=SIZE, pos_num=2, batch_size=4, neg_num=2,
        pool_size=6, update_every=1, query_size=100, epochs=1, workers=0, val=False, seed=3, scheduler="none",
        lr=1e-3, loss_margin=0.3,
    )  # fmt: skip
    values.update(changes)
    return Trainer(TrainConfig(**values), CPU, progress=False)


def test_group_positives_are_the_other_members_of_each_group() -> None:
    anchor = torch.arange(8 * 2, dtype=torch.float32).view(8, 2)
    positives = group_positives(anchor, 4)
    assert positives.shape == (8, 3, 2)
    for row in range(8):
        group = range(row // 4 * 4, row // 4 * 4 + 4)
        assert torch.equal(positives[row], anchor[[other for other in group if other != row]])


@pytest.mark.parametrize(
    ("query_size", "batch_size", "images", "batches"), [(100, 4, 12, 3), (100, 8, 12, 1), (9, 4, 9, 2)]
)
def test_a_triplet_epoch_keeps_whole_groups_and_drops_the_last_incomplete_batch(
    labelled, tmp_path, query_size, batch_size, images, batches
) -> None:
    """3 kept classes of 4 images (of 5): 12 images, at most --query-size; whole batches only."""
    trainer = _sym_trainer(labelled, tmp_path, query_size=query_size, batch_size=batch_size)
    assert trainer.method.epoch_images() == trainer.epoch_size == images
    assert trainer.method.batches_per_epoch() == batches


def test_a_triplet_epoch_is_the_reference_s_anchors_with_mined_negatives_and_item_seeds(labelled, tmp_path) -> None:
    """The anchors, the pool and the negatives drawn from a RandomState seeded as the reference's epoch, the
    negatives by distance-weighted sampling on the current network's embeddings of the anchors and the pool;
    each batch is its anchors (whole groups) then each anchor's negatives; every item carries the epoch's next
    seed, the batch's anchors first."""
    trainer = _sym_trainer(labelled, tmp_path)
    c, epoch = trainer.config, 2
    captured = _capture_loader(trainer)
    batches = list(trainer.method.epoch_batches(epoch, torch.Generator()))

    labels = trainer.train_split.labels
    rng = np.random.RandomState(reference_epoch_seed(c.seed, epoch))
    anchors = class_grouped_epoch(labels, GROUP_SIZE, trainer.epoch_size, rng)
    pool = mining_pool(labels, GROUP_SIZE, c.pool_size, rng)
    rows = sorted(set(anchors) | set(pool))
    embeddings = extract_embeddings(
        trainer.student, [trainer.train_paths[i] for i in rows], c.image_size, CPU, batch_size=c.eval_batch_size,
        workers=0, progress=False,
    )  # fmt: skip
    at = {index: row for row, index in enumerate(rows)}
    drawn = distance_weighted_negatives(
        embeddings[[at[i] for i in anchors]], torch.as_tensor(labels)[anchors], embeddings[[at[i] for i in pool]],
        torch.as_tensor(labels)[pool], c.neg_num, rng,
    )  # fmt: skip
    negatives = torch.as_tensor(pool)[drawn].tolist()

    seeds = iter(trainer.item_seeds(epoch, len(anchors) * (1 + c.neg_num)))
    per_batch = c.batch_size
    assert len(batches) == len(anchors) // per_batch == 3
    for b, batch in enumerate(batches):
        rows_of_batch = range(b * per_batch, (b + 1) * per_batch)
        expected = [(anchors[r], next(seeds)) for r in rows_of_batch]
        expected += [(n, next(seeds)) for r in rows_of_batch for n in negatives[r]]
        assert batch == expected, b
        for r in rows_of_batch:  # the negatives: of another class, from the pool
            assert all(labels[n] != labels[anchors[r]] and n in pool for n in negatives[r])
    dataset = captured["dataset"]
    assert dataset.paths == trainer.train_paths and len(dataset) == len(trainer.train_paths)


def test_a_triplet_batch_loss_is_the_triplet_loss_of_groups_and_negatives(labelled, tmp_path) -> None:
    trainer = _sym_trainer(labelled, tmp_path, loss_margin=0.7)
    images = torch.randn(4 * 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got = trainer.method.batch_loss((images, torch.arange(12)), torch.Generator())
    with torch.no_grad():
        embeddings = trainer.model(images).float()
    anchor, negatives = embeddings[:4], embeddings[4:].view(4, 2, -1)
    positives = torch.stack([anchor[[j for j in range(4) if j != i]] for i in range(4)])
    expected = triplet_loss(anchor, positives, negatives, 0.7)
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5) and got.images == 4
    assert got.terms == {"loss": pytest.approx(expected.item(), rel=1e-5)}
    assert got.loss.requires_grad


# ------------------------------------------------------------------------------------------ checkpoint state
def test_proxies_are_restored_from_a_checkpoint_and_their_absence_is_named(labelled, tmp_path) -> None:
    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax")
    method = trainer.method
    saved = torch.randn_like(method.proxies)
    method.load_checkpoint_state({"proxies": saved}, tmp_path / "a.pth")
    assert torch.equal(method.proxies.detach(), saved) and isinstance(method.proxies, torch.nn.Parameter)
    assert torch.equal(method.checkpoint_state()["proxies"], saved)
    with pytest.raises(ValueError) as error:
        method.load_checkpoint_state({}, tmp_path / "b.pth")
    assert (
        str(error.value)
        == f"{tmp_path / 'b.pth'} has no proxies for --loss normsoftmax; it was trained with another loss."
    )


def test_ugd_projectors_are_restored_from_a_checkpoint_and_their_absence_is_named(labelled, tmp_path) -> None:
    data_root, network = labelled
    trainer = _sym_trainer(
        labelled, tmp_path, mode="ugd", teacher_path=str(network), image_size=16, teacher_image_size=SIZE,
        batch_size=4, query_size=8,
    )  # fmt: skip
    method = trainer.method
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v + 1 for k, v in method.projectors.state_dict().items()
    }
    method.load_checkpoint_state({"ugd_projectors": state}, tmp_path / "a.pth")
    assert all(torch.equal(method.projectors.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError) as error:
        method.load_checkpoint_state({}, tmp_path / "b.pth")
    assert str(error.value) == f"{tmp_path / 'b.pth'} has no UGD projectors; it was not trained with --mode ugd."


# ------------------------------------------------------------------------------------------ sym --loss normsoftmax
def test_proxies_start_from_the_seed_and_train_ten_times_faster_without_weight_decay(labelled, tmp_path) -> None:
    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax", lr=2e-3, weight_decay=0.01, seed=5)
    proxies = trainer.method.proxies
    expected = torch.randn(3, proxies.shape[1], generator=torch.Generator().manual_seed(5))
    assert proxies.shape[1] == trainer.student.meta["outputdim"] and torch.equal(proxies.detach(), expected)
    groups = [group for group in trainer.optimizer.param_groups if group.get("name") == "proxies"]
    assert len(groups) == 1 and groups[0]["params"] == [proxies]
    assert groups[0]["lr"] == pytest.approx(2e-3 * 10) and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize(("query_size", "batch_size", "batches"), [(10, 8, 1), (5, 4, 1), (15, 8, 2), (15, 4, 3)])
def test_a_proxy_epoch_has_a_batch_per_groups_of_the_batch_size(labelled, tmp_path, query_size, batch_size, batches):
    """``--query-size`` images (at most the 15 of the split) in groups of 4, ``batch_size // 4`` groups a batch
    (at least one): as many batches as the epoch yields."""
    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax", query_size=query_size, batch_size=batch_size)
    assert trainer.method.groups_per_batch() == max(1, batch_size // 4)
    assert trainer.method.batches_per_epoch() == batches
    trainer.loader = lambda dataset, batch_sampler: batch_sampler
    assert len(list(trainer.method.epoch_batches(1, torch.Generator().manual_seed(0)))) == batches


def test_augmented_images_are_torchvision_s_crop_and_flip_seeded_per_item(labelled, tmp_path) -> None:
    from torchvision import transforms

    from raml.data.images import load_image

    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax")
    dataset = trainer.method.augmented_images()
    meta = trainer.student.meta
    reference = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(meta["mean"], meta["std"]),
    ])  # fmt: skip
    for index, seed in ((0, 1), (3, 12345), (7, 99)):
        image, got_index = dataset[(index, seed)]
        torch.manual_seed(seed)
        expected = reference(load_image(trainer.train_paths[index]))
        assert got_index == index and torch.equal(image, expected)


# ------------------------------------------------------------------------------------------ the batch losses
def _distiller(labelled, directory: Path, mode: str, **changes) -> Trainer:
    _, network = labelled
    values = dict(mode=mode, teacher_path=str(network), image_size=16, teacher_image_size=SIZE, query_size=8)
    values.update(changes)
    return _sym_trainer(labelled, directory, **values)


def test_ts_aug_s_batch_loss_is_the_distillation_loss_of_the_views_with_its_terms(labelled, tmp_path) -> None:
    trainer = _distiller(labelled, tmp_path, "ts_aug", lam_1=0.3, lam_2=2.5, pos_num=3)
    generator = torch.Generator().manual_seed(0)
    batch = next(trainer._epoch_batches(1, generator))
    with torch.no_grad():
        student, teacher = trainer.method.view_embeddings(batch, generator)
    got = trainer.method.batch_loss(batch, generator)
    terms = distillation_loss_terms(student, teacher, 0.3, 2.5)
    assert got.images == student.shape[0] == 4 and student.shape[1] == 3
    assert got.loss.item() == pytest.approx(terms["total"].item(), rel=1e-5) and got.loss.requires_grad
    logged = {"loss": "total", "absolute": "absolute", "relative_1": "relative_1", "relative_2": "relative_2"}
    assert set(got.terms) == set(logged)
    for name, key in logged.items():
        assert float(got.terms[name]) == pytest.approx(terms[key].item(), rel=1e-5, abs=1e-7), name
        assert not got.terms[name].requires_grad


def test_ts_reg_regresses_the_cached_teacher_rows_of_its_images(labelled, tmp_path) -> None:
    trainer = _distiller(labelled, tmp_path, "ts_reg", batch_size=3, query_size=7)
    captured = _capture_loader(trainer)
    generator = torch.Generator().manual_seed(4)
    batches = list(trainer.method.epoch_batches(1, generator))
    order = torch.randperm(15, generator=torch.Generator().manual_seed(4))[:7].tolist()
    assert batches == [order[0:3], order[3:6], order[6:7]]
    dataset = captured["dataset"]
    meta = trainer.student.meta
    transform = EvalTransform(16, meta["mean"], meta["std"])
    for index in (0, 9):
        image, label = dataset[index]
        assert label == index and torch.equal(image, transform(load_image(trainer.train_paths[index])))
    cache = trainer.method.teacher_cache
    expected_cache = extract_embeddings(trainer.teacher, trainer.train_paths, SIZE, CPU, progress=False)
    assert torch.allclose(cache, expected_cache, atol=1e-5)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # 5 images of 3 channels
    indices = torch.tensor([4, 0, 11, 2, 2])
    got = trainer.method.batch_loss((images, indices), generator)
    with torch.no_grad():
        expected = absolute_loss(trainer.model(images).float(), cache[indices])
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5) and got.images == 5
    assert float(got.terms["loss"]) == pytest.approx(expected.item(), rel=1e-5) and got.loss.requires_grad


def test_ts_reg_with_several_sizes_draws_one_size_per_batch(labelled, tmp_path) -> None:
    trainer = _distiller(labelled, tmp_path, "ts_reg", batch_size=2, query_size=8, image_sizes=[16, 24])
    captured = _capture_loader(trainer)
    batches = list(trainer.method.epoch_batches(2, torch.Generator().manual_seed(1)))
    order = torch.randperm(15, generator=torch.Generator().manual_seed(1))[:8].tolist()
    sizes = draw_batch_sizes([16, 24], 4, trainer.config.seed, 2)
    assert batches == [[(i, size) for i in order[2 * b : 2 * b + 2]] for b, size in enumerate(sizes)]
    image, index = captured["dataset"][(3, 24)]
    assert index == 3 and image.shape == (3, 24, 24)


def test_a_proxy_batch_loss_is_the_normalised_softmax_of_the_batch_s_labels(labelled, tmp_path) -> None:
    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax")
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    indices = torch.tensor([0, 6, 7, 14])
    got = trainer.method.batch_loss((images, indices), torch.Generator())
    labels = torch.as_tensor(trainer.train_split.labels)[indices]
    assert len(set(labels.tolist())) == 3
    with torch.no_grad():
        expected = normalized_softmax_loss(trainer.model(images).float(), labels, trainer.method.proxies, 0.05)
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5) and got.images == 4
    assert got.terms == {"loss": pytest.approx(expected.item(), rel=1e-5)} and got.loss.requires_grad


# ------------------------------------------------------------------------------------------ parameters outside DDP
class _TwoRanks:
    """The process group of a two-process run, seen from one rank: ``all_reduce_sum_`` is replaced by the sum over
    this rank and another whose gradients are ``other`` times this one's."""

    enabled, world_size, rank = True, 2, 0


def _fake_all_reduce(other: float):
    calls = []

    def all_reduce_sum_(tensor: torch.Tensor, dist) -> torch.Tensor:
        calls.append(dist)
        if not tensor.is_floating_point():  # counts (which gradients exist): the other rank holds the same
            return tensor.mul_(2)
        return tensor.mul_(1.0 + other)

    return all_reduce_sum_, calls


@pytest.mark.parametrize("mode", ["normsoftmax", "ugd"])
def test_gradients_outside_ddp_are_averaged_over_the_processes(labelled, tmp_path, monkeypatch, mode) -> None:
    """The proxies' (UGD's projectors') gradients are the mean over the processes: (g + 3 g) / 2 = 2 g here; a
    single process leaves them alone, and a parameter without a gradient on every process stays without one (one
    all-reduce of which gradients exist first; the other rank here holds the same ones: a rank without a gradient
    where another has one is tests/engine/test_ddp_small_batches.py's)."""
    import raml.distributed

    if mode == "ugd":
        trainer = _distiller(labelled, tmp_path, "ugd", batch_size=4)
        parameters = list(trainer.method.projectors.parameters())
    else:
        trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax")
        parameters = [trainer.method.proxies]
    reduce, calls = _fake_all_reduce(3.0)
    monkeypatch.setattr(raml.distributed, "all_reduce_sum_", reduce)
    grads = [torch.randn_like(p) for p in parameters]
    for parameter, grad in zip(parameters, grads, strict=True):
        parameter.grad = grad.clone()
    trainer.method.before_optimizer_step()  # one process: nothing to average
    assert calls == [] and all(torch.equal(p.grad, g) for p, g in zip(parameters, grads, strict=True))
    trainer.dist = _TwoRanks()
    trainer.method.before_optimizer_step()
    assert len(calls) == 1 + len(parameters) and all(dist is trainer.dist for dist in calls)
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(parameters, grads, strict=True))
    parameters[0].grad = None
    trainer.method.before_optimizer_step()
    assert parameters[0].grad is None and len(calls) == 2 * (1 + len(parameters)) - 1


# ------------------------------------------------------------------------------------------ ugd's pieces
class _LayeredTrunk(torch.nn.Module):
    """A timm-like trunk: stages named layer1..layerN (not a Sequential)."""

    def __init__(self, stages: int) -> None:
        super().__init__()
        for n in range(1, stages + 1):
            self.add_module(f"layer{n}", torch.nn.Conv2d(n, n + 1, 1))


def test_ugd_distils_the_stage_counted_from_the_end_of_the_trunk() -> None:
    from raml.engine.methods.ugd import _stage

    four = _LayeredTrunk(4)
    assert _stage(four, -2) is four.layer3 and _stage(four, -1) is four.layer4
    two = _LayeredTrunk(2)  # two named stages are enough
    assert _stage(two, -2) is two.layer1
    sequential = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU())  # a cut torchvision trunk
    assert _stage(sequential, -2) is sequential[0] and _stage(sequential, -1) is sequential[1]
    for backbone in (_LayeredTrunk(1), torch.nn.Sequential(torch.nn.ReLU()), torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError) as error:
            _stage(backbone, -2)
        assert str(error.value) == (
            "--mode ugd needs a ResNet-like backbone (stages layer1..layer4, or a sequence of stages); got "
            f"{type(backbone).__name__}."
        )


def test_ugd_reads_a_stage_s_channels_from_its_last_batch_norm_else_its_last_convolution() -> None:
    from raml.engine.methods.ugd import _channels

    conv, bn = torch.nn.Conv2d, torch.nn.BatchNorm2d
    normed = torch.nn.Sequential(conv(3, 4, 1), bn(4), conv(4, 6, 1), bn(6), conv(6, 10, 1), bn(9), conv(9, 5, 1))
    assert _channels(normed) == 9
    assert _channels(torch.nn.Sequential(conv(3, 4, 1), conv(4, 6, 1), conv(6, 10, 1))) == 10
    with pytest.raises(ValueError) as error:
        _channels(torch.nn.Sequential(torch.nn.ReLU()))
    assert str(error.value) == "Cannot tell the output channels of the stage Sequential for --mode ugd."


def test_ugd_projector_is_bn_linear_bn_with_kaiming_fan_out_weights_from_the_generator() -> None:
    from raml.engine.methods.ugd import ugd_projector

    projector = ugd_projector(5, 7, torch.Generator().manual_seed(4))
    first, linear, last = projector
    assert type(first) is torch.nn.BatchNorm1d and first.num_features == 5
    assert type(last) is torch.nn.BatchNorm1d and last.num_features == 7
    assert type(linear) is torch.nn.Linear and linear.bias is None and linear.weight.shape == (7, 5)
    # Kaiming normal, fan_out (= 7 outputs), ReLU gain sqrt(2): N(0, 2 / 7), drawn from the given generator
    expected = torch.empty(7, 5).normal_(0.0, (2.0 / 7.0) ** 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(linear.weight.detach(), expected, rtol=1e-6, atol=0)


def test_ugd_projects_the_student_s_second_last_stage_onto_the_teacher_s_dimension(labelled, tmp_path) -> None:
    """Two projectors (fine and coarse grid) from the student's stage -2 channels to the teacher's embedding size,
    drawn one after the other from a generator seeded with --seed, in their own parameter group at --lr; the
    teacher's regions come from its last stage."""
    from raml.engine.methods.ugd import _channels, _stage, ugd_projector

    trainer = _distiller(labelled, tmp_path, "ugd", batch_size=4, seed=7, lr=3e-3)
    method, student, teacher = trainer.method, trainer.student, trainer.teacher.network  # the frozen teacher's network
    assert method._student_stage is _stage(student.backbone, -2)
    assert method._teacher_stage is _stage(teacher.backbone, -1) and method._teacher_stage is not method._student_stage
    generator = torch.Generator().manual_seed(7)
    channels, dim = _channels(_stage(student.backbone, -2)), int(teacher.meta["outputdim"])
    expected = [ugd_projector(channels, dim, generator) for _ in range(2)]
    assert len(method.projectors) == 2
    for got, want in zip(method.projectors, expected, strict=True):
        assert got[1].weight.shape == (dim, channels) and torch.equal(got[1].weight, want[1].weight)
    assert not torch.equal(method.projectors[0][1].weight, method.projectors[1][1].weight)
    groups = [group for group in trainer.optimizer.param_groups if group.get("name") == "ugd_projectors"]
    assert len(groups) == 1 and groups[0]["lr"] == 3e-3
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in method.projectors.parameters()]


def test_a_proxy_epoch_is_class_groups_from_the_epoch_generator_with_item_seeds(labelled, tmp_path) -> None:
    from raml.engine.methods.labelled import AugmentedImages
    from raml.engine.mining import class_groups

    trainer = _sym_trainer(labelled, tmp_path, loss="normsoftmax", query_size=12, batch_size=8)
    captured = _capture_loader(trainer)
    batches = list(trainer.method.epoch_batches(3, torch.Generator().manual_seed(6)))
    groups = class_groups(trainer.train_split.labels, 12, GROUP_SIZE, torch.Generator().manual_seed(6))
    indices = [i for group in groups for i in group]
    items = list(zip(indices, trainer.item_seeds(3, len(indices)), strict=True))
    assert batches == [items[0:8], items[8:12]]
    dataset = captured["dataset"]
    assert isinstance(dataset, AugmentedImages) and dataset.paths == trainer.train_paths


# ------------------------------------------------------------------------------------------ batch mixup over processes
def test_batch_mixup_over_processes_mixes_the_gathered_views_and_keeps_this_rank_s_share(
    labelled, tmp_path, monkeypatch
) -> None:
    """--mixup-partner batch with two processes: every process gathers the uint8 views of the whole global batch,
    mixes them all with the shared generator (partners may come from the other process's images) and keeps its
    own rows; here rank 1 of two, the other rank's views a stand-in (this rank's, inverted)."""
    from raml.engine.methods import coupled

    trainer = _distiller(labelled, tmp_path, "ts_aug", mixup_partner="batch", batch_size=4)
    batch = next(trainer._epoch_batches(1, torch.Generator().manual_seed(0)))
    student, teacher, _ = batch

    class SecondOfTwo:
        enabled, world_size, rank = True, 2, 1

    gathered = []

    def all_gather_rows(tensor: torch.Tensor, dist) -> torch.Tensor:
        assert dist is trainer.dist and tensor.is_contiguous()
        gathered.append(tensor)
        return torch.cat([255 - tensor, tensor])  # rank 0's rows first

    monkeypatch.setattr(coupled, "all_gather_rows", all_gather_rows)
    trainer.dist = SecondOfTwo()
    got_student, got_teacher = trainer.method._views(batch, torch.Generator().manual_seed(9))
    assert [g.dtype for g in gathered] == [torch.uint8, torch.uint8]
    everyone = (torch.cat([255 - student, student]).float() / 255, torch.cat([255 - teacher, teacher]).float() / 255)
    mixed_student, mixed_teacher = mixup_views(*everyone, torch.Generator().manual_seed(9))
    assert got_student.shape == student.shape and got_teacher.shape == teacher.shape
    assert torch.equal(got_student, mixed_student[4:]) and torch.equal(got_teacher, mixed_teacher[4:])


# ------------------------------------------------------------------------------ logged terms, batch partners
def test_relation_methods_log_each_term_summed_over_the_images_and_pass_the_generator_to_the_mixup(
    labelled, tmp_path
) -> None:
    """rkd with --mixup-partner batch (the mixup draws from the batch generator): the loss is rkd's total on the
    views times B, and each other term is logged times B ("total" is the loss itself)."""
    trainer = _distiller(
        labelled, tmp_path, "rkd", mixup_partner="batch", rkd_distance_weight=0.5, rkd_angle_weight=3.0
    )
    batch = next(trainer._epoch_batches(1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        student, teacher = trainer.method.view_embeddings(batch, torch.Generator().manual_seed(5))
    got = trainer.method.batch_loss(batch, torch.Generator().manual_seed(5))
    b, p = student.shape[:2]
    groups = torch.arange(b).repeat_interleave(p)
    terms = rkd_loss(student.flatten(0, 1), teacher.flatten(0, 1), 0.5, 3.0, groups)
    assert set(got.terms) == {"loss", "distance", "angle"} and got.images == b == 4
    assert got.loss.item() == pytest.approx(terms["total"].item() * b, rel=1e-5)
    assert float(got.terms["loss"]) == pytest.approx(terms["total"].item() * b, rel=1e-5)
    for name in ("distance", "angle"):
        assert float(got.terms[name]) == pytest.approx(terms[name].item() * b, rel=1e-5), name


def test_ts_aug_with_batch_partners_mixes_with_the_batch_generator(labelled, tmp_path) -> None:
    trainer = _distiller(labelled, tmp_path, "ts_aug", mixup_partner="batch")
    batch = next(trainer._epoch_batches(1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        student, teacher = trainer.method.view_embeddings(batch, torch.Generator().manual_seed(5))
    got = trainer.method.batch_loss(batch, torch.Generator().manual_seed(5))
    terms = distillation_loss_terms(student, teacher, trainer.config.lam_1, trainer.config.lam_2)
    assert got.loss.item() == pytest.approx(terms["total"].item(), rel=1e-5)


@pytest.mark.parametrize(
    ("size", "grids"), [(8, [1, 1]), (16, [1, 1]), (32, [2, 1]), (48, [3, 1]), (64, [4, 2]), (96, [6, 3])]
)
def test_ugd_grids_are_the_student_size_over_16_and_half_of_it(labelled, tmp_path, size, grids) -> None:
    trainer = _distiller(labelled, tmp_path, "ugd", batch_size=4)
    got = trainer.method.grids(size)
    assert got == grids and all(type(g) is int for g in got)


def test_ugd_logs_its_global_and_local_terms_summed_over_the_images(labelled, tmp_path) -> None:
    """With batch partners (the generator reaches the mixup): loss = (alpha global + beta local) x B, each term logged
    x B, and the checkpoint keeps the projectors under their name."""
    from raml.losses.ugd import UGD_ALPHA, UGD_BETA

    trainer = _distiller(labelled, tmp_path, "ugd", batch_size=4, mixup_partner="batch")
    batch = next(trainer._epoch_batches(1, torch.Generator().manual_seed(0)))
    got = trainer.method.batch_loss(batch, torch.Generator().manual_seed(5))
    assert set(got.terms) == {"loss", "global", "local"} and got.images == 4
    total = UGD_ALPHA * float(got.terms["global"]) + UGD_BETA * float(got.terms["local"])
    assert float(got.terms["loss"]) == pytest.approx(total, rel=1e-5) and got.loss.item() == pytest.approx(
        total, rel=1e-5
    )
    assert float(got.terms["local"]) > 0 and float(got.terms["global"]) > 0
    again = trainer.method.batch_loss(batch, torch.Generator().manual_seed(6))  # other partners: another loss
    assert again.loss.item() != pytest.approx(got.loss.item(), rel=1e-6)
    saved = trainer.method.checkpoint_state()
    assert set(saved) == {"ugd_projectors"}
    state = trainer.method.projectors.state_dict()
    assert set(saved["ugd_projectors"]) == set(state)
    assert all(torch.equal(saved["ugd_projectors"][k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------ the coupled views' epoch
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"uncoupled_views": True, "fused_views": True, "mixup": False},
        {"mixup_partner": "batch", "image_sizes": [16, 24]},
    ],
)
def test_a_coupled_epoch_is_the_generator_s_order_of_the_configured_dataset(labelled, tmp_path, changes) -> None:
    """The dataset of coupled views as configured (partners with dataset mixup, --uncoupled-views, --fused-views)
    at this epoch; the items in the order of the epoch generator's permutation, cut at the epoch size, in batches of
    the batch size; with several student sizes, each batch's items carry its size (raml.data.sizes' draw)."""
    trainer = _distiller(labelled, tmp_path, "ts_aug", batch_size=3, query_size=10, **changes)
    c = trainer.config
    captured = _capture_loader(trainer)
    batches = list(trainer.method.epoch_batches(2, torch.Generator().manual_seed(8)))
    order = torch.randperm(15, generator=torch.Generator().manual_seed(8))[:10].tolist()
    expected = [order[i : i + 3] for i in range(0, 10, 3)]
    if "image_sizes" in changes:
        sizes = draw_batch_sizes([16, 24], len(expected), c.seed, 2)
        expected = [[(i, size) for i in batch] for batch, size in zip(expected, sizes, strict=True)]
        assert set(sizes) == {16, 24}
    assert batches == expected and trainer.method.batches_per_epoch() == 4  # ceil(10 / 3)
    dataset = captured["dataset"]
    assert dataset.paths == [Path(p) for p in trainer.train_paths] and dataset.epoch == 2
    assert (dataset.student_size, dataset.teacher_size, dataset.pos_num, dataset.seed) == (16, SIZE, 2, c.seed)
    assert dataset.partners == (c.mixup and c.mixup_partner == "dataset")
    assert dataset.coupled == (not c.uncoupled_views) and dataset.fused == c.fused_views


def test_an_unknown_loss_of_a_loss_dependent_mode_is_refused_with_the_valid_names() -> None:
    from raml.engine.methods import method_class

    with pytest.raises(ValueError) as error:
        method_class("sym", "arcface")
    assert str(error.value) == "Unknown --loss 'arcface' for --mode sym; valid: triplet, normsoftmax."
