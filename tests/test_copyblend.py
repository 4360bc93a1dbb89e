"""Tests for DEIMv2's CopyBlend on collated batches (deim_ultra.data.copyblend).

Images are random noise, so a blended pixel almost surely differs from the original; every object is a box on the
integer pixel grid of a 64 x 64 image (exact in float32 once normalised) with a class of its own, so a pasted box's
class names the object it was copied from. Expected pixels are rebuilt here from the input and the returned beta.
"""

import pytest
import torch

from deim_ultra.data.copyblend import batch_copyblend

SIZE = 64
# (image, class, x1, y1, x2, y2) in pixels
LARGE = [
    (0, 0, 4, 4, 20, 16),  # 16 x 12 = 192 px^2
    (1, 2, 10, 20, 40, 50),  # 30 x 30
    (1, 3, 0, 0, 12, 10),  # 12 x 10 = 120, touching the top-left corner
    (0, 4, 44, 50, 64, 64),  # 20 x 14, touching the bottom-right corner
]
TINY = [(0, 1, 30, 30, 35, 35)]  # 5 x 5 = 25 px^2, under the 100 px^2 threshold


def make_batch(objects, n_images=3, dtype=torch.float32, seed=0):
    """A collated batch with `objects` as ground truth (grouped by image, as Ultralytics collates them)."""
    img = torch.rand(n_images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.uint8:
        img = (img * 255).round().to(torch.uint8)
    objects = sorted(objects, key=lambda o: o[0])
    xyxy = torch.tensor([o[2:] for o in objects], dtype=torch.float32).reshape(-1, 4) / SIZE
    bboxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    return {
        "img": img,
        "cls": torch.tensor([[float(o[1])] for o in objects]).reshape(-1, 1),
        "bboxes": bboxes,
        "batch_idx": torch.tensor([float(o[0]) for o in objects]),
        "im_file": tuple(f"{i}.png" for i in range(n_images)),
    }


def snapshot(batch):
    return {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def pixel_box(box):
    """Normalised cxcywh -> integer pixel corners; fails unless the box sits on the pixel grid."""
    cx, cy, w, h = (box.double() * SIZE).tolist()
    corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    rounded = [round(c) for c in corners]
    assert max(abs(a - b) for a, b in zip(corners, rounded)) < 1e-4, corners
    return rounded


def split(out, before):
    """Per image: (own boxes, own classes, pasted boxes, pasted classes) of the output."""
    result = []
    for i in range(out["img"].shape[0]):
        own = int((before["batch_idx"] == i).sum())
        mine = out["batch_idx"] == i
        boxes, cls = out["bboxes"][mine], out["cls"][mine]
        result.append((boxes[:own], cls[:own], boxes[own:], cls[own:].flatten().long().tolist()))
    return result


def source_of(cls, objects):
    return next(o for o in objects if o[1] == cls)


@pytest.mark.parametrize("objects", [LARGE + TINY, LARGE[:2] + TINY], ids=["pool4", "pool2"])
def test_every_image_gains_min_k_pool_objects_of_the_source_size(objects):
    pool_classes = {o[1] for o in objects if o in LARGE}
    k = min(3, len(pool_classes))
    for seed in range(10):
        batch = make_batch(objects)
        before = snapshot(batch)
        out = batch_copyblend(batch, torch.Generator().manual_seed(seed), p=1.0)
        assert 0.45 <= out["copyblend"] <= 0.55
        assert out["im_file"] == batch["im_file"]
        assert torch.equal(out["batch_idx"], torch.sort(out["batch_idx"], stable=True).values)  # grouped by image
        for i, (own_boxes, own_cls, pasted, pasted_cls) in enumerate(split(out, before)):
            assert torch.equal(own_boxes, before["bboxes"][before["batch_idx"] == i])  # own boxes first, unchanged
            assert torch.equal(own_cls, before["cls"][before["batch_idx"] == i])
            assert len(pasted_cls) == k  # image 2 has no objects of its own and still receives k
            assert len(set(pasted_cls)) == k and set(pasted_cls) <= pool_classes  # without replacement, no tiny one
            for box, c in zip(pasted, pasted_cls):
                x1, y1, x2, y2 = pixel_box(box)
                _, _, sx1, sy1, sx2, sy2 = source_of(c, objects)
                assert (x2 - x1, y2 - y1) == (sx2 - sx1, sy2 - sy1)
                assert 0 <= x1 and 0 <= y1 and x2 <= SIZE and y2 <= SIZE


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_pixels_are_blended_in_paste_order_from_the_unmodified_batch(dtype):
    """Without expansion, replaying the pastes named by the output reproduces every pixel: overlapping pastes
    compound on the image being built, while sources come from the input."""
    objects = LARGE + TINY
    for seed in range(10):
        batch = make_batch(objects, dtype=dtype, seed=seed)
        before = snapshot(batch)
        out = batch_copyblend(batch, torch.Generator().manual_seed(seed), p=1.0, expand=None)
        beta = out["copyblend"]
        source = before["img"].double()
        expected = source.clone()
        for i, (_, _, pasted, pasted_cls) in enumerate(split(out, before)):
            for box, c in zip(pasted, pasted_cls):
                x1, y1, x2, y2 = pixel_box(box)
                src_img, _, sx1, sy1, sx2, sy2 = source_of(c, objects)
                region = expected[i, :, y1:y2, x1:x2]
                expected[i, :, y1:y2, x1:x2] = region * beta + source[src_img, :, sy1:sy2, sx1:sx2] * (1 - beta)
        assert out["img"].dtype == dtype
        error = (out["img"].double() - expected).abs().max().item()
        assert error <= (0.5 + 1e-6 if dtype == torch.uint8 else 1e-5)
        for k, v in before.items():
            assert torch.equal(batch[k], v), f"input {k} was modified"


def test_expanded_region_is_a_clipped_margin_around_the_box_blended_with_the_same_margin_of_the_source():
    objects = LARGE + TINY
    seen_clipped = False
    for seed in range(30):
        batch = make_batch(objects, seed=seed)
        before = snapshot(batch)
        out = batch_copyblend(batch, torch.Generator().manual_seed(seed), p=1.0, num_objects=1)
        beta = out["copyblend"]
        for i, (_, _, pasted, pasted_cls) in enumerate(split(out, before)):
            assert len(pasted_cls) == 1
            x1, y1, x2, y2 = pixel_box(pasted[0])
            src_img, _, sx1, sy1, sx2, sy2 = source_of(pasted_cls[0], objects)
            w, h = x2 - x1, y2 - y1
            changed = (out["img"][i] != before["img"][i]).any(0)
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
            assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
            margins = {"left": x1 - left, "right": right - x2, "top": y1 - top, "bottom": bottom - y2}
            # room on each side in the source and in the destination image
            rooms = {
                "left": min(sx1, x1),
                "right": min(SIZE - sx2, SIZE - x2),
                "top": min(sy1, y1),
                "bottom": min(SIZE - sy2, SIZE - y2),
            }
            for side, margin in margins.items():
                size = w if side in ("left", "right") else h
                assert min(int(size * 0.1), rooms[side]) <= margin <= min(int(size * 0.25), rooms[side]), side
                seen_clipped |= rooms[side] < int(size * 0.1)
            # opposite sides get the same margin (one ratio per object) unless the room on one of them ran out
            for a, b, size in (("left", "right", w), ("top", "bottom", h)):
                if min(rooms[a], rooms[b]) >= int(size * 0.25):
                    assert margins[a] == margins[b]
            src = before["img"][src_img, :, sy1 - margins["top"] : sy2 + margins["bottom"]]
            src = src[:, :, sx1 - margins["left"] : sx2 + margins["right"]].double()
            expected = before["img"][i, :, top:bottom, left:right].double() * beta + src * (1 - beta)
            assert (out["img"][i, :, top:bottom, left:right].double() - expected).abs().max() < 1e-5
    assert seen_clipped  # the corner objects made some margin hit an image border


def test_area_threshold_is_inclusive_and_in_pixels_of_the_batch_images():
    objects = [(0, 0, 0, 0, 10, 10), (1, 1, 20, 20, 29, 31)]  # 100 px^2 is eligible, 99 px^2 is not
    for seed in range(10):
        out = batch_copyblend(make_batch(objects), torch.Generator().manual_seed(seed), p=1.0, expand=None)
        for _, _, pasted, pasted_cls in split(out, make_batch(objects)):
            assert pasted_cls == [0]
            x1, y1, x2, y2 = pixel_box(pasted[0])
            assert (x2 - x1, y2 - y1) == (10, 10)
    # a higher threshold empties the pool: nothing changes
    batch = make_batch(objects)
    out = batch_copyblend(batch, torch.Generator().manual_seed(0), p=1.0, area_threshold=101.0)
    assert out["copyblend"] == 1.0
    assert all(out[k] is batch[k] for k in ("img", "cls", "bboxes", "batch_idx"))


@pytest.mark.parametrize("objects", [TINY, []], ids=["only_tiny", "no_boxes"])
def test_empty_pool_leaves_the_batch_unchanged(objects):
    batch = make_batch(objects)
    out = batch_copyblend(batch, torch.Generator().manual_seed(0), p=1.0)
    assert out["copyblend"] == 1.0 and out is not batch
    assert all(out[k] is batch[k] for k in ("img", "cls", "bboxes", "batch_idx"))


def test_probability():
    gen = torch.Generator().manual_seed(0)
    betas = [batch_copyblend(make_batch(LARGE), gen, p=0.5)["copyblend"] for _ in range(300)]
    fired = [b for b in betas if b != 1.0]
    assert 110 < len(fired) < 190
    assert all(0.45 <= b <= 0.55 for b in fired) and max(fired) - min(fired) > 0.08
    batch = make_batch(LARGE)
    out = batch_copyblend(batch, gen, p=0.0)
    assert out["copyblend"] == 1.0
    assert all(out[k] is batch[k] for k in ("img", "cls", "bboxes", "batch_idx"))


def test_single_image_batch_pastes_its_own_objects():
    objects = [o for o in LARGE if o[0] == 0]
    batch = make_batch(objects, n_images=1)
    out = batch_copyblend(batch, torch.Generator().manual_seed(3), p=1.0)
    classes = out["cls"].flatten().long().tolist()
    assert classes[:2] == [0, 4] and sorted(classes[2:]) == [0, 4]  # k = min(3, 2): both, after the originals
    assert out["batch_idx"].tolist() == [0, 0, 0, 0] and not torch.equal(out["img"], batch["img"])


def test_same_seed_same_output():
    a = batch_copyblend(make_batch(LARGE + TINY), torch.Generator().manual_seed(7), p=1.0)
    b = batch_copyblend(make_batch(LARGE + TINY), torch.Generator().manual_seed(7), p=1.0)
    c = batch_copyblend(make_batch(LARGE + TINY), torch.Generator().manual_seed(8), p=1.0)
    assert a["copyblend"] == b["copyblend"]
    for key in ("img", "cls", "bboxes", "batch_idx"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["img"], c["img"])


def test_paste_position_covers_every_placement_inside_the_image():
    objects = [(0, 0, 2, 1, 62, 61)]  # 60 x 60: five placements per axis, both image borders included
    xs, ys = set(), set()
    for seed in range(40):
        out = batch_copyblend(make_batch(objects), torch.Generator().manual_seed(seed), p=1.0, expand=None)
        for _, _, pasted, _ in split(out, make_batch(objects)):
            x1, y1, _, _ = pixel_box(pasted[0])
            xs.add(x1)
            ys.add(y1)
    assert xs == ys == set(range(SIZE - 60 + 1))
