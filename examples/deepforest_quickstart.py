"""The main job, end to end on real data: train a small DEIM on the NEON tree-crown photos, validate, predict, export.

The deepforest dataset (4 aerial rasters, 951 human-drawn tree boxes) is built on first use from the PyPI wheel
`deepforest==2.1.0` (see deim_ultra/cfg/datasets/deepforest.yaml). Defaults are sized for a CPU-only machine: from
random weights a few epochs give a working pipeline, not a detector (that takes pretrained weights or a GPU and 100+
epochs, see docs/benchmarks.md). `--model deim-n.pt` (or any pretrained name, README "Pretrained detectors by name")
fine-tunes the authors' COCO weights instead, where they can be downloaded.

    python examples/deepforest_quickstart.py --epochs 3 --imgsz 320
    python examples/deepforest_quickstart.py --model dfine-s-obj2coco.pt --epochs 24 --imgsz 640 --device 0
"""

import argparse
from pathlib import Path

from deim_ultra import DEIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = DEIM(args.model)
    model.train(data="deepforest.yaml", epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device)
    metrics = model.val(data="deepforest.yaml", imgsz=args.imgsz, batch=args.batch)
    print(f"val mAP50-95 {metrics.box.map:.4f}  mAP50 {metrics.box.map50:.4f}")
    image = sorted(Path(model.trainer.data["val"]).glob("*.png"))[0]
    result = model.predict(image, imgsz=args.imgsz, save=True)[0]
    print(f"{image.name}: {len(result.boxes)} trees, saved to {result.save_dir}")
    print(f"exported {model.export(format='onnx', imgsz=args.imgsz)}")


if __name__ == "__main__":
    main()
