"""Peak memory of one DEIM training step (forward, loss, backward, AdamW step) on CPU, per data stage and input size.

Each configuration runs in a fresh process, since the peak resident set size (ru_maxrss) only grows: the process
builds the model, optimizer and a batch from deim-ultra's real training pipeline (DEIMDataset in the stage asked for,
then the trainer's batch mixup and multi-scale resize), measures its RSS, runs `--steps` training steps on that batch
and prints the peak RSS and how far above the pre-step RSS it went, with the batch's boxes and denoising queries.

    python benchmarks/memory.py                       # DEIM-S, batch 4, 640: warmup / Dense O2O, with / without MS
    python benchmarks/memory.py --model deim-n.yaml --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CONFIGS = {  # name: (data stage, mosaic / mixup probability, largest multi-scale size instead of imgsz)
    "warmup (no mosaic, no mixup), imgsz": ("warmup", 0.0, False),
    "warmup, largest multi-scale size": ("warmup", 0.0, True),
    "Dense O2O (mosaic + mixup every batch), imgsz": ("dense_o2o", 1.0, False),
    "Dense O2O, largest multi-scale size": ("dense_o2o", 1.0, True),
}


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, args: argparse.Namespace) -> dict:
    """Run `args.steps` training steps of configuration `name` and return its memory figures."""
    import torch
    from ultralytics.data.build import build_dataloader
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import IterableSimpleNamespace

    from deim_ultra.cfg import DEIM_CFG_DICT
    from deim_ultra.data.batch_transforms import batch_mixup
    from deim_ultra.data.dataset import DEIMDataset
    from deim_ultra.data.synthetic import make_synthetic_dataset
    from deim_ultra.nn.tasks import DEIMDetectionModel
    from deim_ultra.recipe.optim import build_adamw
    from deim_ultra.recipe.schedule import multiscale_sizes

    stage, p, largest = CONFIGS[name]
    torch.manual_seed(0)
    data = check_det_dataset(str(make_synthetic_dataset(args.data, **DATA)))
    hyp = IterableSimpleNamespace(**{**DEIM_CFG_DICT, "mosaic": p, "mixup": p})
    dataset = DEIMDataset(img_path=data["train"], imgsz=args.imgsz, augment=True, hyp=hyp, data=data, stage=stage)
    batch = next(iter(build_dataloader(dataset, args.batch, workers=0, shuffle=False)))
    batch["img"] = batch["img"].float() / 255
    if stage == "dense_o2o":
        batch = batch_mixup(batch, generator=torch.Generator().manual_seed(0), p=p)
    size = max(multiscale_sizes(args.imgsz, base_size_repeat=1)) if largest else args.imgsz  # S..X recipes: 0.25
    batch["img"] = torch.nn.functional.interpolate(batch["img"], size=(size, size), mode="nearest")

    model = DEIMDetectionModel(args.model, nc=data["nc"], verbose=False).train()
    optimizer = build_adamw([{"params": [q for q in model.parameters() if q.requires_grad]}], 2e-4, 1e-4)
    before = rss_mib()
    for _ in range(args.steps):
        loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_image = torch.bincount(batch["batch_idx"].long(), minlength=args.batch).float()
    max_boxes = min(int(per_image.max()), model.model[-1].num_denoising)
    groups = model.model[-1].num_denoising // max_boxes if max_boxes else 0  # Ultralytics' get_cdn_group
    return {
        "config": name,
        "size": size,
        "boxes_per_image": round(per_image.mean().item(), 1),
        "max_boxes": int(per_image.max()),
        "dn_queries": 2 * groups * max_boxes,
        "rss_before_mib": round(before),
        "peak_mib": round(peak),
        "step_mib": round(peak - before),
    }


DATA = dict(n_train=16, n_val=2, imgsz=640, min_objects=6, max_objects=12, min_size=28, max_size=140, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deim-s.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("runs/memory/dense_shapes_640"))
    parser.add_argument("--config", choices=sorted(CONFIGS), help="run one configuration in this process")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--config", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{args.model}, batch {args.batch}, CPU, {args.steps} steps per configuration, fresh process each")
    print("| configuration | input | boxes / image (max) | denoising queries | RSS before | peak RSS | step adds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['size']} | {r['boxes_per_image']} ({r['max_boxes']}) | {r['dn_queries']} | "
            f"{r['rss_before_mib']} MiB | {r['peak_mib']} MiB | {r['step_mib']} MiB |"
        )


if __name__ == "__main__":
    main()
