"""``--mode ugd``: the batch loss equals UGD's loss on region features recomputed here by hand, the unambiguous
regions are those whose nearest teacher class prototype is the label, and a run trains the student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raml.data.synth import generate_synthetic_dataset
from raml.engine.config import TrainConfig
from raml.engine.methods.ugd import class_prototypes, grid_regions
from raml.engine.trainer import Trainer
from raml.losses import ugd_loss
from raml.models import build_network, save_checkpoint

CPU = torch.device("cpu")
DR, QR = 64, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_dataset(root / "cub", num_classes=4, images_per_class=4, image_size=DR, seed=1)
    torch.manual_seed(0)
    teacher = root / "teacher.pth"
    save_checkpoint(teacher, build_network("test_resnet", whitening=16, pretrained=False))
    return root, teacher


def _trainer(setup, directory: Path) -> Trainer:
    data_root, teacher = setup
    config = TrainConfig(
        mode="ugd", student_path=str(teacher), teacher_path=str(teacher), training_dataset="cub", test_datasets=[],
        data_root=str(data_root), directory=str(directory), image_size=QR, teacher_image_size=DR, pos_num=2,
        batch_size=4, update_every=1, query_size=8, epochs=1, workers=0, val=False, seed=3, scheduler="none", lr=1e-3,
    )  # fmt: skip
    return Trainer(config, CPU, progress=False)


def test_prototypes_are_the_normalised_class_means():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 2])
    got = class_prototypes(embeddings, labels, 3)
    expected = torch.tensor([[0.5**0.5, 0.5**0.5], [0.6, 0.8], [0.0, -1.0]])
    assert torch.allclose(got, expected)


def test_grid_regions_are_the_average_pooled_cells_row_major():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    got = grid_regions(x, 2).view(2, 4, 3)
    for n in range(2):
        for r, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            cell = x[n, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2))
            assert torch.allclose(got[n, r], cell)


def test_batch_loss_equals_ugd_on_hand_made_regions_and_labels(setup, tmp_path):
    trainer = _trainer(setup, tmp_path / "ugd")
    method = trainer.method
    generator = torch.Generator().manual_seed(0)
    batch = next(trainer._epoch_batches(1, generator))
    labels = torch.as_tensor(trainer.train_split.labels)[batch[-1]].repeat_interleave(2)
    # the prototypes by hand: the teacher's embeddings of every training image, class means
    teacher_net = trainer.teacher.network
    embeddings = trainer.embed(trainer.teacher, trainer.train_paths, DR, CPU, 4, 0, False, "test")
    all_labels = torch.as_tensor(trainer.train_split.labels)
    prototypes = torch.stack([F.normalize(embeddings[all_labels == k].mean(0), dim=0) for k in range(2)])
    assert torch.allclose(method.prototypes(), prototypes, atol=1e-6)
    # the feature maps by hand, through the trunks' stages
    seen = {}
    hooks = [method._student_stage.register_forward_hook(lambda _m, _i, o: seen.__setitem__("s", o.detach())),
             method._teacher_stage.register_forward_hook(lambda _m, _i, o: seen.__setitem__("t", o))]  # fmt: skip
    with torch.no_grad():
        got = trainer._batch_loss(batch, torch.Generator().manual_seed(5))
        student_views, teacher_views = method._views(batch, torch.Generator().manual_seed(5))
        student = trainer.model(trainer.student_norm(student_views.flatten(0, 1)))
        teacher = trainer.teacher(trainer.teacher_norm(teacher_views.flatten(0, 1)))
    for hook in hooks:
        hook.remove()
    assert seen["s"].shape[2:] == (QR // 16, QR // 16) and seen["t"].shape[2:] == (DR // 32, DR // 32)
    s_regions, t_regions, masks = [], [], []
    method.projectors.train()
    with torch.no_grad():
        for grid, projector in zip((QR // 16, QR // 32), method.projectors, strict=True):
            t_vec = []
            for n in range(seen["t"].shape[0]):
                for i in range(grid):
                    for j in range(grid):
                        h, w = seen["t"].shape[2] // grid, seen["t"].shape[3] // grid
                        t_vec.append(seen["t"][n, :, i * h : (i + 1) * h, j * w : (j + 1) * w].mean(dim=(1, 2)))
            t_vec = torch.stack(t_vec)
            t_emb = F.normalize(
                teacher_net.whiten(F.normalize(teacher_net.pool(t_vec[:, :, None, None]), dim=1)), dim=1
            )
            predicted = (t_emb @ prototypes.T).argmax(dim=1)
            masks.append((predicted == labels.repeat_interleave(grid * grid)).view(-1, grid * grid))
            t_regions.append(t_emb.view(-1, grid * grid, t_emb.shape[1]))
            s_regions.append(projector(grid_regions(seen["s"], grid)).view(-1, grid * grid, t_emb.shape[1]))
        expected = ugd_loss(student, teacher, s_regions, t_regions, masks)["total"] * 4
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.images == 4


def test_a_ugd_run_moves_the_student_and_the_projectors(setup, tmp_path):
    trainer = _trainer(setup, tmp_path / "run")
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    trainer.run()
    projectors_before = trainer.method.projectors  # trained in place: compare with a fresh seed-built copy
    moved = [name for name, p in trainer.student.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) > len(before) // 2, moved
    fresh = _trainer(setup, tmp_path / "fresh").method.projectors
    assert any(not torch.equal(a, b) for a, b in zip(projectors_before.parameters(), fresh.parameters(), strict=True))
