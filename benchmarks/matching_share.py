"""Share of a DEIM training step spent in Hungarian matching (CPU, DEIM-N, batch 4 at 640 by default).

Runs full training steps (forward with denoising, loss, backward) under cProfile and reports the cumulative time
inside `HungarianMatcher.forward` (every layer's matching: final, aux, pre, encoder) against the whole step.

    python benchmarks/matching_share.py --batch 4 --imgsz 640 --boxes 20 --steps 5
"""

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

from deim_ultra.loss.matcher import HungarianMatcher  # noqa: E402
from deim_ultra.nn.tasks import DEIMDetectionModel  # noqa: E402


def random_batch(batch: int, imgsz: int, boxes: int, nc: int, generator: torch.Generator) -> dict:
    """Images and `boxes` random GT boxes per image in Ultralytics' batch format."""
    xy = torch.rand(batch * boxes, 2, generator=generator) * 0.8 + 0.1
    wh = torch.rand(batch * boxes, 2, generator=generator) * 0.15 + 0.02
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=generator),
        "cls": torch.randint(0, nc, (batch * boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([xy, wh], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes).float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--boxes", type=int, default=20, help="GT boxes per image")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DEIMDetectionModel(args.model, verbose=False).train()
    batch = random_batch(args.batch, args.imgsz, args.boxes, model.model[-1].nc, torch.Generator().manual_seed(0))
    model.loss(batch)[0].backward()  # warm-up

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        model.zero_grad()
        model.loss(batch)[0].backward()
    profiler.disable()
    step = (time.perf_counter() - start) / args.steps
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, prim calls, tottime, cumtime, callers)}
    code = HungarianMatcher.forward.__wrapped__.__code__  # forward is wrapped by torch.no_grad
    matching = next(v[3] for k, v in stats.items() if k == (code.co_filename, code.co_firstlineno, code.co_name))
    matching /= args.steps
    print(
        f"{args.model} batch {args.batch} imgsz {args.imgsz}, {args.boxes} GT/img, torch threads "
        f"{torch.get_num_threads()}: step {step * 1000:.0f} ms (under cProfile), matching {matching * 1000:.1f} ms "
        f"({100 * matching / step:.1f}% of the step)"
    )


if __name__ == "__main__":
    main()
