"""How far ``--fused-views`` is from the reference's views: pixel differences and the student view's sharpness.

Renders ``--views`` random views of one photo in both modes (the default is torchvision's pixels with the PIL
backend) and prints, per resolution, the mean and largest absolute differences in grey levels and the
student view's gradient energy (mean squared difference of neighbouring pixels) in the fused mode relative to
the reference's. Example (a real photo that ships with matplotlib)::

    python scripts/measure_fused_views.py \\
        .venv/lib/python3.11/site-packages/matplotlib/mpl-data/sample_data/grace_hopper.jpg
"""

from __future__ import annotations

import argparse
import json

import torch

from raml.data.images import load_image
from raml.data.views import render_coupled_views, sample_view_params


def _energy(views: torch.Tensor) -> float:
    x = views.double()
    return float((x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher-image-size", type=int, default=448)
    parser.add_argument("--no-jitter", action="store_true", help="geometry only (the blur of the two resizes)")
    args = parser.parse_args()
    img = load_image(args.image)
    params = [sample_view_params(img.width, img.height, torch.Generator().manual_seed(s)) for s in range(args.views)]
    if args.no_jitter:
        from raml.data.views import ViewParams

        params = [ViewParams(p.top, p.left, p.height, p.width, p.flip) for p in params]
    sizes = (args.image_size, args.teacher_image_size)
    reference = render_coupled_views(img, params, *sizes, backend="pil")
    fused = render_coupled_views(img, params, *sizes, backend="pil", fused=True)
    report = {"image": args.image, "size": list(img.size), "views": args.views, "jitter": not args.no_jitter}
    for name, ref, ours in zip(("student", "teacher"), reference, fused, strict=True):
        diff = (ref.int() - ours.int()).abs().float()
        per_view = diff.mean(dim=(1, 2, 3))
        report[name] = {
            "mean_abs_diff": round(float(diff.mean()), 2),
            "median_view_mean_abs_diff": round(float(per_view.median()), 2),
            "max_view_mean_abs_diff": round(float(per_view.max()), 2),
            "max_abs_diff": int(diff.max()),
            "gradient_energy_fused_over_reference": round(_energy(ours) / _energy(ref), 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
