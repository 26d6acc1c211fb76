"""Token schedules: ToMe's constant r per block, and pruning then merging in one block."""

from __future__ import annotations

import pytest
import torch
from helpers import ours, vit_macs
from transformers import ViTConfig

import dynavit
from dynavit.config import ConfigError, ExecConfig, Space, resolve
from dynavit.cost import total_macs
from dynavit.knobs import tokens
from dynavit.sweep.space import load_space, preset

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=64,
             patch_size=16, num_labels=10)


@pytest.fixture(scope="module")
def small():
    return dynavit.from_config(ViTConfig(**SMALL))


def mlp_token_counts(dm, x: torch.Tensor, cfg: ExecConfig) -> list[int]:
    """Tokens (CLS included) entering each block's MLP, seen by forward hooks."""
    seen: list[int] = []
    hooks = [b.mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
             for b in dm.module.blocks]
    try:
        ours(dm, x, cfg)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("method", ["merge", "prune", "prune+merge"])
def test_constant_r_removes_r_tokens_at_every_block(small, method):
    x = torch.randn(2, 3, 64, 64)  # 16 patches
    cfg = ExecConfig(token_method=method, token_r=3)
    assert all(b.token_op == method for b in resolve(cfg, small.space).blocks)  # no token_layers: every block
    assert mlp_token_counts(small, x, cfg) == [14, 11, 8, 5]  # 16 -> 13 -> 10 -> 7 -> 4 patches
    listed = ExecConfig(token_method=method, token_r=3, token_layers=(1, 3))
    assert mlp_token_counts(small, x, listed) == [17, 14, 14, 11]
    # at 96 x 96 (36 patches) the same r still removes 3 per block
    assert mlp_token_counts(small, torch.randn(1, 3, 96, 96), cfg) == [34, 31, 28, 25]


@pytest.mark.parametrize("method", ["merge", "prune", "prune+merge"])
def test_r_is_capped_at_half_the_patch_tokens(small, method):
    x = torch.randn(2, 3, 64, 64)
    # r=6: 16 -> 10 -> 5 (cap 5) -> 3 (cap 2) -> 2 (cap 1); r=100: every block halves
    assert mlp_token_counts(small, x, ExecConfig(token_method=method, token_r=6)) == [11, 6, 4, 3]
    assert mlp_token_counts(small, x, ExecConfig(token_method=method, token_r=100)) == [9, 5, 3, 2]
    assert tokens.removal(16, method, r=100) == {"prune": (8, 0), "merge": (0, 8), "prune+merge": (4, 4)}[method]
    assert tokens.removal(7, method, r=5) == {"prune": (3, 0), "merge": (0, 3), "prune+merge": (2, 1)}[method]


def test_keep_rate_counts_are_unchanged():
    # the keep-rate rule the forward always had: remove n - ceil(keep * n), merging at most half
    assert tokens.removal(196, "prune", keep=0.7) == (196 - 138, 0)
    assert tokens.removal(196, "merge", keep=0.9) == (0, 196 - 177)
    assert tokens.removal(16, "prune", keep=0.1) == (14, 0)
    assert tokens.removal(16, "prune+merge", keep=0.5) == (4, 4)


def test_merge_r_equals_the_matching_keep_rate(small):
    """One merging block: keep 0.5 of 16 patches and r = 8 are the same ToMe step."""
    x = torch.randn(3, 3, 64, 64)
    by_keep = ours(small, x, ExecConfig(token_method="merge", token_keep=0.5, token_layers=(1,)))
    by_r = ours(small, x, ExecConfig(token_method="merge", token_r=8, token_layers=(1,)))
    assert torch.equal(by_keep, by_r)
    prune_keep = ours(small, x, ExecConfig(token_keep=0.75, token_layers=(2,), token_fuse=True))
    prune_r = ours(small, x, ExecConfig(token_r=4, token_layers=(2,), token_fuse=True))
    assert torch.equal(prune_keep, prune_r)


