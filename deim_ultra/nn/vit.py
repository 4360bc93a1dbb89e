"""Plain ViT backbones of DEIMv2 S/M/L/X: patch tokens of chosen blocks, positions encoded by 2-D rotary embedding.

Two families share the code, selected by a `ViTConfig` from `VIT_VARIANTS`:

    variant             dim heads ffn            prefix tokens   LayerScale  final norm  used by
    vit_tiny            192   3   MLP x4         cls             no          no          DEIMv2-S
    vit_tinyplus        256   4   MLP x4         cls             no          no          DEIMv2-M
    dinov3_vits16       384   6   MLP x4         cls + 4 store   yes         LN(1e-5)    DEIMv2-L
    dinov3_vits16plus   384   6   SwiGLU x6      cls + 4 store   yes         LN(1e-5)    DEIMv2-X

All have 12 blocks and 16 x 16 patches. The DINOv3 variants also carry a `mask_token` (used by the authors only in
self-supervised pre-training), a K-masked qkv bias, and rescale the RoPE coordinates at random in training.

Attribute names reproduce the authors' state-dict keys below `backbone.dinov3.` (DINOv3 models) or
`backbone.dinov3._model.` (ViT-Tiny models; the `_model` level is added by `deim_ultra.nn.spatial_adapter`), including
the persistent buffers `rope_embed.periods` and `blocks.<i>.attn.qkv.bias_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VIT_VARIANTS",
    "Attention",
    "Block",
    "LayerScale",
    "MaskedBiasLinear",
    "Mlp",
    "PatchEmbed",
    "RopeEmbedding",
    "SwiGLU",
    "ViTConfig",
    "VisionTransformer",
    "apply_rope",
    "rope_angles",
    "rotate_half",
]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT variant.

    Attributes:
        embed_dim: Token width D.
        num_heads: Attention heads; D / num_heads must be divisible by 4 (two axes, sin and cos halves).
        depth: Number of blocks.
        patch_size: Side of the square patches (the token grid's stride).
        ffn_ratio: FFN hidden width as a multiple of D (before SwiGLU's 2/3 reduction).
        swiglu: SwiGLU FFN (`w1`, `w2`, `w3`) instead of a GELU MLP (`fc1`, `fc2`).
        storage_tokens: Register tokens between the cls token and the patch tokens.
        layerscale: Per-channel residual scales `ls1`, `ls2` in each block.
        mask_k_bias: qkv bias multiplied by a persistent `bias_mask` buffer (DINOv3 zeroes the K part).
        dinov3_extras: Final LayerNorm `norm` on the returned tokens and the (unused at inference) `mask_token`.
        norm_eps: LayerNorm epsilon.
        rope_rescale: In training, RoPE coordinates are scaled by a log-uniform factor in [1/r, r]; None disables.
    """

    embed_dim: int
    num_heads: int
    depth: int = 12
    patch_size: int = 16
    ffn_ratio: float = 4.0
    swiglu: bool = False
    storage_tokens: int = 0
    layerscale: bool = False
    mask_k_bias: bool = False
    dinov3_extras: bool = False
    norm_eps: float = 1e-6
    rope_rescale: float | None = None


_DINOV3 = dict(storage_tokens=4, layerscale=True, mask_k_bias=True, dinov3_extras=True, norm_eps=1e-5, rope_rescale=2.0)

VIT_VARIANTS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(embed_dim=192, num_heads=3),
    "vit_tinyplus": ViTConfig(embed_dim=256, num_heads=4),
    "dinov3_vits16": ViTConfig(embed_dim=384, num_heads=6, **_DINOV3),
    "dinov3_vits16plus": ViTConfig(embed_dim=384, num_heads=6, ffn_ratio=6.0, swiglu=True, **_DINOV3),
}


