"""Token reduction for CLS-token transformers: prune (EViT), merge (ToMe), adaptive threshold.

All three run between a block's attention and its MLP and physically shrink the sequence
(gather / merge), so the MLP and every later block do less work. Masking is not skipping.

The state that travels with the tokens is a ``TokenState``:
- ``size`` (merge only): how many original patches each token stands for; attention adds
  ``log(size)`` to the keys' logits (ToMe's proportional attention) through SDPA's mask.
- ``valid`` (per-image thresholds only): images of one batch keep different numbers of
  tokens; the batch is padded to the largest count and padded keys get ``-inf``. This is
  the padding strategy (not bucketing): one kernel per layer for the whole batch, paying
  for the padded rows in the MLP. ``docs/results.md`` measures its cost.

How many go (``removal``, the one rule the forward, the MAC tests and the benchmarks share): a
block that sees n patch tokens removes t = n - ceil(rho * n) of them (``token_keep`` rho), or
t = min(r, n // 2) (``token_r``: ToMe's constant r, capped at half the patch tokens, the most a
bipartite matching can merge; the same cap for every method, so a schedule's token counts do not
depend on the method). "prune+merge" prunes ceil(t / 2) and then merges t // 2 of what is left:
pruning removes what the CLS token ignores (background), merging then folds together the
redundant ones among what it attends to, and neither has to go as far as it would alone.

Math:
- prune: CLS attention a_j = mean_h softmax(q_cls k^T / sqrt(d))_j over patch tokens j;
  drop the t least attended; ``fuse`` adds one token sum_j w_j x_j over the dropped
  tokens with w = a / sum(a) (EViT's inattentive-token fusion).
- merge: split patch tokens alternately into sets A and B, match each a in A to its most
  similar b in B by cosine similarity of the keys (mean over heads), merge the r best pairs
  by size-weighted average; CLS is never merged (ToMe's bipartite soft matching).
- threshold: per image, keep the fewest tokens (by CLS attention) whose cumulative
  attention reaches tau.
- merge-similar: ToMe's matching, but per image every pair whose similarity exceeds the block's
  threshold merges (ATM, Lee & Choi 2025, without its size-aware matching): a cluttered image keeps
  more tokens than a plain one at the same threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class TokenState:
    size: torch.Tensor | None = None  # (B, N, 1) patches per token, merge only
    valid: torch.Tensor | None = None  # (B, N) bool, adaptive threshold only

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive SDPA mask (B, 1, 1, N) for proportional attention and/or padding."""
        bias = None
        if self.size is not None:
            bias = self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)
        if self.valid is not None:
            pad = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
            pad = pad.masked_fill(~self.valid, float("-inf"))[:, None, None, :]
            bias = pad if bias is None else bias + pad
        return bias


def cls_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, N-1): CLS token's attention to each patch token, mean over heads."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1).mean(1)[:, 0, 1:]


