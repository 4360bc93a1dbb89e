"""Parameters and GFLOPs of DEIM-N..X in deploy layout at 640x640, counted as the authors count them (calflops).

Needs `pip install calflops transformers accelerate` (calflops imports transformers). Prints one row per size with
the authors' published figures beside ours, and Ultralytics' own (thop-based) count from its model summary.

    python benchmarks/flops.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calflops import calculate_flops  # noqa: E402
from ultralytics.utils.torch_utils import get_flops  # noqa: E402

from deim_ultra.nn.tasks import DEIMDetectionModel  # noqa: E402

PUBLISHED = {
    "n": (3_753_799, 7.16),
    "s": (10_237_491, 25.17),
    "m": (19_248_189, 56.68),
    "l": (30_769_891, 91.14),
    "x": (61_695_555, 202.67),
}


def main() -> None:
    print(f"{'size':<6}{'params':>12}{'published':>12}{'GFLOPs':>10}{'published':>11}{'diff %':>8}{'thop GFLOPs':>13}")
    for size, (params_ref, gflops_ref) in PUBLISHED.items():
        model = DEIMDetectionModel(f"deim-{size}.yaml", verbose=False).eval()
        model.fuse(verbose=False)
        head = model.model[-1]  # the authors count the FDR constants, frozen parameters there and buffers here
        params = sum(p.numel() for p in model.parameters()) + head.up.numel() + head.reg_scale.numel()
        flops, _, _ = calculate_flops(
            model=model, input_shape=(1, 3, 640, 640), output_as_string=False, print_results=False, print_detailed=False
        )
        gflops = flops / 1e9
        thop = get_flops(model, imgsz=640)
        print(
            f"{size:<6}{params:>12,}{params_ref:>12,}{gflops:>10.2f}{gflops_ref:>11.2f}"
            f"{100 * (gflops / gflops_ref - 1):>8.2f}{thop:>13.1f}"
        )


if __name__ == "__main__":
    main()
