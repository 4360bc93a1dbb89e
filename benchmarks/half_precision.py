"""A trained checkpoint in fp32 and in fp16, side by side: validation mAP, and how far the raw outputs move.

fp16 is what TensorRT FP16 engines and Ultralytics' `half=True` run; a DETR can lose accuracy or produce Inf/NaN
there (large logits, attention sums) while fp32 is fine. For the checkpoint given, this prints val mAP50-95 / mAP50
from Ultralytics' validator with `half=False` and `half=True`, then feeds up to `--images` val images to the fused
model in both precisions and prints the largest difference of their detection scores and how many fp16 outputs are
not finite. fp16 needs a CUDA device.

    python benchmarks/half_precision.py runs/convergence/a_seed0/weights/best.pt --data DATA.yaml --imgsz 128
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ultralytics.data import YOLODataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.cfg import resolve_data_yaml  # noqa: E402


def val_images(data: str, imgsz: int, limit: int) -> torch.Tensor:
    """Up to `limit` val images of `data` (those Ultralytics' dataset scan keeps), resized to imgsz x imgsz, RGB in
    [0, 1], shape (N, 3, imgsz, imgsz)."""
    info = check_det_dataset(data)
    paths = YOLODataset(img_path=info["val"], data=info, augment=False).im_files[:limit]
    images = [cv2.resize(cv2.imread(p)[..., ::-1], (imgsz, imgsz)) for p in paths]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="0", help="one CUDA device index")
    args = parser.parse_args()
    args.data = str(resolve_data_yaml(args.data))  # a shipped name such as deepforest.yaml
    if not torch.cuda.is_available():
        raise SystemExit("fp16 inference needs a CUDA device; none is visible here")

    print("| precision | val mAP50-95 | mAP50 |")
    print("|---|---|---|")
    for half in (False, True):
        metrics = DEIM(args.weights).val(
            data=args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, half=half, plots=False
        )
        print(f"| {'fp16' if half else 'fp32'} | {metrics.box.map:.4f} | {metrics.box.map50:.4f} |")

    device = torch.device(f"cuda:{args.device}" if args.device.isdigit() else args.device)
    model = DEIM(args.weights).model.to(device).eval().fuse()
    x = val_images(args.data, args.imgsz, args.images).to(device)
    with torch.inference_mode():
        full = model(x)[0].float()
        half = model.half()(x.half())[0].float()
    # Queries can swap places between precisions near ties, so scores are compared as each image's sorted list.
    scores = (full[..., 4].sort(dim=1).values - half[..., 4].sort(dim=1).values).abs().max().item()
    print(
        f"\n{len(x)} val images, raw outputs fp16 against fp32: largest difference of the sorted scores "
        f"{scores:.4f}, non-finite fp16 values {(~torch.isfinite(half)).sum().item()} of {half.numel()}"
    )


if __name__ == "__main__":
    main()
