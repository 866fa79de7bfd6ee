"""MobileUtr's building blocks (spec: shared/spec/mobileutr.md, section 3).

Module and attribute names are the release's (`Residual.fn`, `LocalAgg`, `SelfAttn`,
`LocalProp`, ...) so that its state_dicts load unchanged; the code is ours. Shapes: B batch,
C width, H x W a feature map, N = H W tokens (row-major), n = N / 4 sampled tokens, h heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MLP_RATIO = 4
LOCAL_KERNEL = 9  # LocalAgg's depthwise kernels
SAMPLE = 2  # the LGL stage's token stride (the release's sr_ratio)
TOKEN_EPS = 1e-6  # the blocks' LayerNorms
PROPAGATION_EPS = 1e-5  # LocalProp's LayerNorm (a default nn.LayerNorm in the release)
LGL_DROP_PATH = 0.1  # the release's constant rate in every LGL block
# Explicit attention materialises (h, q, n) scores; queries go in chunks of at most this many
# scores so a large slice does not need h N^2 floats at once.
SCORES_PER_CHUNK = 1 << 24


@dataclass(frozen=True)
class BlockSizes:
    """The inner widths of one bottleneck block: per head, the query/key and the value
    channels; the MLP's hidden units; the softmax scale. The release's are `release(dim,
    heads)`; a compressed block keeps fewer channels or units but its original scale."""

    dim_qk: int
    dim_v: int
    mlp: int
    scale: float

    @classmethod
    def release(cls, dim: int, heads: int) -> BlockSizes:
        head = dim // heads
        return cls(head, head, MLP_RATIO * dim, head**-0.5)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's branch with probability p and scale the
    others by 1 / (1 - p); the identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Residual(nn.Module):
    """x + fn(x)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvUtr(nn.Module):
    """`depth` x [x + BN(GELU(DW_k(x))), x + BN(GELU(PW(BN(GELU(PW(x))))))] (inverted
    bottleneck x4), then `up`: 3 x 3 conv to `cout` channels, BN, ReLU (no upsampling)."""

    def __init__(self, cin: int, cout: int, depth: int, kernel: int) -> None:
        super().__init__()
        hidden = MLP_RATIO * cin
        self.block = nn.Sequential(
            *(
                nn.Sequential(
                    Residual(
                        nn.Sequential(
                            nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin),
                            nn.GELU(),
                            nn.BatchNorm2d(cin),
                        )
                    ),
                    Residual(
                        nn.Sequential(
                            nn.Conv2d(cin, hidden, 1),
                            nn.GELU(),
                            nn.BatchNorm2d(hidden),
                            nn.Conv2d(hidden, cin, 1),
                            nn.GELU(),
                            nn.BatchNorm2d(cin),
                        )
                    ),
                )
                for _ in range(depth)
            )
        )
        self.up = nn.Sequential(*conv_bn_relu(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.block(x))


class Embeddings(nn.Module):
    """The hierarchical patch embedding: stem and layer1 at full resolution, layer2 at 1/2,
    layer3 at 1/4. Returns the three stage outputs (the decoder's skips)."""

    def __init__(
        self, in_channels: int, dims: list[int], depths: list[int], kernels: list[int]
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, dims[0]))
        self.layer1 = ConvUtr(dims[0], dims[0], depths[0], kernels[0])
        self.layer2 = ConvUtr(dims[0], dims[1], depths[1], kernels[1])
        self.layer3 = ConvUtr(dims[1], dims[2], depths[2], kernels[2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s0 = self.layer1(self.stem(x))
        s1 = self.layer2(F.max_pool2d(s0, 2))
        s2 = self.layer3(F.max_pool2d(s1, 2))
        return s0, s1, s2


class CMlp(nn.Module):
    """Grouped 3 x 3 convolutions C -> 4C -> C (groups = C), GELU between."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, MLP_RATIO * dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(MLP_RATIO * dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Mlp(nn.Module):
    """Linear C -> hidden (the release: 4C), GELU, Linear hidden -> C."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gate(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The LocalAgg update x + x (sigmoid(logits) - 1/2): multiplicative, not additive."""
    return x + x * (torch.sigmoid(logits) - 0.5)


class LocalAgg(nn.Module):
    """Three gated updates of a feature map: a 9 x 9 depthwise position term, a PW-DW9-PW
    branch on BN(x) and a grouped-conv MLP on BN(x) (spec 3.2)."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        pad = LOCAL_KERNEL // 2
        self.pos_embed = nn.Conv2d(dim, dim, LOCAL_KERNEL, padding=pad, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, LOCAL_KERNEL, padding=pad, groups=dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = CMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gate(x, self.pos_embed(x))
        x = gate(x, self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x))))))
        return gate(x, self.drop_path(self.mlp(self.norm2(x))))


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T scale) over the keys: (..., q, d) x (..., n, d) -> (..., q, n)."""
    return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool | None = None
) -> torch.Tensor:
    """(B, h, n, d) each -> (B, h, n, d). fused (default: off the CPU): torch's fused kernel,
    which torch's FLOP counter counts as the two matrix products; otherwise an explicit
    softmax(QK^T)V in chunks of queries (the counter sees nothing of the fused CPU kernel)."""
    if q.device.type != "cpu" if fused is None else fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    batch, heads, n, _ = q.shape
    chunk = max(1, SCORES_PER_CHUNK // (batch * heads * n))
    if chunk >= n:
        return torch.matmul(attention_weights(q, k, scale), v)
    parts = [
        torch.matmul(attention_weights(q[:, :, i : i + chunk], k, scale), v)
        for i in range(0, n, chunk)
    ]
    return torch.cat(parts, dim=2)


class GlobalSparseAttn(nn.Module):
    """Multi-head self-attention of tokens (B, N, C) on an H x W map (the release's
    GlobalSparseAttn). With `sample` 2 the queries, keys and values are all the pixels
    (2i, 2j) (the release's AvgPool2d(1, 2) picks them; it does not average), and the result
    is spread back over each 2 x 2 cell by a depthwise transposed convolution (`LocalProp`)
    and a LayerNorm; with `sample` 1 it is plain attention over all N tokens.

    Per head, queries and keys have `sizes.dim_qk` channels and values `sizes.dim_v` (both
    C / h in the release; fewer after compression), and the scale is `sizes.scale`, recorded
    rather than derived from the widths."""

    def __init__(self, dim: int, heads: int, sample: int, sizes: BlockSizes | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        sizes = sizes or BlockSizes.release(dim, heads)
        self.heads, self.sample, self.scale = heads, sample, sizes.scale
        self.qk_width, self.v_width = heads * sizes.dim_qk, heads * sizes.dim_v
        self.qkv = nn.Linear(dim, 2 * self.qk_width + self.v_width)
        self.proj = nn.Linear(self.v_width, dim)
        if sample > 1:
            self.LocalProp = nn.ConvTranspose2d(
                self.v_width, self.v_width, sample, stride=sample, groups=self.v_width
            )
            self.norm = nn.LayerNorm(self.v_width, eps=PROPAGATION_EPS)

    def sampled(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The tokens attention runs on: (B, N, C) -> (B, n, C)."""
        if self.sample == 1:
            return x
        grid = x.unflatten(1, (height, width))
        return grid[:, :: self.sample, :: self.sample].flatten(1, 2)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (B, h, n, dim_qk) and v (B, h, n, dim_v) of sampled tokens (B, n, C): the
        outputs of `qkv` are the queries, then the keys, then the values; head-major within
        each."""
        widths = [self.qk_width, self.qk_width, self.v_width]
        parts = self.qkv(x).split(widths, dim=-1)
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in parts)
        return q, k, v

    def forward(
        self, x: torch.Tensor, height: int, width: int, trace: list | None = None
    ) -> torch.Tensor:
        """trace: where given, the sampled tokens are appended (for query attention)."""
        tokens = self.sampled(x, height, width)
        if trace is not None:
            trace.append(tokens)
        q, k, v = self.split_heads(tokens)
        y = multi_head_attention(q, k, v, self.scale).transpose(1, 2).flatten(2)
        if self.sample > 1:
            rows, cols = height // self.sample, width // self.sample
            y = y.transpose(1, 2).unflatten(2, (rows, cols))
            y = self.norm(self.LocalProp(y).flatten(2).transpose(1, 2))
        return self.proj(y)

    def query_rows(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(h, q, n) attention of the sampled tokens at `queries` over all n, from the traced
        sampled tokens (n, C) of one image."""
        q, k, _ = self.split_heads(tokens[None])
        return attention_weights(q[0][:, queries], k[0], self.scale)


class SelfAttn(nn.Module):
    """x + DW3(x) (conditional position encoding), then a pre-norm transformer layer on the
    tokens: t + GSA(LN(t)), t + MLP(LN(t))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        sample: int,
        drop_path: float = 0.0,
        sizes: BlockSizes | None = None,
    ) -> None:
        super().__init__()
        sizes = sizes or BlockSizes.release(dim, heads)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=TOKEN_EPS)
        self.attn = GlobalSparseAttn(dim, heads, sample, sizes)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=TOKEN_EPS)
        self.mlp = Mlp(dim, sizes.mlp)

    def forward(self, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        x = x + self.pos_embed(x)
        height, width = x.shape[-2:]
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), height, width, trace))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).unflatten(2, (height, width))


class LGLBlock(nn.Module):
    """LocalAgg then SelfAttn with 2 x 2 token sampling (the LGL stage), or SelfAttn alone
    over every token (the transformer stage: the release's LGLBlock with sr_ratio 1, whose
    LocalAgg is the identity). sizes: the attention's and MLP's inner widths (default: the
    release's)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        sample: int,
        drop_path: float = 0.0,
        sizes: BlockSizes | None = None,
    ) -> None:
        super().__init__()
        self.LocalAgg = LocalAgg(dim, drop_path) if sample > 1 else nn.Identity()
        self.SelfAttn = SelfAttn(dim, heads, sample, drop_path, sizes)

    def forward(self, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        return self.SelfAttn(self.LocalAgg(x), trace)


class ConvBlock(nn.Module):
    """[3 x 3 conv, BN, ReLU] x 2 (the release's conv_block)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    """Bilinear x2 (align_corners=True, as nn.UpsamplingBilinear2d), 3 x 3 conv, BN, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            *conv_bn_relu(cin, cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)