def removal(n: int, method: str, keep: float = 1.0, r: int = 0) -> tuple[int, int]:
    """(pruned, merged) patch tokens of a block that sees ``n`` of them (see the module docstring)."""
    t = min(r, n // 2) if r else n - max(1, math.ceil(keep * n - 1e-9))
    if method == "prune":
        return t, 0
    if method == "merge":
        return 0, min(t, n // 2)
    pruned = t - t // 2
    return pruned, min(t // 2, (n - pruned) // 2)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """CLS plus the patch tokens at ``idx`` (B, k) of ``t`` (B, 1 + n, C)."""
    kept = t[:, 1:].gather(1, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))
    return torch.cat([t[:, :1], kept], dim=1)


def prune(x: torch.Tensor, scores: torch.Tensor, drop: int, fuse: bool, state: TokenState | None = None,
          metric: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenState, torch.Tensor | None]:
    """Drop the ``drop`` patch tokens with the lowest ``scores`` (+1 fused token); CLS stays first.

    ``state``'s token sizes and a merge ``metric`` (B, 1 + n, d) are cut to the kept tokens alike.
    """
    state = state or TokenState()
    n = x.shape[1] - 1
    if drop <= 0:
        return x, state, metric
    idx = scores.topk(n - drop, dim=1).indices  # (B, k), most attended first
    out = _take(x, idx)
    size = None if state.size is None else _take(state.size, idx)
    if fuse:
        dropped_w = scores.scatter(1, idx, 0.0)  # zero the kept ones
        w = dropped_w / dropped_w.sum(1, keepdim=True).clamp_min(1e-12)
        out = torch.cat([out, w.unsqueeze(1) @ x[:, 1:]], dim=1)  # (B, 1, C) appended
        if size is not None:  # the fused token stands for every patch it folds in
            size = torch.cat([size, state.size.sum(1, keepdim=True) - size.sum(1, keepdim=True)], dim=1)
    return out, TokenState(size=size), None if metric is None else _take(metric, idx)


def best_match(keys: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite matching: for each token of A (even positions), its most similar token of B
    (odd positions) by cosine similarity of the keys (mean over heads). Returns (similarity, index in B),
    each (B, nA); CLS (index 0, in A) and tokens ``valid`` marks False never match (-inf).

    ``keys``: (B, H, N, d), or their mean over heads (B, N, d).
    """
    metric = keys.mean(1) if keys.dim() == 4 else keys
    metric = metric / metric.norm(dim=-1, keepdim=True)
    sim = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if valid is not None:
        sim = sim.masked_fill(~valid[:, ::2, None] | ~valid[:, None, 1::2], float("-inf"))
    sim[:, 0, :] = float("-inf")
    return sim.max(dim=-1)


def merge(x: torch.Tensor, keys: torch.Tensor, r: int, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """ToMe bipartite soft matching: merge the ``r`` most similar token pairs (r <= n // 2 of n patches).

    ``keys``: (B, H, 1 + n, d), or their mean over heads (B, 1 + n, d).
    """
    b, n1, _ = x.shape
    r = min(r, (n1 - 1) // 2)
    if r <= 0:
        return x, state
    best, best_idx = best_match(keys)
    order = best.argsort(dim=-1, descending=True)
    unmerged = order[:, r:].sort(dim=-1).values  # keeps CLS first
    src = order[:, :r]
    dst = best_idx.gather(1, src)
    nb = n1 - best.shape[1]
    base = torch.arange(b, device=x.device)[:, None] * n1
    every_b = torch.arange(nb, device=x.device).expand(b, nb)
    kept = torch.cat([2 * unmerged, 2 * every_b + 1], dim=1) + base  # A's unmerged, then all of B
    x, size = _fold(x, state.size, (2 * src + base).flatten(), (2 * dst + 1 + base).flatten(), kept.flatten())
    return x, TokenState(size=size)


def _fold(x: torch.Tensor, size: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor, kept: torch.Tensor,
          moves: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the tokens at flat positions ``src`` into those at ``dst`` (size-weighted), then take ``kept``.

    Positions index the batch flattened to (B * N, C): a few row-wise ops per block instead of
    gathers over expanded (B, N, C) indices, which cost more at batch 1, where a merge in every
    block of a path is a large part of its time (docs/results.md, token paths at batch 1).
    ``moves`` (0 or 1 per ``src``) masks which of them merge, so the same ops run whatever an image
    merges, as lowering (``accel.lower.lower_mean``) needs. Returns (x, size), each
    (B, len(kept) / B, ...): a token standing for several patches is their size-weighted mean.
    """
    b, n1, c = x.shape
    flat = (x if size is None else x * size).reshape(b * n1, c)
    sizes = torch.ones(b * n1, 1, dtype=x.dtype, device=x.device) if size is None else size.reshape(b * n1, 1)
    moved, moved_size = flat.index_select(0, src), sizes.index_select(0, src)
    if moves is not None:
        moved, moved_size = moved * moves, moved_size * moves
    flat = flat.scatter_add(0, dst[:, None].expand(-1, c), moved)  # not index_add: ONNX exports it as a
    sizes = sizes.scatter_add(0, dst[:, None], moved_size)  # scatter that overwrites repeated rows
    size = sizes.index_select(0, kept).view(b, -1, 1)
    return flat.index_select(0, kept).view(b, -1, c) / size, size


def reduce(x: torch.Tensor, method: str, scores: torch.Tensor | None, keys: torch.Tensor | None,
           counts: tuple[int, int], fuse: bool, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """One block's fixed-count reduction: prune ``counts[0]`` tokens, then merge ``counts[1]`` pairs."""
    pruned, merged = counts
    metric = None if keys is None else keys.mean(1)
    if method != "merge":
        x, state, metric = prune(x, scores, pruned, fuse, state, metric)
    if method != "prune":
        x, state = merge(x, metric, merged, state)
    return x, state


def threshold(x: torch.Tensor, scores: torch.Tensor, tau: float, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """Per image: the fewest tokens whose cumulative CLS attention reaches ``tau``; pad to the max."""
    b, n1, c = x.shape
    if state.valid is not None:
        scores = scores.masked_fill(~state.valid[:, 1:], 0.0)
    norm = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
    sorted_s, order = norm.sort(dim=1, descending=True)
    counts = (sorted_s.cumsum(1) < tau).sum(1) + 1  # tokens needed per image
    if state.valid is not None:
        counts = torch.minimum(counts, state.valid[:, 1:].sum(1))
    k = int(counts.max())
    kept = x[:, 1:].gather(1, order[:, :k].unsqueeze(-1).expand(b, k, c))
    valid = torch.arange(k + 1, device=x.device)[None, :] <= counts[:, None]  # CLS + counts[i] tokens
    return torch.cat([x[:, :1], kept], dim=1), TokenState(valid=None if bool(valid.all()) else valid)


def merge_similar(x: torch.Tensor, keys: torch.Tensor, theta: float, state: TokenState
                  ) -> tuple[torch.Tensor, TokenState]:
    """Per image, merge every bipartite pair whose key cosine similarity exceeds ``theta``.

    Images of a batch merge different numbers of pairs. Each image's tokens stay first, in the
    order the image alone would have them (the bipartite split is by position, so a batched image
    computes what it computes alone); the batch is padded at the end to the longest. Padded tokens
    never match (their similarity is -inf) and carry nothing into a merge.
    """
    b, n1, _ = x.shape
    best, dst = best_match(keys, state.valid)
    moves = best > theta  # (B, nA): this A token merges into its dst in B
    na, dev = moves.shape[1], x.device
    base = torch.arange(b, device=dev)[:, None] * n1
    keep_a = ~moves if state.valid is None else state.valid[:, ::2] & ~moves
    keep = torch.cat([keep_a, torch.ones(b, n1 - na, dtype=torch.bool, device=dev)
                      if state.valid is None else state.valid[:, 1::2]], dim=1)  # A's kept, then B's
    every_a = torch.arange(0, n1, 2, device=dev)
    pos = torch.cat([every_a, torch.arange(1, n1, 2, device=dev)])
    if b == 1:
        kept, valid = pos[keep[0]], None
    else:
        order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :int(keep.sum(1).max())]  # kept first
        kept = (pos[order] + base).flatten()
        valid = keep.gather(1, order)
        valid = None if bool(valid.all()) else valid
    x, size = _fold(x, state.size, (every_a + base).flatten(), (2 * dst + 1 + base).flatten(), kept,
                    moves.reshape(-1, 1).to(x.dtype))
    return x, TokenState(size=size, valid=valid)


@contextmanager
def recording_cls_attention(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the CLS attention (B, N-1) of every attention layer that runs, in order, with its graph.

    For SaiT's token-selection distillation; ``model`` must have attention modules with a
    ``record`` slot (dynavit's ViT family).
    """
    layers = [m for m in model.modules() if hasattr(m, "record") and hasattr(m, "qkv_parts")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no CLS-token attention to record")
    found: list[torch.Tensor] = []
    for m in layers:
        m.record = found
    try:
        yield found
    finally:
        for m in layers:
            m.record = None


__all__ = ["TokenState", "best_match", "cls_attention", "merge", "merge_similar", "prune", "recording_cls_attention",
           "reduce", "removal", "threshold"]
