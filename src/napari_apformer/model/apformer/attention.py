"""The transformer stage of APFormer: GRPE attention with query-wise and dependency-wise pruning.

Parameter names follow the authors' release so that their state_dicts load unchanged.
Shapes: B batch, N tokens (32 x 32 = 1024 in the release), C width (128), H heads (6 in the
release; each layer may have its own), D head width (128), n kept queries of an image (padded
to the largest n of the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_GATE = -2.0
GAUSSIAN_WEIGHT = 0.01


def relative_position_tables(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index into the bias table and squared normalised distance for every (query, key) pair."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    index = (dy + grid - 1) * (2 * grid - 1) + (dx + grid - 1)
    squared_distance = (dy.float() / grid) ** 2 + (dx.float() / grid) ** 2
    return index, squared_distance


@dataclass
class AttentionRecord:
    """Attention weights of one layer: with capture, (B, H, N, N) with zero rows for pruned
    queries; from PruningAttention.attention_rows, (B, H, q, N) for the chosen queries.
    `attention` is after dependency pruning, `attention_before` before it.
    """

    attention: torch.Tensor
    attention_before: torch.Tensor


@dataclass
class LayerTrace:
    """Per-layer by-products: kept-dependency counts always, the rest on request."""

    kept_per_query: torch.Tensor  # (B, H, N) int32 keys kept by each query, 0 for pruned queries
    record: AttentionRecord | None = None
    content_attention: torch.Tensor | None = None  # (B, H, N, N) softmax(QK^T/sqrt(D)), for SSA
    layer_input: torch.Tensor | None = None  # (B, N, C) normed input, for attention_rows
    soft_kept: torch.Tensor | None = None  # scalar, mean soft kept fraction (learnable gates)

    @staticmethod
    def cat(traces: Sequence[LayerTrace]) -> LayerTrace:
        """Join the traces of parts of a batch."""

        def joined(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(v is None for v in values) else torch.cat(values)

        records = [t.record for t in traces]
        record = None
        if all(r is not None for r in records):
            record = AttentionRecord(
                torch.cat([r.attention for r in records]),
                torch.cat([r.attention_before for r in records]),
            )
        return LayerTrace(
            kept_per_query=torch.cat([t.kept_per_query for t in traces]),
            record=record,
            content_attention=joined([t.content_attention for t in traces]),
            layer_input=joined([t.layer_input for t in traces]),
        )

    @property
    def kept_dependencies(self) -> torch.Tensor:
        """(B,) kept (query, key) pairs over all heads."""
        return self.kept_per_query.sum(dim=(1, 2), dtype=torch.int64)

    @property
    def kept_dependency_fraction(self) -> torch.Tensor:
        """(B, H, N) fraction of the keys each query kept, 0 for pruned queries."""
        return self.kept_per_query.float() / self.kept_per_query.shape[-1]


@dataclass
class PrunedAttention:
    """A' = weights / normaliser: attention after dependency pruning, without the division."""

    weights: torch.Tensor  # (B, H, n, N)
    normaliser: torch.Tensor  # (B, H, n, 1)
    kept_per_query: torch.Tensor  # (B, H, n) kept dependencies of each query
    before: torch.Tensor | None  # (B, H, n, N) attention before pruning, on request
    soft_kept: torch.Tensor | None = None  # (B, H, n) soft kept fraction (learnable gates)


def prune_dependencies(
    scores: torch.Tensor,
    ratio: torch.Tensor,
    keep_before: bool = False,
    temperature: float | None = None,
) -> PrunedAttention:
    """Softmax over keys, then keep A_ij > min_i A + ratio_i (max_i A - min_i A), renormalised.

    Computed on w = exp(S - max S) (the softmax before its division by Z) so that it takes few
    passes over the large n x N tensor:
    A_ij > t_i  <=>  w_ij > c_i = f_i + r_i (1 - f_i),  f_i = exp(min S - max S);
    A'_ij = A_ij M_ij / (sum_k A_ik M_ik + 1e-6) = w_ij M_ij / (sum_k w_ik M_ik + 1e-6 Z).
    The comparison stays a plain comparison: rescaling w first would move ties by an ulp and
    flip dependencies against the release. Without autograd the scores are overwritten.

    temperature (training with learnable gates, beyond the release): the forward pass keeps
    the hard mask, the backward pass takes the gradient of sigmoid((w - c) / temperature), a
    straight-through estimator, so the gate and the ratio layer receive gradients.
    """
    inplace = not torch.is_grad_enabled()
    # Shifting by the row maximum cancels in A'; only the straight-through estimator needs its
    # gradient, so without it the shift (and the floor, used under the hard mask only) is
    # detached, which spares autograd a costly amax backward.
    shift = scores if temperature is not None else scores.detach()
    high = shift.amax(dim=-1, keepdim=True)
    floor = torch.exp(shift.amin(dim=-1, keepdim=True) - high)
    weights = scores.sub_(high).exp_() if inplace else torch.exp(scores - high)
    total = weights.sum(dim=-1, keepdim=True)
    before = weights / total if keep_before else None
    cut = floor + ratio * (1 - floor)
    mask = torch.gt(weights.detach(), cut.detach(), out=torch.empty_like(weights.detach()))
    soft_kept = None
    if temperature is not None and not inplace:
        soft = torch.sigmoid((weights - cut) / temperature)
        soft_kept = soft.mean(dim=-1)
        mask = mask + soft - soft.detach()
    weights = weights.mul_(mask) if inplace else weights * mask
    normaliser = weights.sum(dim=-1, keepdim=True) + 1e-6 * total
    kept_per_query = mask.detach().sum(dim=-1).round().to(torch.int32)
    return PrunedAttention(weights, normaliser, kept_per_query, before, soft_kept)


