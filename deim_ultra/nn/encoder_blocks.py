"""Building blocks of the DEIM/D-FINE hybrid encoder.

Attribute names reproduce the authors' state-dict keys so that official checkpoints load by prefix replacement:
``conv``/``norm`` for a conv-norm pair, ``conv1``/``conv2`` inside RepVGG blocks, ``conv1``/``conv2``/``bottlenecks``
inside CSP layers, ``cv1``..``cv4`` inside the ELAN block, ``cv1``/``cv2`` inside SCDown, and
``self_attn``/``linear1``/``linear2``/``norm1``/``norm2`` inside the AIFI transformer layer.

Conv-norm pairs come in two kinds, mirroring the authors' deploy layout: ``ConvNorm`` folds its BatchNorm into the
conv on ``fuse()``, while the pairs built by ``conv_norm_pair`` (input projections, RepVGG branches) stay plain
``nn.Sequential`` modules that only their owner may fold.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from deim_ultra.nn.activations import make_act


def conv_norm_pair(c1: int, c2: int, k: int = 1) -> nn.Sequential:
    """Bias-free stride-1 'same' conv then BatchNorm, keyed ``conv``/``norm``, without activation or ``fuse()``."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c1, c2, k, padding=k // 2, bias=False), norm=nn.BatchNorm2d(c2)))