def rope_angles(h: int, w: int, periods: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angles of every patch of an h x w grid.

    Patch centres are normalised per axis to (-1, 1) (so the encoding depends on the grid's aspect, not its size),
    optionally multiplied by `scale`, and divided by each period.

    Args:
        h, w: Token grid size.
        periods: (P,) float32 periods, P = head_dim / 4.
        scale: (1,) coordinate scale, or None.

    Returns:
        (h * w, 4 * P) angles in row-major patch order; the channel layout is
        [P angles of y, P angles of x, the same 2P repeated], matching `rotate_half`'s pairing of channel c with c + 2P.
    """
    ys = torch.arange(0.5, h, dtype=periods.dtype, device=periods.device) / h
    xs = torch.arange(0.5, w, dtype=periods.dtype, device=periods.device) / w
    # meshgrid by broadcasting: NCNN's converter (pnnx) has no meshgrid
    coords = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)], -1).reshape(h * w, 2)
    coords = 2.0 * coords - 1.0
    if scale is not None:
        coords = coords * scale
    angles = 2 * math.pi * coords[:, :, None] / periods  # (h * w, 2, P)
    return angles.flatten(1).repeat(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., 2K) [a, b] -> (..., 2K) [-b, a]: the 90-degree rotation of each (a_i, b_i) channel pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate (..., N, d) `x` by the (N, d) angles whose `sin` and `cos` are given; same shape as `x`."""
    return x * cos + rotate_half(x) * sin


class RopeEmbedding(nn.Module):
    """2-D rotary position embedding with geometric periods base**(4i / head_dim), i < head_dim / 4.

    Attributes:
        periods (torch.Tensor): (head_dim / 4,) persistent buffer; the authors' checkpoints hold it.
        rescale (float | None): Training-time coordinate rescale range (see `ViTConfig.rope_rescale`).
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale: float | None = None) -> None:
        """Periods for `head_dim` channels per head."""
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", base**exponents, persistent=True)
        self.rescale = rescale

    @property
    def random(self) -> bool:
        """Whether a call draws a fresh random coordinate scale (and so must be repeated for every block)."""
        return self.training and self.rescale is not None

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h * w, head_dim) sin and cos of the angles of an h x w grid, in float32."""
        scale = None
        if self.random:
            # One draw per call, from the global generator, as the authors do: a seeded run reproduces theirs.
            log_r = math.log(self.rescale)
            scale = torch.empty(1, device=self.periods.device).uniform_(-log_r, log_r).exp()
        # float32 even in a half-precision model: angles reach ~2 pi * 100 for the slowest period
        angles = rope_angles(h, w, self.periods.float(), scale)
        return angles.sin(), angles.cos()


class MaskedBiasLinear(nn.Linear):
    """Linear layer whose bias is multiplied by a persistent `bias_mask` buffer.

    DINOv3 masks the K part of the qkv bias (a per-query constant in the attention logits, which softmax ignores).
    The authors' DEIMv2 copy leaves the buffer NaN until a checkpoint is loaded; here it starts as that checkpoint
    value, [1] * D + [0] * D + [1] * D.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        """`out_features` = 3 D for a qkv projection."""
        super().__init__(in_features, out_features)
        mask = torch.ones(out_features)
        mask[out_features // 3 : 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens (prefix tokens are not rotated).

    Attributes:
        qkv (nn.Linear): D -> 3D, with bias (a `MaskedBiasLinear` for DINOv3).
        proj (nn.Linear): D -> D output projection.
    """

    def __init__(self, dim: int, num_heads: int, mask_k_bias: bool = False) -> None:
        """Attention of width `dim` split into `num_heads` heads."""
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim) if mask_k_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attend over (B, N, D) tokens whose last HW get rotated by the (HW, D / heads) `rope` sin, cos; (B, N, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = (self._rotate(t, *rope) for t in (q, k))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))

    @staticmethod
    def _rotate(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) with its last HW tokens rotated (in the float32 of `sin`, then cast back)."""
        prefix = t.shape[-2] - sin.shape[-2]
        rotated = apply_rope(t[:, :, prefix:].to(sin.dtype), sin, cos).to(t.dtype)
        return torch.cat([t[:, :, :prefix], rotated], dim=-2)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2, D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        """Feed-forward of width `dim` with `hidden` inner channels."""
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x) with inner width 2/3 of `hidden`, rounded up to a multiple of `align`."""

    def __init__(self, dim: int, hidden: int, align: int = 8) -> None:
        """Feed-forward of width `dim`; `hidden` is the nominal (MLP-equivalent) inner width."""
        super().__init__()
        inner = int(hidden * 2 / 3)
        inner += -inner % align
        self.w1 = nn.Linear(dim, inner)
        self.w2 = nn.Linear(dim, inner)
        self.w3 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel residual scale `gamma` (D,)."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        """Scale of width `dim`, all `init`."""
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        """Block of the variant `cfg`."""
        super().__init__()
        d = cfg.embed_dim
        hidden = int(d * cfg.ffn_ratio)
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.mask_k_bias)
        self.ls1 = LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, hidden) if cfg.swiglu else Mlp(d, hidden)
        self.ls2 = LayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); `rope` as in `Attention.forward`."""
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels, by a strided convolution `proj`."""

    def __init__(self, dim: int, patch_size: int, in_channels: int = 3) -> None:
        """Embed `in_channels`-channel images into `dim`-wide tokens."""
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, (H // p) * (W // p), D) row-major tokens; pixels beyond whole patches are dropped."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT returning the patch tokens after the blocks `indexes`.

    Attributes:
        cls_token (nn.Parameter): (1, 1, D).
        storage_tokens (nn.Parameter): (1, S, D) registers (DINOv3 only).
        mask_token (nn.Parameter): (1, D) (DINOv3 only; enters the forward as 0 * mask_token, see `forward`).
        patch_embed (PatchEmbed), rope_embed (RopeEmbedding), blocks (nn.ModuleList[Block]),
        norm (nn.LayerNorm): Final norm applied to every returned map (DINOv3 only).
    """

    def __init__(self, cfg: ViTConfig | str, indexes: Sequence[int]) -> None:
        """Build variant `cfg` (a `ViTConfig` or a `VIT_VARIANTS` name) returning blocks `indexes` (0-based)."""
        super().__init__()
        cfg = VIT_VARIANTS[cfg] if isinstance(cfg, str) else cfg
        if sorted(set(indexes)) != list(indexes) or not 0 <= indexes[0] <= indexes[-1] < cfg.depth:
            raise ValueError(f"indexes must be increasing block numbers below {cfg.depth}, got {list(indexes)}")
        # plain attributes, not the config object: checkpoints pickle modules, and only modules load safely
        self.storage = cfg.storage_tokens
        self.dinov3_extras = cfg.dinov3_extras
        self.indexes = list(indexes)
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.storage_tokens, d))
        if cfg.dinov3_extras:
            self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(d, cfg.patch_size)
        self.rope_embed = RopeEmbedding(d // cfg.num_heads, rescale=cfg.rope_rescale)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.dinov3_extras else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal linear weights, zero biases, small random cls / register tokens (the authors' scheme)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage:
            nn.init.normal_(self.storage_tokens, std=0.02)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens of the requested blocks.

        Args:
            x: (B, 3, H, W) ImageNet-normalised images.

        Returns:
            One (B, (H // p) * (W // p), D) tensor per entry of `indexes`, row-major over the token grid, with the
            final norm applied for DINOv3 variants; cls and register tokens are dropped.
        """
        tokens = self.patch_embed(x)
        b = tokens.shape[0]
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        cls = self.cls_token
        if self.dinov3_extras:
            cls = cls + 0 * self.mask_token  # keeps mask_token in the graph: DDP then finds no unused parameter
        prefix = [cls] + ([self.storage_tokens] if self.storage else [])
        n_prefix = sum(t.shape[1] for t in prefix)
        x = torch.cat([t.expand(b, -1, -1) for t in prefix] + [tokens], dim=1)

        rope = None if self.rope_embed.random else self.rope_embed(h, w)
        outputs = []
        # blocks after the last returned one cannot affect the outputs (all shipped configs end at the last block)
        for i, block in enumerate(self.blocks[: self.indexes[-1] + 1]):
            x = block(x, self.rope_embed(h, w) if self.rope_embed.random else rope)
            if i in self.indexes:
                patches = x[:, n_prefix:]
                # LayerNorm acts per token, so norming only the patch tokens equals the authors' norm-then-slice
                outputs.append(self.norm(patches) if self.norm is not None else patches)
        return outputs