@pytest.mark.parametrize(("cfg", "counts", "merged"), [
    (ExecConfig(token_method="merge", token_r=3), [14, 11, 8, 5], None),
    (ExecConfig(token_method="prune", token_r=3), [14, 11, 8, 5], None),
    (ExecConfig(token_method="prune", token_r=3, token_fuse=True), [15, 13, 11, 9], None),
    # prune 2 then merge 1 per block: the matching sees the tokens left after pruning
    (ExecConfig(token_method="prune+merge", token_r=3), [14, 11, 8, 5], [15, 12, 9, 6]),
    (ExecConfig(token_method="prune+merge", token_r=6, token_layers=(0, 2)), [11, 11, 6, 6], [14, 14, 8, 8]),
])
def test_profiler_macs_follow_the_token_counts(small, cfg, counts, merged):
    x = torch.randn(1, 3, 64, 64)
    assert mlp_token_counts(small, x, cfg) == counts
    assert total_macs(small.module, lambda: small(x)) == vit_macs(small, cfg, 64, 64, counts, merged)


def test_prune_then_merge_drops_the_least_attended_then_keeps_mass():
    torch.manual_seed(0)
    x, keys = torch.randn(2, 17, 8), torch.randn(2, 2, 17, 4)
    scores = torch.rand(2, 16)
    out, st = tokens.reduce(x, "prune+merge", scores, keys, (4, 3), False, tokens.TokenState())
    assert out.shape == (2, 1 + 16 - 4 - 3, 8)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS untouched, first
    kept = scores.topk(12, dim=1).indices
    for b in range(2):  # merging conserves the size-weighted sum of exactly the 12 most attended patches
        want = x[b, 0] + x[b, 1:][kept[b]].sum(0)
        assert torch.allclose((out[b] * st.size[b]).sum(0), want, atol=1e-5)
    assert torch.equal(st.size.sum(1), torch.full((2, 1), 13.0))


def test_prune_carries_token_sizes_of_earlier_merges():
    x = torch.randn(1, 5, 3)
    st = tokens.TokenState(size=torch.tensor([[[1.0], [2.0], [1.0], [4.0], [1.0]]]))
    scores = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    out, st2, _ = tokens.prune(x, scores, 2, False, st)
    assert torch.equal(out, x[:, [0, 3, 2]]) and st2.size.flatten().tolist() == [1.0, 4.0, 1.0]
    fused, st3, _ = tokens.prune(x, scores, 2, True, st)
    assert fused.shape == (1, 4, 3) and st3.size.flatten().tolist() == [1.0, 4.0, 1.0, 3.0]


def test_hybrid_runs_batched_like_single_images(small):
    x = torch.randn(3, 3, 64, 64)
    cfg = ExecConfig(token_method="prune+merge", token_r=4)
    batch = ours(small, x, cfg)
    singles = torch.cat([ours(small, x[i:i + 1], cfg) for i in range(3)])
    assert torch.isfinite(batch).all() and torch.allclose(batch, singles, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batch, ours(small, x, ExecConfig(token_method="merge", token_r=4)))


@pytest.mark.parametrize(("cfg", "needle"), [
    (dict(token_r=-1), "token_r=-1 is outside 0.."),
    (dict(token_r=2.5), "token_r=2.5 must be a whole number"),
    (dict(token_r=True), "token_r=True must be a whole number"),
    (dict(token_r="4"), "token_r='4' must be a whole number"),
    (dict(token_r=4, token_keep=0.8), "token_r=4 cannot be combined with token_keep=0.8"),
    (dict(token_r=4, token_threshold=0.9), "token_r=4 cannot be combined"),
    (dict(token_method="zip"), "token_method='zip' must be one of prune, merge, prune+merge"),
    (dict(token_method="prune+merge", token_keep=0.4), "token_keep=0.4 is outside [0.5, 1]"),
    (dict(token_method="prune+merge", token_r=2, token_fuse=True), "token_fuse=True works with token_method='prune'"),
])
def test_bad_schedules_name_field_value_and_range(small, cfg, needle):
    with pytest.raises(ConfigError) as e:
        small.configure(ExecConfig(**cfg))
    assert needle in str(e.value)


