"""How often the reference's 1e-6 weight floor decides a negative draw at D = 512 (issue 19, item 3).

The reference's distance-weighted mining (``inverse_sphere_distances``, our :mod:`raml.engine.mining`) adds
1e-6 to every pool item's weight after normalising the largest one to 1, so an item whose weight is otherwise
0 (a same-class item, whose weight is zeroed; or an item whose ``exp`` underflows) can still be drawn. This
script measures, on real embeddings of the demo's synthetic images, for every anchor of an epoch:

- the floor's share of the probability mass (``M * 1e-6 / sum(w)``);
- the mass on *floor-only* items (weight exactly the floor: same class, or ``exp`` = 0), and on items the
  floor dominates (``exp`` weight below 1e-6);
- the items above the floor per anchor: with fewer than ``neg_num`` of them, a draw without replacement must
  take a floor item (the floor then decides that draw whatever its mass);
- the share of the actual draws (``distance_weighted_negatives``, ``neg_num`` per anchor without replacement,
  the reference's draw) that land on a floor-only item, and on a same-class item (a false negative).

The weights are recomputed here plainly (float64) and checked against ``negative_probabilities``.

Embeddings: a network's 512-d GeM descriptors (L2-normalised, the whitening left out) of the training
half of a synthetic set, for a given trained checkpoint and for the same architecture at random init.

    python benchmarks/mining_floor.py --checkpoint RUN/model_best.pth.tar --data-root DATA --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from raml.data.splits import get_split
from raml.data.synth import generate_synthetic_dataset
from raml.engine.mining import distance_weighted_negatives, negative_probabilities
from raml.models.checkpoints import load_network
from raml.models.network import build_network
from raml.retrieval.extract import extract_embeddings

logger = logging.getLogger("mining_floor")
FLOOR = 1e-6


def plain_weights(anchors: np.ndarray, labels: np.ndarray, pool_labels: np.ndarray, pool: np.ndarray):
    """The reference's weights before the floor, written out: (B, M) exp-weights and the same-class mask."""
    dim = anchors.shape[1]
    distance = np.sqrt(np.clip(2.0 - 2.0 * anchors @ pool.T, 0.0, None))
    distance = np.clip(distance, 0.5, math.nextafter(2.0, 0.0))
    log_q = (dim - 2.0) * np.log(distance) + (dim - 3.0) / 2.0 * np.log1p(-(distance**2) / 4.0)
    log_w = -log_q
    same = labels[:, None] == pool_labels[None, :]
    log_w[same] = 0.0  # before the max, as the reference
    weight = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    weight[same] = 0.0
    return weight, same


def measure(embeddings: torch.Tensor, labels: np.ndarray, neg_num: int, seed: int) -> dict:
    x = embeddings.double().numpy()
    weight, same = plain_weights(x, labels, labels, x)
    total = weight.sum(axis=1) + FLOOR * x.shape[0]
    probabilities = (weight + FLOOR) / total[:, None]
    ours = negative_probabilities(embeddings, torch.as_tensor(labels), embeddings, torch.as_tensor(labels)).numpy()
    assert np.allclose(ours, probabilities, rtol=1e-9, atol=1e-15), "plain weights disagree with the library"
    floor_only = weight == 0.0  # same class, or exp underflowed to 0
    dominated = weight < FLOOR
    draws = distance_weighted_negatives(
        embeddings, torch.as_tensor(labels), embeddings, torch.as_tensor(labels), neg_num, np.random.RandomState(seed)
    ).numpy()
    rows = np.arange(x.shape[0])[:, None]
    drawn_floor_only = floor_only[rows, draws]
    drawn_same = same[rows, draws]

    def stats(values: np.ndarray) -> dict:
        return {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "p99": float(np.quantile(values, 0.99)),
            "max": float(values.max()),
            "min": float(values.min()),
        }

    effective = 1.0 / (probabilities**2).sum(axis=1)  # effective number of items an anchor draws from
    return {
        "anchors": int(x.shape[0]),
        "pool": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "neg_num": neg_num,
        "floor_mass": stats(FLOOR * x.shape[0] / total),
        "floor_only_items_per_anchor": stats(floor_only.sum(axis=1).astype(float)),
        "underflow_items_per_anchor": stats((floor_only & ~same).sum(axis=1).astype(float)),
        "floor_only_mass": stats((FLOOR * floor_only.sum(axis=1)) / total),
        "same_class_mass": stats((FLOOR * same.sum(axis=1)) / total),
        "floor_dominated_mass": stats(((weight + FLOOR) * dominated).sum(axis=1) / total),
        "items_above_floor_per_anchor": stats((~dominated).sum(axis=1).astype(float)),
        "anchors_with_fewer_items_above_floor_than_neg_num": int(((~dominated).sum(axis=1) < neg_num).sum()),
        "draws": int(draws.size),
        "draws_on_floor_dominated_items": int(dominated[rows, draws].sum()),
        "share_of_draws_on_floor_dominated_items": float(dominated[rows, draws].mean()),
        "draws_on_floor_only_items": int(drawn_floor_only.sum()),
        "share_of_draws_on_floor_only_items": float(drawn_floor_only.mean()),
        "draws_on_same_class_items": int(drawn_same.sum()),
        "anchors_with_a_same_class_draw": int(drawn_same.any(axis=1).sum()),
        "effective_items_per_anchor": stats(effective),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained raml checkpoint (resnet18 GeM)")
    parser.add_argument("--data-root", type=Path, default=None, help="folder with synth/ (else generated)")
    parser.add_argument("--classes", type=int, default=200, help="classes of the generated set (half train)")
    parser.add_argument("--images-per-class", type=int, default=60, help="images per class of the generated set")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--neg-num", type=int, default=4, help="negatives per anchor (our and the reference's 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            root = Path(tmp)
            generate_synthetic_dataset(
                root / "synth", args.classes, args.images_per_class, args.image_size, seed=args.seed,
                pattern_period=(22.0, 28.0),
            )  # fmt: skip
        split = get_split("synth-train", root)
        labels = np.asarray(split.labels)
        trained = load_network(args.checkpoint, device="cpu")
        trained.whiten = None  # the 512-d GeM descriptor (L2-normalised) under the whitening
        random_init = build_network(trained.meta["architecture"], "gem", whitening=0, pretrained=False).eval()
        report = {"checkpoint": str(args.checkpoint), "images": len(split), "classes": split.num_classes}
        for name, network in (("trained", trained), ("random_init", random_init)):
            with torch.no_grad():
                embeddings = extract_embeddings(
                    network, split.abspaths(), args.image_size, torch.device("cpu"), batch_size=64, progress=False
                )
            report[name] = measure(embeddings, labels, args.neg_num, args.seed)
            logger.info("%s: %s", name, json.dumps(report[name]))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
