"""D-FINE weights converted through `dfine-<size>.yaml` reproduce the D-FINE authors' eval outputs.

`fixtures/dfine_parity.pt` holds no weights. Per case it records what the authors' public D-FINE code
(Peterande/D-FINE, commit 4a1f73a, eval mode, CPU, float32) did with the weights `dfine_state` below generates: those
weights, renamed to the official keys, were loaded strictly into the authors' model built from their config
(`configs/dfine/dfine_hgnetv2_<size>_coco.yml`, or `objects365/dfine_hgnetv2_s_obj365.yml` for the Objects365 head),
which then ran on `dfine_input(seed)`. Recorded: `pred_logits` and `pred_boxes` of that run, the seed, a checksum of
the generated weights (so drift in the generation is reported as such, not as a model mismatch), and the key and
shape of every tensor in the authors' state dict (the layout of their released checkpoints).

The recording script is not part of this repository (it runs the authors' code). It builds each case's model in a
fresh process (their config loader leaks keys between configs built in one process) with `HGNetv2.pretrained: False`,
loads `dfine_state(size, nc, seed)` strictly, keeping the model's own `decoder.anchors` / `decoder.valid_mask`
buffers, runs `dfine_input(seed)` in eval mode single-threaded, and stores the entries read below plus
`selection_gap` (their 300th minus 301st proposal score) and `params`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from ultralytics.utils import YAML

from deim_ultra import convert_official
from deim_ultra.cfg import resolve_model_yaml
from deim_ultra.nn.tasks import DEIMDetectionModel
from deim_ultra.official_names import official_namer

FIXTURE = Path(__file__).parent / "fixtures" / "dfine_parity.pt"
# case -> (size, classes, seed); 366 = the authors' Objects365 head (category ids 1..365 used as labels unchanged).
# Seeds were picked so that the 300th and 301st proposal scores differ by more than 1e-4 (the fixture's
# `selection_gap`, from the authors' run; the test requires 2e-5): the implementations' scores agree to about 1e-6,
# so both select the same 300 proposals.
CASES = {
    "n": ("n", 80, 15),
    "s": ("s", 80, 31),
    "m": ("m", 80, 18),
    "l": ("l", 80, 24),
    "x": ("x", 80, 69),
    "s_obj365": ("s", 366, 21),
}
ATOL = 1e-4
DERIVED = ("decoder.anchors", "decoder.valid_mask")  # buffers built from the input size, not weights


def dfine_state(size: str, nc: int, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic non-trivial weights of `dfine-<size>.yaml` with `nc` classes, under the official key names.

    The model is built under `seed`; every trainable floating parameter then gets 0.02 * N(0, 1) from a generator
    seeded with `seed` (so the zero-initialised box and LQE layers are live). BatchNorm running statistics are those
    of one train-mode pass in float64 over two random 192 px images from that generator, the variances doubled
    afterwards. With default statistics features fade into near-constant maps (tied proposal scores, identical
    queries); with plain batch statistics a deep random network amplifies float32 rounding chaotically (the authors'
    frozen BatchNorm arithmetic in L and X alone then moves their outputs by 1e-3 to 1); doubled, neither happens.
    The pass runs in float64 because it is itself chaotic: in float32 the statistics would depend on thread count.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DEIMDetectionModel(f"dfine-{size}.yaml", nc=nc, verbose=False)
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        images = torch.rand((2, 3, 192, 192), generator=gen, dtype=torch.float64)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one pass, exactly that batch's statistics
        model.double().train()(images)
        model.float().eval()
        for m in norms:
            m.momentum = 0.1
            m.running_var.mul_(2.0)
    name = official_namer(model)
    return {name(k): v.clone() for k, v in model.state_dict().items()}


def dfine_input(seed: int) -> torch.Tensor:
    """The (1, 3, 640, 640) image in [0, 1] the authors' model ran on."""
    return torch.rand((1, 3, 640, 640), generator=torch.Generator().manual_seed(seed))


def checksum(state: dict[str, torch.Tensor]) -> float:
    """Sum of |values| over every floating tensor except the anchors derived from the input size, in float64."""
    return sum(v.double().abs().sum().item() for k, v in state.items() if v.is_floating_point() and k not in DERIVED)


def eval_outputs(state: dict[str, torch.Tensor], yaml: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """`pred_logits` and `pred_boxes` of `state` converted through `yaml`, in eval mode."""
    model = convert_official(state, yaml).model.eval()
    with torch.no_grad():
        out = model(image)[1][-1]
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}


