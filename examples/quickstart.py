"""The main job, end to end in minutes on a CPU: train DEIM-N on generated shapes, validate, predict, export ONNX.

The data (deim_ultra/cfg/datasets/shapes.yaml) is generated on first use, with no network: 160 train and 40 val
scenes of 128 px, each with 2-5 filled shapes of 20-48 px in three classes (red rectangle, green ellipse, blue
triangle). The defaults are sized so that DEIM-N trained from scratch ends, on a 2-core CPU, at val mAP50 0.96 / 0.86
(mAP50-95 0.72 / 0.65) for seeds 0 / 1, in about 5 minutes for the whole script (dataset build, training, val,
predict, ONNX export) when it has a core to itself; about twice that when other processes keep both cores busy. The
run goes through every stage of the DEIM-N recipe, scaled to 18 epochs: data-aug warmup, Dense O2O
(mosaic + batch mixup), plain augmentation and the no-aug tail (the log's `DEIM schedule:` lines).

The backbone follows `pretrained=True` (Ultralytics' default): when the ImageNet HGNetv2 file is available (in the
weights directory, or downloaded from the authors' release) training starts from it; offline the log says
`Backbone starts from random weights`, as in the timings above.

    python examples/quickstart.py
    python examples/quickstart.py --seed 1 --project /tmp/runs

On CPU, Ultralytics trains on cpu_count - 1 threads (one on a 2-core machine). On a 2-core machine shared with
other jobs, `--threads 2` took 0.27 s per iteration once against one thread's steady 0.38-0.39 s, but 0.9-3.4 s in
three other tries, whenever another process held a core: use it only on a machine of your own.
For real photos see examples/deepforest_quickstart.py.
"""

import argparse
from pathlib import Path

import torch
from ultralytics.data.utils import IMG_FORMATS, img2label_paths

from deim_ultra import DEIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--data", default="shapes.yaml")
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: Ultralytics' choice)")
    parser.add_argument("--project", default=None, help="folder for the runs (default: Ultralytics' runs_dir)")
    args = parser.parse_args()
    where = {"project": args.project} if args.project else {}

    model = DEIM(args.model)
    if args.threads:  # after Ultralytics' device selection, which sets its own thread count
        model.add_callback("on_pretrain_routine_start", lambda trainer: torch.set_num_threads(args.threads))
    model.train(
        data=args.data,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        seed=args.seed,
        device=args.device,
        **where,
    )
    metrics = model.val(data=args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, **where)
    print(f"val mAP50-95 {metrics.box.map:.4f}  mAP50 {metrics.box.map50:.4f}")

    val_dir = Path(model.trainer.data["val"])
    images = sorted(p for p in val_dir.iterdir() if p.suffix[1:].lower() in IMG_FORMATS)
    labelled = sum(len(Path(f).read_text().splitlines()) for f in img2label_paths([str(p) for p in images]))
    boxes, save_dir = 0, None
    for result in model.predict(
        images, imgsz=args.imgsz, device=args.device, save=True, line_width=1, stream=True, verbose=False, **where
    ):
        boxes, save_dir = boxes + len(result.boxes), result.save_dir
    print(f"{boxes} boxes found on {len(images)} val images ({labelled} labelled objects), saved to {save_dir}")
    print(f"exported {model.export(format='onnx', imgsz=args.imgsz, device=args.device)}")


if __name__ == "__main__":
    main()