class PruningAttention(nn.Module):
    """Multi-head attention with Gaussian-prior relative position bias and adaptive pruning."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, grid: int, dropout: float, scale: float
    ) -> None:
        """scale: the softmax scale, 1 / sqrt(dim_head) of the network as first trained (a
        compressed layer keeps its original scale)."""
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, scale
        self.headsita = nn.Parameter(0.1 * torch.arange(1, heads + 1, dtype=torch.float32))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, heads))
        self.gate = nn.Parameter(torch.tensor(DEFAULT_GATE), requires_grad=False)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.thresh_for_kv = nn.Linear(dim_head, 1, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        index, squared_distance = relative_position_tables(grid)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.register_buffer("squared_distance", squared_distance, persistent=False)
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None
        self.gate_temperature: float | None = None  # set: learnable gates (see prune_dependencies)

    def position_bias(self) -> torch.Tensor:
        """(H, N, N) learned relative bias plus the weighted Gaussian prior.

        It depends on parameters only, so outside autograd it is built once per parameter
        version and reused.
        """
        table, sigma = self.relative_position_bias_table, self.headsita
        key = (table._version, sigma._version, table.data_ptr(), sigma.data_ptr(), table.dtype)
        cacheable = not torch.is_grad_enabled()
        if cacheable and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        # index_select, not indexing: its backward (index_add_) is several times faster on the CPU
        flat = self.relative_position_index.reshape(-1)
        learned = table.index_select(0, flat).view(*self.relative_position_index.shape, -1)
        learned = learned.permute(2, 0, 1)
        denominator = 2 * sigma[:, None, None] ** 2 + 1e-6
        gaussian = torch.exp(-self.squared_distance[None] / denominator)
        bias = (learned + GAUSSIAN_WEIGHT * gaussian).contiguous()
        self._bias_cache = (key, bias) if cacheable else None
        return bias

    def forward(
        self,
        x: torch.Tensor,
        query_index: torch.Tensor,
        query_valid: torch.Tensor,
        gate: torch.Tensor,
        capture: bool = False,
        content_attention: bool = False,
    ) -> tuple[torch.Tensor, LayerTrace]:
        """Attention output for kept queries only, scattered to (B, N, C) with zeros elsewhere.

        query_index: (B, n) token index of each kept query; query_valid: (B, n) False on padding.
        gate: scalar tensor, the dependency gate of this layer.
        """
        batch, tokens, _ = x.shape
        heads, dim_head = self.heads, self.dim_head
        inner = heads * dim_head
        n = query_index.shape[1]
        weight = self.to_qkv.weight
        kv = F.linear(x, weight[inner:]).view(batch, tokens, 2, heads, dim_head)
        k = kv[:, :, 0].transpose(1, 2)  # (B, H, N, D)
        v = kv[:, :, 1].transpose(1, 2)
        x_kept = torch.gather(x, 1, query_index[..., None].expand(-1, -1, x.shape[-1]))
        q = F.linear(x_kept, weight[:inner]).view(batch, n, heads, dim_head).transpose(1, 2)

        scores = self._scores(q, k, query_index)
        ratio = torch.sigmoid(self.thresh_for_kv(q)) * torch.sigmoid(gate)  # (B, H, n, 1)
        temperature = self.gate_temperature if self.training else None
        pruned = prune_dependencies(scores, ratio, keep_before=capture, temperature=temperature)
        del scores
        out = torch.matmul(pruned.weights, v) / pruned.normaliser
        out = out.transpose(1, 2).reshape(batch, n, inner)
        result = scatter_queries(self.to_out(out), query_index, query_valid, tokens)

        to_grid = _query_rows_to_grid(query_index, query_valid, tokens)
        trace = LayerTrace(kept_per_query=to_grid(pruned.kept_per_query))
        if pruned.soft_kept is not None:
            valid = query_valid[:, None, :].to(pruned.soft_kept.dtype)
            trace.soft_kept = (pruned.soft_kept * valid).sum() / valid.sum().clamp(min=1) / heads
        if capture:
            trace.record = AttentionRecord(
                attention=to_grid(pruned.weights / pruned.normaliser),
                attention_before=to_grid(pruned.before),
            )
        if content_attention:
            trace.content_attention = torch.softmax(
                torch.matmul(self._all_queries(x), k.transpose(-1, -2)) * self.scale, dim=-1
            )
        return result, trace

    def attention_rows(
        self, x: torch.Tensor, tokens: torch.Tensor, gate: torch.Tensor
    ) -> AttentionRecord:
        """Attention of the queries `tokens` (q,) over every key: (B, H, q, N) after and before
        dependency pruning. x: this layer's normed input (B, N, C).

        A row depends only on its own query and the keys, not on which other queries are kept,
        so these are the rows the layer used for kept queries, at a fraction of the cost of
        capturing the whole map.
        """
        batch, tokens_total, _ = x.shape
        heads, dim_head = self.heads, self.dim_head
        inner = heads * dim_head
        weight = self.to_qkv.weight
        k = F.linear(x, weight[inner : 2 * inner]).view(batch, tokens_total, heads, dim_head)
        index = tokens.to(x.device)[None].expand(batch, -1)
        x_query = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
        q = F.linear(x_query, weight[:inner]).view(batch, -1, heads, dim_head).transpose(1, 2)
        scores = self._scores(q, k.transpose(1, 2), index)
        ratio = torch.sigmoid(self.thresh_for_kv(q)) * torch.sigmoid(gate)
        pruned = prune_dependencies(scores, ratio, keep_before=True)
        return AttentionRecord(pruned.weights / pruned.normaliser, pruned.before)

    def _scores(self, q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """Q K^T / sqrt(D) + position bias for the kept queries: (b, H, n, N)."""
        batch, heads, n, dim_head = q.shape
        tokens = k.shape[2]
        bias = self.position_bias()
        q = q.reshape(batch * heads, n, dim_head)
        keys = k.reshape(batch * heads, tokens, dim_head).transpose(1, 2)
        if batch == 1 and n == tokens:  # nothing pruned: the shared bias is the start
            scores = torch.baddbmm(bias, q, keys, alpha=self.scale)
        else:  # the gathered rows are a fresh copy: accumulate into them in place
            rows = (
                bias.index_select(1, query_index[0])
                if batch == 1
                else bias.index_select(1, query_index.reshape(-1))
                .view(heads, batch, n, tokens)
                .transpose(0, 1)
                .reshape(batch * heads, n, tokens)
            )
            rows = rows.to(q.dtype)  # under autocast; out= is not autocast
            out = None if torch.is_grad_enabled() else rows  # out= has no autograd
            scores = torch.baddbmm(rows, q, keys, alpha=self.scale, out=out)
        return scores.view(batch, heads, n, tokens)

    def _all_queries(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = F.linear(x, self.to_qkv.weight[: self.heads * self.dim_head])
        return q.view(batch, tokens, self.heads, self.dim_head).transpose(1, 2)


def _query_rows_to_grid(query_index: torch.Tensor, query_valid: torch.Tensor, tokens: int):
    """A function taking (B, H, n, ...) per kept query to (B, H, N, ...), zeros elsewhere."""

    def to_grid(values: torch.Tensor) -> torch.Tensor:
        moved = values.transpose(1, 2)
        return scatter_queries(moved, query_index, query_valid, tokens).transpose(1, 2)

    return to_grid


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class LayerSizes:
    """One transformer layer's sizes: heads, head width, MLP width, softmax scale."""

    heads: int
    dim_head: int
    mlp: int
    scale: float