def test_token_r_needs_a_cls_token():
    swin = Space(family="swin", num_blocks=2, heads=(1, 1), head_dim=(8, 8), mlp_hidden=(32, 32))
    with pytest.raises(ConfigError, match="token knobs need a CLS-token model"):
        resolve(ExecConfig(token_r=2), swin)


def test_json_round_trip_and_default():
    cfg = ExecConfig(token_method="prune+merge", token_r=14, token_layers=(0, 1, 2))
    assert ExecConfig.from_json(cfg.to_json()) == cfg
    assert ExecConfig.from_dict({"token_r": 14.0}).token_r == 14  # JSON may write 14 as 14.0
    assert ExecConfig().to_dict() == {} and ExecConfig(token_r=0).is_default


def test_prefix_key_tells_r_apart(small):
    a = resolve(ExecConfig(token_method="merge", token_r=2), small.space)
    b = resolve(ExecConfig(token_method="merge", token_r=3), small.space)
    assert small.module.prefix_key(a, 1) != small.module.prefix_key(b, 1)
    assert small.module.prefix_key(a, 0) == small.module.prefix_key(b, 0)


def test_default_sweep_space_explores_constant_r(small):
    levels = preset("default", small.space)["tokens"]
    assert {"token_method": "merge", "token_r": 8} in levels
    assert any(lv.get("token_method") == "prune+merge" for lv in levels)
    space = load_space("default", small.space)
    tok = next(k for k in space.knobs if k.name == "tokens")
    assert any(lv.get("token_r") for lv in tok.levels)
    assert not any(lv.get("token_r") for lv in preset("small", small.space)["tokens"])  # the quick look stays small


def _merge_alone(x: torch.Tensor, keys: torch.Tensor, theta: float) -> torch.Tensor:
    """One image through ``merge_similar`` by itself: its tokens, no padding."""
    out, state = tokens.merge_similar(x, keys, theta, tokens.TokenState())
    assert state.valid is None
    return out[0]


def test_merge_similar_merges_per_image_and_pads_at_the_end():
    torch.manual_seed(0)
    n, c = 17, 8  # CLS + 16 patches: A = CLS + 8 patches (even positions), B = 8 (odd)
    plain = torch.randn(1, n, c)
    twins = plain.clone()
    twins[0, 2:n:2] = twins[0, 1:n - 1:2]  # every A patch duplicates the B token before it
    x = torch.cat([twins, plain])
    keys = x.unsqueeze(1)  # (B, H=1, N, d): keys equal to the tokens
    out, state = tokens.merge_similar(x, keys, 0.999, tokens.TokenState())
    counts = state.valid.sum(1).tolist()
    assert counts == [n - 8, n]  # the twins image merged its 8 duplicate pairs, the plain one none
    assert out.shape[1] == n and not state.valid[0, n - 8:].any()  # padding is at the end
    for i in range(2):  # batched = alone, and size-weighted sums (what merging averages) are kept
        assert torch.allclose(out[i, :counts[i]], _merge_alone(x[i:i + 1], keys[i:i + 1], 0.999), atol=1e-6)
        kept = state.valid[i]
        assert state.size[i, kept].sum() == n
        assert torch.allclose((out[i, kept] * state.size[i, kept]).sum(0), x[i].sum(0), atol=1e-5)
    assert torch.equal(out[0, 0], x[0, 0])  # CLS is never merged


def _merged_by_hand(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, theta: float | None, r: int = 0):
    """One image's bipartite merge token by token: A = even positions (CLS first), B = odd; each A token
    joins its most similar B token if the similarity beats ``theta`` (or is among the ``r`` best);
    out: A's unmerged tokens, then all of B, each the size-weighted mean of what it now holds."""
    m = keys.mean(0)
    m = m / m.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = {a: max(b_pos, key=lambda b, a=a: float(m[a] @ m[b])) for a in a_pos[1:]}
    sim = {a: float(m[a] @ m[b]) for a, b in best.items()}
    moved = {a for a in best if sim[a] > theta} if theta is not None else \
        set(sorted(best, key=lambda a: -sim[a])[:r])
    total = {b: (x[b] * size[b], size[b].clone()) for b in b_pos}
    for a in sorted(moved):
        v, s = total[best[a]]
        total[best[a]] = (v + x[a] * size[a], s + size[a])
    rows = [(x[a], size[a]) for a in a_pos if a not in moved] + [(v / s, s) for v, s in total.values()]
    return torch.stack([v for v, _ in rows]), torch.stack([s for _, s in rows])


