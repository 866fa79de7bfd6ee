"""APFormer's adaptive pruning grafted onto MobileUtr's transformer stage (the 32 x 32-token
stage of a 256 x 256 input; the LGL stage keeps its 2 x 2 token sampling and is not pruned).

Query-wise: a query token the pruning head calls background skips the attention branch of
every block (its update is exactly 0; the position convolution, the residual and the MLP
still apply), and only kept queries enter Q K^T, the softmax, A V and the output projection.
Dependency-wise: each block has APFormer's ratio layer (`thresh_for_kv`, shared by the heads)
and gate, and drops each kept query's weak links. The pruning itself is APFormer's code
(`model.apformer.attention`), imported, not copied.

Shapes: B batch, N tokens, C width, h heads, d = C / h, n kept queries (padded to the
largest n of the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_apformer.model.apformer.attention import (
    DEFAULT_GATE,
    AttentionRecord,
    LayerTrace,
    kept_query_index,
    prune_dependencies,
    scatter_queries,
)
from napari_apformer.model.mobileutr.blocks import SCORES_PER_CHUNK, GlobalSparseAttn, LGLBlock
from napari_apformer.model.mobileutr.flops import conv_flops, linear_flops


class PrunedGlobalAttn(GlobalSparseAttn):
    """The transformer stage's attention (GlobalSparseAttn with `sample` 1) with APFormer's
    query-wise and dependency-wise pruning. Its parameters keep the release's names, plus
    APFormer's `thresh_for_kv` (Linear(d -> 1), no bias) and `gate` (one scalar, not learned)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads, 1)
        self.thresh_for_kv = nn.Linear(dim // heads, 1, bias=False)
        self.gate = nn.Parameter(torch.tensor(DEFAULT_GATE), requires_grad=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, q, d) queries of tokens x (B, q, C)."""
        width = x.shape[-1]
        q = F.linear(x, self.qkv.weight[:width], self.qkv.bias[:width])
        return q.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, N, d) keys and values of every token."""
        width = x.shape[-1]
        kv = F.linear(x, self.qkv.weight[width:], self.qkv.bias[width:])
        kv = kv.unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def ratio(self, q: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """APFormer's r = sigmoid(w . q) sigmoid(g), (B, h, q, 1)."""
        return torch.sigmoid(self.thresh_for_kv(q)) * torch.sigmoid(gate)

    def pruned(
        self,
        x: torch.Tensor,
        query_index: torch.Tensor,
        query_valid: torch.Tensor,
        gate: torch.Tensor,
        content_attention: bool = False,
    ) -> tuple[torch.Tensor, LayerTrace]:
        """The attention update of normed tokens x (B, N, C) for the kept queries, scattered
        to (B, N, C) with zeros elsewhere, and the layer's trace (kept dependencies per
        query; with content_attention, softmax(Q K^T / sqrt(d)) of every query, for SSA)."""
        batch, tokens, width = x.shape
        n = query_index.shape[1]
        k, v = self.keys_values(x)
        x_kept = torch.gather(x, 1, query_index[..., None].expand(-1, -1, width))
        q = self.queries(x_kept)
        ratio = self.ratio(q, gate)
        # Queries go in chunks, as the unpruned stage does, so that a large slice never holds
        # h n N scores at once; each row is pruned on its own, so chunks change nothing.
        chunk = max(1, SCORES_PER_CHUNK // (batch * self.heads * tokens))
        outs, kept = [], []
        for lo in range(0, n, chunk):
            scores = torch.matmul(q[:, :, lo : lo + chunk], k.transpose(-2, -1)) * self.scale
            pruned = prune_dependencies(scores, ratio[:, :, lo : lo + chunk])
            outs.append(torch.matmul(pruned.weights, v) / pruned.normaliser)
            kept.append(pruned.kept_per_query)
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(batch, n, width)
        update = scatter_queries(self.proj(out), query_index, query_valid, tokens)
        kept_rows = scatter_queries(
            torch.cat(kept, dim=2).transpose(1, 2), query_index, query_valid, tokens
        )
        trace = LayerTrace(kept_per_query=kept_rows.transpose(1, 2))
        if content_attention:
            q_all = self.queries(x)
            trace.content_attention = torch.softmax(
                torch.matmul(q_all, k.transpose(-2, -1)) * self.scale, dim=-1
            )
        return update, trace

    def attention_rows(
        self, x: torch.Tensor, tokens: torch.Tensor, gate: torch.Tensor
    ) -> AttentionRecord:
        """(B, h, q, N) attention of the queries `tokens` (q,) after and before dependency
        pruning, from the normed tokens x (B, N, C) the block saw. A row depends on its own
        query and the keys only, so these are the rows the block used."""
        k, _ = self.keys_values(x)
        index = tokens.to(x.device)[None, :, None].expand(x.shape[0], -1, x.shape[-1])
        q = self.queries(torch.gather(x, 1, index))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        pruned = prune_dependencies(scores, self.ratio(q, gate), keep_before=True)
        return AttentionRecord(pruned.weights / pruned.normaliser, pruned.before)


def graft(block: LGLBlock) -> None:
    """Give a transformer-stage block (sample 1) the pruning attention, keeping its weights."""
    old = block.SelfAttn.attn
    new = PrunedGlobalAttn(old.proj.in_features, old.heads)
    new.qkv, new.proj = old.qkv, old.proj
    block.SelfAttn.attn = new


def run_stage(
    blocks: nn.ModuleList,
    y: torch.Tensor,
    keep: torch.Tensor,
    gates: torch.Tensor,
    keep_inputs: bool = False,
    content_attention: bool = False,
) -> tuple[torch.Tensor, list[LayerTrace]]:
    """The transformer stage on the feature map y (B, C, rows, cols) with the kept queries
    `keep` (B, N) and one gate per block `gates` (depth,). Each block, as in MobileUtr:
    y + DW3(y), then t + Attn(LN(t)) (kept queries only), t + MLP(LN(t)).

    keep_inputs: each block's normed tokens go into its trace (for query attention)."""
    query_index, query_valid = kept_query_index(keep)
    traces = []
    for block, gate in zip(blocks, gates, strict=True):
        sa = block.SelfAttn
        y = y + sa.pos_embed(y)
        rows, cols = y.shape[-2:]
        t = y.flatten(2).transpose(1, 2)
        normed = sa.norm1(t)
        if query_index.shape[1] > 0:
            update, trace = sa.attn.pruned(
                normed, query_index, query_valid, gate, content_attention
            )
            t = t + sa.drop_path(update)
        else:  # every query pruned: no attention at all
            shape = (keep.shape[0], sa.attn.heads, keep.shape[1])
            trace = LayerTrace(torch.zeros(shape, dtype=torch.int32, device=keep.device))
            if content_attention:
                q, (k, _) = sa.attn.queries(normed), sa.attn.keys_values(normed)
                trace.content_attention = torch.softmax(
                    torch.matmul(q, k.transpose(-2, -1)) * sa.attn.scale, dim=-1
                )
        t = t + sa.drop_path(sa.mlp(sa.norm2(t)))
        trace.layer_input = normed if keep_inputs else None
        traces.append(trace)
        y = t.transpose(1, 2).unflatten(2, (rows, cols))
    return y, traces


def block_flops(block: LGLBlock, rows: int, cols: int, kept: int) -> int:
    """One pruned transformer block on a rows x cols map with `kept` kept queries, as torch's
    FLOP counter counts it (2 per multiply-add). Dependency pruning zeroes weights but A'V
    stays dense, so it saves nothing here."""
    sa = block.SelfAttn
    attn = sa.attn
    tokens, width = rows * cols, attn.proj.in_features
    total = conv_flops(sa.pos_embed, rows, cols)
    total += linear_flops(sa.mlp.fc1, tokens) + linear_flops(sa.mlp.fc2, tokens)
    if kept:
        total += 2 * tokens * width * 2 * width  # keys and values of every token
        total += 2 * kept * width * width  # queries of kept tokens
        total += 2 * kept * width  # the ratio w . q, every head (h d = C)
        total += 2 * 2 * kept * tokens * width  # Q K^T and A' V, every head
        total += linear_flops(attn.proj, kept)
    return total