def fold_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new conv with bias that equals ``norm(conv(x))`` with the norm's running statistics (eval mode).

    Its parameters carry the conv's `requires_grad` (a loaded checkpoint's are frozen), as Ultralytics' own fusion does.
    """
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups, bias=True
    ).to(conv.weight)
    fused.requires_grad_(conv.weight.requires_grad)
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


class ConvNorm(nn.Module):
    """Conv + BatchNorm (+ optional activation) that folds the norm into the conv for deployment.

    Forward: x (B, c1, H, W) -> (B, c2, ceil(H / s), ceil(W / s)).
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, padding=(k - 1) // 2, groups=g, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(c2)
        self.act = make_act(act)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def fuse(self) -> None:
        """Fold BatchNorm (running statistics) into the conv; idempotent."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.conv = fold_bn(self.conv, self.norm)
            self.norm = nn.Identity()


class RepVGGBlock(nn.Module):
    """act(BN(conv3x3(x)) + BN(conv1x1(x))), re-parameterisable into act(conv3x3(x) + bias).

    Forward: x (B, c, H, W) -> (B, c, H, W).
    """

    def __init__(self, c: int, act: str | None = "silu") -> None:
        super().__init__()
        self.conv1 = conv_norm_pair(c, c, 3)
        self.conv2 = conv_norm_pair(c, c, 1)
        self.act = make_act(act)
        self.conv: nn.Conv2d | None = None  # the single 3x3 conv that replaces both branches after fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def fuse(self) -> None:
        """Merge both branches into one 3x3 conv with bias; idempotent."""
        if self.conv is not None:
            return
        fused = fold_bn(self.conv1.conv, self.conv1.norm)
        point = fold_bn(self.conv2.conv, self.conv2.norm)
        with torch.no_grad():
            # A 1x1 kernel equals a 3x3 kernel that is zero except at its centre (padding 1 keeps alignment).
            fused.weight[:, :, 1, 1] += point.weight[:, :, 0, 0]
            fused.bias += point.bias
        self.conv = fused
        del self.conv1, self.conv2


class CSPLayer(nn.Module):
    """CSP layer: bottlenecks(conv1(x)) + conv2(x), with n RepVGG bottlenecks.

    The authors' conv3 is the identity here because the hidden width equals ``c2`` (expansion 1.0), so it has no
    parameters and is omitted.

    Forward: x (B, c1, H, W) -> (B, c2, H, W).
    """

    def __init__(self, c1: int, c2: int, n: int, act: str | None = "silu") -> None:
        super().__init__()
        self.conv1 = ConvNorm(c1, c2, 1, act=act)
        self.conv2 = ConvNorm(c1, c2, 1, act=act)
        self.bottlenecks = nn.Sequential(*(RepVGGBlock(c2, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class CSPLayer2(nn.Module):
    """DEIMv2's CSP layer (RepC3-like): one 1x1 conv makes both halves, a + bottlenecks(b).

    Same function as `CSPLayer` with one conv of 2 * c2 outputs instead of two of c2, as DEIMv2's `csp_type: csp2`
    builds it (the authors' conv3 is again the identity at expansion 1.0).

    Forward: x (B, c1, H, W) -> (B, c2, H, W).
    """

    def __init__(self, c1: int, c2: int, n: int, act: str | None = "silu") -> None:
        super().__init__()
        self.conv1 = ConvNorm(c1, 2 * c2, 1, act=act)
        self.bottlenecks = nn.Sequential(*(RepVGGBlock(c2, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv1(x).chunk(2, 1)
        return a + self.bottlenecks(b)


CSP_LAYERS: dict[str, type[nn.Module]] = {"csp": CSPLayer, "csp2": CSPLayer2}  # the authors' `csp_type` values


class RepNCSPELAN4(nn.Module):
    """ELAN aggregation block with two CSP stages (the encoder's FPN/PAN fusion block).

    cv1 maps to c3 channels and splits them in halves (a, b); c = cv2(b) and d = cv3(c) each have c4 channels;
    cv4 fuses concat(a, b, c, d) of c3 + 2 * c4 channels to c2. cv2 and cv3 are a CSP layer of kind `csp` ("csp" or
    DEIMv2's "csp2"), followed by a 3x3 conv-norm when `tail` is set (DEIMv2's `version: deim` block, the authors'
    RepNCSPELAN5, has none).

    Forward: x (B, c1, H, W) -> (B, c2, H, W).
    """

    def __init__(
        self, c1: int, c2: int, c3: int, c4: int, n: int, act: str | None = "silu", csp: str = "csp", tail: bool = True
    ) -> None:
        super().__init__()
        layer = CSP_LAYERS[csp]

        def branch(c_in: int) -> nn.Sequential:
            return nn.Sequential(layer(c_in, c4, n, act=act), *([ConvNorm(c4, c4, 3, act=act)] if tail else []))

        self.cv1 = ConvNorm(c1, c3, 1, act=act)
        self.cv2 = branch(c3 // 2)
        self.cv3 = branch(c4)
        self.cv4 = ConvNorm(c3 + 2 * c4, c2, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        c = self.cv2(b)
        d = self.cv3(c)
        return self.cv4(torch.cat((a, b, c, d), 1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling: 1x1 conv-norm, then depthwise k x k stride-s conv-norm, no activation.

    Forward: x (B, c1, H, W) -> (B, c2, ceil(H / s), ceil(W / s)).
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2) -> None:
        super().__init__()
        self.cv1 = ConvNorm(c1, c2, 1)
        self.cv2 = ConvNorm(c2, c2, k, s, g=c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


def sincos_pos_embed_2d(
    h: int, w: int, dim: int, temperature: float = 10000.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding for a flattened h x w feature map.

    Token t receives [sin(u * omega), cos(u * omega), sin(v * omega), cos(v * omega)] with omega_k =
    temperature ** (-k / (dim / 4)). The authors build (u, v) with meshgrid(arange(w), arange(h), indexing="ij"),
    i.e. u = t // h and v = t % h, which transposes x and y relative to the row-major token order; trained weights
    depend on that order, so it is kept.

    Returns:
        (1, h * w, dim) float32 tensor on ``device``.
    """
    if dim % 4:
        raise ValueError(f"embedding dim must be divisible by 4 for 2-D sin-cos embedding, got {dim}")
    grid_w = torch.arange(w, dtype=torch.float32, device=device)
    grid_h = torch.arange(h, dtype=torch.float32, device=device)
    # meshgrid(grid_w, grid_h, indexing="ij") by broadcasting: NCNN's converter (pnnx) has no meshgrid
    u, v = grid_w[:, None].expand(w, h), grid_h[None, :].expand(w, h)
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    u = u.flatten()[:, None] * omega[None]
    v = v.flatten()[:, None] * omega[None]
    return torch.cat((u.sin(), u.cos(), v.sin(), v.cos()), 1)[None]


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer (self-attention + GELU FFN); the position embedding enters queries and keys.

    Forward: src (B, N, C), pos (1 or B, N, C) -> (B, N, C).
    """

    def __init__(self, c: int, ffn: int, nhead: int = 8) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c, nhead, batch_first=True)
        self.linear1 = nn.Linear(c, ffn)
        self.linear2 = nn.Linear(ffn, c)
        self.norm1 = nn.LayerNorm(c)
        self.norm2 = nn.LayerNorm(c)
        self.act = nn.GELU()

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = src + pos
        src = self.norm1(src + self.self_attn(q, q, src, need_weights=False)[0])
        return self.norm2(src + self.linear2(self.act(self.linear1(src))))


class AIFI(nn.Module):
    """Stack of AIFI layers applied to one feature map (key layout ``layers.<i>``).

    Forward: x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, c: int, ffn: int, nhead: int = 8, num_layers: int = 1, temperature: float = 10000.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AIFILayer(c, ffn, nhead) for _ in range(num_layers))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Built per call so any input size works (training and eval sizes may differ); it is cheap next to attention.
        pos = sincos_pos_embed_2d(h, w, c, self.temperature, x.device).to(x.dtype)
        src = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            src = layer(src, pos)
        return src.transpose(1, 2).reshape(b, c, h, w)