@pytest.mark.parametrize("theta", [0.3, 0.6, 2.0])
def test_merges_equal_the_algorithm_done_token_by_token(theta):
    g = torch.Generator().manual_seed(3)
    x, keys = torch.randn(1, 23, 6, generator=g), torch.randn(1, 2, 23, 4, generator=g)
    size = torch.randint(1, 4, (1, 23, 1), generator=g).float()
    out, state = tokens.merge_similar(x, keys, theta, tokens.TokenState(size=size))
    want, want_size = _merged_by_hand(x[0], keys[0], size[0], theta)
    assert out.shape[1] == len(want) and torch.allclose(out[0], want, atol=1e-6)
    assert torch.equal(state.size[0], want_size)
    out, state = tokens.merge(x, keys, 5, tokens.TokenState(size=size))  # ToMe's r best pairs
    want, want_size = _merged_by_hand(x[0], keys[0], size[0], None, r=5)
    assert out.shape[1] == 23 - 5 and torch.allclose(out[0], want, atol=1e-6)
    assert torch.equal(state.size[0], want_size)


def test_merge_similar_path_runs_batched_as_one_image_at_a_time(small):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    x[0] = x[0].mean(dim=(1, 2), keepdim=True)  # a flat image: its patches are alike and merge
    cfg = ExecConfig(token_method="merge", token_threshold=0.95, token_threshold_step=0.05)
    plan = resolve(cfg, small.space)
    assert [b.token_op for b in plan.blocks] == ["merge-similar"] * 4  # every block, as ToMe's r
    assert [round(b.similarity, 3) for b in plan.blocks] == [0.95, 0.9, 0.85, 0.8]
    batched = ours(small, x, cfg)
    alone = torch.cat([ours(small, x[i:i + 1], cfg) for i in range(4)])
    assert torch.allclose(batched, alone, atol=1e-5)
    counts = [mlp_token_counts(small, x[i:i + 1], cfg) for i in range(4)]
    assert counts[0][-1] < min(c[-1] for c in counts[1:])  # the flat image keeps fewer tokens
    flat = [total_macs(small.module, lambda i=i: small(x[i:i + 1])) for i in range(2)]
    assert flat[0] < flat[1]
    assert torch.allclose(ours(small, x, ExecConfig(token_method="merge", token_threshold=1.0)),
                          ours(small, x, ExecConfig()), atol=1e-5)  # nothing is more similar than 1


@pytest.mark.parametrize("bad, match", [
    (dict(token_method="prune", token_threshold=0.9, token_threshold_step=0.01), "token_threshold_step"),
    (dict(token_method="merge", token_threshold_step=0.01), "token_threshold_step"),
    (dict(token_method="merge", token_threshold=0.9, token_threshold_step=-0.1), ">= 0"),
    (dict(token_method="prune+merge", token_threshold=0.9), "token_threshold works"),
])
def test_merge_threshold_settings_are_checked(small, bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve(ExecConfig(**bad), small.space)


def test_merge_threshold_step_must_be_a_number():
    with pytest.raises(ConfigError, match="token_threshold_step='x' must be a number >= 0"):
        ExecConfig(token_method="merge", token_threshold=0.9, token_threshold_step="x")


def test_merge_threshold_round_trips_and_cannot_be_exported(small, tmp_path):
    cfg = ExecConfig(token_method="merge", token_threshold=0.9, token_threshold_step=0.01)
    assert ExecConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(dynavit.DynavitError, match="different number of tokens per image"):
        small.export(tmp_path / "m.onnx", cfg)