class Transformer(nn.Module):
    """Pre-norm layers: x += Attn(LN(x)); x += FFN(LN(x)); each layer with its own sizes."""

    def __init__(self, dim: int, layers: Sequence[LayerSizes], grid: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(
                        dim,
                        PruningAttention(dim, s.heads, s.dim_head, grid, dropout, s.scale),
                    ),
                    PreNorm(dim, FeedForward(dim, s.mlp, dropout)),
                ]
            )
            for s in layers
        )


class PatchTokens(nn.Module):
    """(B, C, h, w) feature map to (B, h*w, C) tokens, patch size 1 (row-major token order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


@dataclass
class FirstLayer:
    """Layer 1's attention output for every token at one gate (see first_layer_all)."""

    gate: float
    update: torch.Tensor  # (B, N, C)
    kept_per_query: torch.Tensor  # (B, H, N)

    def tensors(self) -> list[torch.Tensor]:
        return [self.update, self.kept_per_query]


@dataclass
class TransformerOutput:
    features: torch.Tensor  # (B, C, h, w)
    traces: list[LayerTrace]
    first_layer_reused: bool = False


class PruningTransformer(nn.Module):
    """trans4 of the release: pruning head, token embedding and the pruned transformer."""

    def __init__(
        self, channels: int, grid: int, layers: Sequence[LayerSizes], dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.grid = grid
        self.pred_class = nn.Conv2d(channels, 2, kernel_size=1)
        self.to_patch_embedding = nn.Sequential(PatchTokens(), nn.Linear(channels, channels))
        self.dropout = nn.Dropout(dropout)
        self.transformer = Transformer(channels, layers, grid, dropout)

    @property
    def attention_layers(self) -> list[PruningAttention]:
        return [attn.fn for attn, _ in self.transformer.layers]

    def stored_gates(self) -> list[float]:
        return [float(layer.gate.detach()) for layer in self.attention_layers]

    def forward(
        self,
        x4: torch.Tensor,
        keep: torch.Tensor,
        gates: torch.Tensor,
        capture: bool = False,
        content_attention: bool = False,
        first_layer: FirstLayer | None = None,
        keep_inputs: bool = False,
    ) -> TransformerOutput:
        """keep: (B, N) bool kept queries; gates: (depth,) gate per layer.

        first_layer: layer 1's output for every token at gates[0], from `first_layer_all`;
        used instead of recomputing layer 1 when its gate matches and nothing is captured.
        keep_inputs: keep each layer's normed input in its trace (for attention_rows).
        """
        batch, channels, height, width = x4.shape
        query_index, query_valid = kept_query_index(keep)
        tokens = self.embed(x4)
        reuse_first = (
            first_layer is not None
            and first_layer.gate == float(gates[0])
            and not (capture or content_attention)
        )
        traces = []
        for depth, ((attn, ffn), gate) in enumerate(
            zip(self.transformer.layers, gates, strict=True)
        ):
            layer_input = attn.norm(tokens) if keep_inputs else None
            if depth == 0 and reuse_first:
                tokens = tokens + first_layer.update * keep[..., None]
                trace = LayerTrace(kept_per_query=first_layer.kept_per_query * keep[:, None, :])
            elif query_index.shape[1] > 0:
                update, trace = attn.fn(
                    attn.norm(tokens), query_index, query_valid, gate, capture, content_attention
                )
                tokens = tokens + update
            else:
                shape = (batch, attn.fn.heads, keep.shape[1])
                trace = LayerTrace(torch.zeros(shape, dtype=torch.int32, device=keep.device))
            tokens = tokens + ffn.fn(ffn.norm(tokens))
            trace.layer_input = layer_input
            traces.append(trace)
        features = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return TransformerOutput(features, traces, reuse_first)

    def embed(self, x4: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.to_patch_embedding(x4))

    def first_layer_all(self, x4: torch.Tensor, gate: float) -> FirstLayer:
        """Layer 1's attention output for every token. It depends on the encoder features and
        the gate only, not on which tokens are kept, so a threshold change can reuse it."""
        tokens = self.embed(x4)
        keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        query_index, query_valid = kept_query_index(keep)
        attn = self.transformer.layers[0][0]
        gate_tensor = torch.tensor(gate, dtype=tokens.dtype, device=tokens.device)
        update, trace = attn.fn(attn.norm(tokens), query_index, query_valid, gate_tensor)
        return FirstLayer(float(gate), update, trace.kept_per_query)


def scatter_queries(
    values: torch.Tensor, query_index: torch.Tensor, query_valid: torch.Tensor, tokens: int
) -> torch.Tensor:
    """(B, n, ...) rows of kept queries to (B, N, ...) with zeros for pruned tokens.

    Padding rows go to a spare row N that is dropped, so no two writes share an index.
    """
    rows = torch.where(query_valid, query_index, tokens)
    rows = rows.view(*rows.shape, *([1] * (values.dim() - 2))).expand_as(values)
    full = values.new_zeros(values.shape[0], tokens + 1, *values.shape[2:])
    return full.scatter_(1, rows, values)[:, :tokens]


def kept_query_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool to (B, n) indices of kept tokens in order, padded, and the (B, n) valid mask."""
    counts = keep.sum(dim=1)
    n = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=keep.device)[None, :] < counts[:, None]
    return order * valid, valid