def rows(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(Q, nc + 4) rows of image 0: each query's logits and box."""
    return torch.cat([out["pred_logits"][0], out["pred_boxes"][0]], -1)


def matched_max_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Max abs difference of logits and boxes in query order, and after pairing the queries one to one.

    Proposal scores that are near-tied in float32 may be ranked in another order by the two implementations, which
    permutes the decoder queries (the detections are the same), and queries at off-image anchors are exact duplicates;
    so queries are paired by a minimum-cost assignment on their max-norm distance and the pairs are compared.
    """
    a, b = rows(ours), rows(ref)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    mine, theirs = linear_sum_assignment(torch.cdist(a.double(), b.double(), p=float("inf")).numpy())
    return (a - b).abs().max().item(), (a[mine] - b[theirs]).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run single-threaded, as the fixture was recorded: on a shared CPU two threads can be ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The authors' recorded outputs per case."""
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, recorded) -> tuple[str, dict, dict]:
    """(case name, regenerated official-named weights, recorded entry); the weights' checksum is checked first."""
    name = request.param
    size, nc, seed = CASES[name]
    ref = recorded[name]
    assert (ref["size"], ref["nc"], ref["seed"]) == (size, nc, seed), f"fixture entry {name} describes another case"
    state = dfine_state(size, nc, seed)
    assert checksum(state) == pytest.approx(ref["checksum"], rel=1e-6), (
        f"weight generation drifted for {name}: the generated weights are not those the fixture was recorded with"
    )
    return name, state, ref


def authors_layout(state: dict[str, torch.Tensor], ref: dict) -> dict[str, torch.Tensor]:
    """`state` restricted to the keys of the authors' model: what their checkpoint of these weights would hold."""
    return {k: state[k] for k in ref["keys"]}


def test_authors_layout_matches_ours(case):
    """The authors' model has our tensors under the same names and shapes; ours has only backbone BatchNorm counters
    more for L and X (D-FINE freezes that BatchNorm there, so their checkpoints hold no `num_batches_tracked`)."""
    name, state, ref = case
    authors = dict(zip(ref["keys"], ref["shapes"]))
    assert set(authors) <= set(state), f"keys of the authors' model not in ours: {sorted(set(authors) - set(state))}"
    assert {k: list(state[k].shape) for k in authors} == authors
    extra = set(state) - set(authors)
    assert all(k.startswith("backbone.") and k.endswith(".num_batches_tracked") for k in extra)
    assert bool(extra) == (CASES[name][0] in ("l", "x"))


def test_matches_authors_dfine(case):
    """Every size (and the Objects365 head), converted from the authors' layout through its dfine YAML, gives the
    authors' logits and boxes."""
    name, state, ref = case
    size, nc, seed = CASES[name]
    assert ref["pred_boxes"].std() > 0.1, f"{name}: the recorded queries are (nearly) all alike; pick another seed"
    assert ref["selection_gap"] > 2e-5, f"{name}: near-tied proposal scores at the top-300 cut; pick another seed"
    ours = eval_outputs(authors_layout(state, ref), f"dfine-{size}.yaml", dfine_input(seed))
    assert ours["pred_logits"].shape == (1, 300, nc)
    in_order, matched = matched_max_diff(ours, ref)
    print(f"dfine-{size} nc={nc}: max abs diff {in_order:.3g} in query order, {matched:.3g} queries paired")
    assert matched <= ATOL, f"{name}: max abs diff {matched} > {ATOL}"


def test_deim_yaml_does_not_match(case):
    """The same weights through the DEIM YAML (SiLU decoder) miss the authors' outputs: the activation matters."""
    name, state, ref = case
    size, _, seed = CASES[name]
    a, b = rows(eval_outputs(authors_layout(state, ref), f"deim-{size}.yaml", dfine_input(seed))), rows(ref)
    nearest = torch.cdist(a, b, p=float("inf")).min(1).values.max().item()  # no pairing of queries closes this gap
    print(f"deim-{size}: {nearest:.3g} from the authors' D-FINE outputs")
    assert nearest > 100 * ATOL, f"{name}: deim-{size}.yaml reproduces D-FINE (gap {nearest})"


@pytest.mark.parametrize("size", "nsmlx")
def test_dfine_yaml_is_deim_yaml_with_relu(size):
    """dfine-<size>.yaml is found by its bare name and equals deim-<size>.yaml but for the decoder activation."""
    dfine, deim = (YAML.load(resolve_model_yaml(f"{kind}-{size}.yaml")) for kind in ("dfine", "deim"))
    dfine_decoder, deim_decoder = dfine["head"][-1], deim["head"][-1]
    assert dfine_decoder[2] == deim_decoder[2] == "DFINEDecoder"
    assert (dfine_decoder[3][12], deim_decoder[3][12]) == ("relu", "silu")
    dfine_decoder[3][12] = "silu"
    assert dfine == deim
