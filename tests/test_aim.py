"""AIM (`aim`): the merge and the PageRank importance checked against the authors' worked examples and a
loop-by-loop reference of their code; the pruning's selection against PageRank over the model's own
eager attention; schedules, budgets, errors, and the model-level invariants on every family."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import family_setup

import vtoken
from vtoken.reducers.aim import AIMPrune, merge_passes, merge_tokens
from vtoken.reducers.base import ModelInfo
from vtoken.signals.pagerank import pagerank_importance

X8 = torch.tensor([[1, 0], [0, 1], [1, 1], [2, 0], [0.2, 2], [3, 1], [-1, 1], [1, 2]], dtype=torch.float64)


def reference_merge(x: list[list[float]], r: int) -> tuple[list[list[float]], list[int], list[list[float]]]:
    """One pass of the authors' `token_merge`, loop by loop: A = even, B = odd positions; each A token's
    best B by cosine (first on ties); A sorted by best score (descending, stable); the first r merge
    into their B token as a plain mean with it; output: unmerged A in that order, then B in order.
    Returns the values, the index (into x) of each output's own token, and each output's weights."""
    t = len(x)
    r = min(r, t // 2)
    cos = [[sum(p * q for p, q in zip(x[a], x[b])) / math.sqrt(sum(p * p for p in x[a]) * sum(q * q for q in x[b]))
            for b in range(1, t, 2)] for a in range(0, t, 2)]
    best = [max(range(len(row)), key=lambda j, row=row: (row[j], -j)) for row in cos]
    order = sorted(range(len(cos)), key=lambda i: -cos[i][best[i]])
    merged, unmerged = order[:r], order[r:]
    groups = {j: [2 * j + 1] for j in range(t // 2)}
    for i in merged:
        groups[best[i]].append(2 * i)
    out = [2 * i for i in unmerged] + [2 * j + 1 for j in range(t // 2)]
    members = [[2 * i] for i in unmerged] + [groups[j] for j in range(t // 2)]
    values = [[sum(x[k][c] for k in grp) / len(grp) for c in range(len(x[0]))] for grp in members]
    weights = [[(1 / len(grp) if k in grp else 0.0) for k in range(t)] for grp in members]
    return values, out, weights


def reference_passes(x: torch.Tensor, passes: list[int]):
    vals, own, w = x.tolist(), list(range(len(x))), torch.eye(len(x), dtype=torch.float64)
    for r in passes:
        vals, out, step = reference_merge(vals, r)
        own = [own[i] for i in out]
        w = torch.tensor(step, dtype=torch.float64) @ w
    return torch.tensor(vals, dtype=torch.float64), own, w


def run_merge(x: torch.Tensor, passes: list[int]):
    at, vals, sizes, w = merge_tokens(x[None], torch.ones(1, len(x), dtype=torch.float64), passes, with_weights=True)
    return vals[0], at[0].tolist(), w[0], sizes[0]


def test_merge_reproduces_the_authors_worked_example():
    """The worked example of the authors' merge (their function run on it): 8 tokens in 2-D."""
    vals, own, w, sizes = run_merge(X8, [2])
    expect = [[1, 1], [-1, 1], [0.1, 1.5], [1.5, 0], [3, 1], [1, 2]]
    torch.testing.assert_close(vals, torch.tensor(expect, dtype=torch.float64))
    assert own == [2, 6, 1, 3, 5, 7]  # unmerged A by descending similarity, then B
    assert sizes.tolist() == [1, 1, 2, 2, 1, 1]
    vals, own, _, _ = run_merge(X8, [4])
    torch.testing.assert_close(vals, torch.tensor([[-4 / 15, 4 / 3], [1.5, 0], [3, 1], [1, 1.5]], dtype=torch.float64))
    assert own == [1, 3, 5, 7]
    vals, own, w, sizes = run_merge(X8, [4, 2])  # AIM's two halving passes: a mean of means
    torch.testing.assert_close(vals, torch.tensor([[2.25, 0.5], [11 / 30, 17 / 12]], dtype=torch.float64))
    assert own == [3, 7] and sizes.tolist() == [3, 5]
    torch.testing.assert_close(w @ X8, vals)
    torch.testing.assert_close(w[0], torch.tensor([0.25, 0, 0, 0.25, 0, 0.5, 0, 0], dtype=torch.float64))


PASSES = [(9, [4]), (16, [8, 4]), (15, [7, 4, 2]), (12, [3, 3]), (7, [1, 1, 1]), (20, [10, 5])]


@pytest.mark.parametrize("n,passes", PASSES)
def test_merge_equals_the_loop_reference(n, passes):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    vals, own, w, _ = run_merge(x, passes)
    ref_vals, ref_own, ref_w = reference_passes(x, passes)
    assert own == ref_own
    torch.testing.assert_close(vals, ref_vals)
    torch.testing.assert_close(w, ref_w)


def test_merge_passes_follow_the_authors_counts():
    assert merge_passes(196, 49) == [98, 49]  # LLaVA-OneVision video frames: 25 %
    assert merge_passes(576, 252) == [288, 36]  # LLaVA-1.5 images: the code's 43.75 % default
    assert merge_passes(576, 72) == [288, 144, 72]  # its 12.5 % alternative
    assert merge_passes(196, None) == [98, 49]  # the default: the authors' r = n // 2, then n // 4
    assert merge_passes(729, None) == [364, 182]  # 183 left, as their code leaves (not a 25 % target)
    assert merge_passes(10, 10) == []
    assert merge_passes(576, 0, (288, 36)) == [288, 36]
    assert merge_passes(10, 0, (8, 8)) == [5, 2]  # each pass clamped to half the tokens


def _pagerank_loops(logits: torch.Tensor, rows: list[bool], tau: float, steps: int) -> list[float]:
    h, n, _ = logits.shape
    real = [i for i in range(n) if rows[i]]
    heads = []
    for hh in range(h):
        m = [[0.0] * n for _ in range(n)]
        for i in real:
            keys = [j for j in real if j <= i]
            z = [math.exp(logits[hh, i, j].item() / tau) for j in keys]
            for j, e in zip(keys, z):
                m[i][j] = e / sum(z)
        p = [1 / len(real) if i in real else 0.0 for i in range(n)]
        for _ in range(steps):
            p = [sum(p[i] * m[i][j] for i in range(n)) for j in range(n)]
        heads.append(p)
    return [math.sqrt(sum(hp[j] ** 2 for hp in heads) / h) for j in range(n)]


def test_pagerank_reproduces_the_authors_worked_example():
    """Five tokens, two heads: q rows are the example's logit rows and k the identity (scaling 1)."""
    rows0 = [[0], [.5, .2], [.1, .3, .4], [.2, .1, .5, .3], [.3, .6, .2, .1, .4]]
    rows1 = [[0], [.1, .4], [.6, .2, .1], [.1, .2, .2, .4], [.2, .1, .5, .3, .2]]
    q = torch.zeros(1, 2, 5, 5)
    for h, rows in enumerate((rows0, rows1)):
        for i, row in enumerate(rows):
            q[0, h, i, : len(row)] = torch.tensor(row)
    k = torch.eye(5).expand(1, 2, 5, 5)
    s = pagerank_importance(q, k, torch.ones(1, 5, dtype=torch.bool), 1.0)
    expect = torch.tensor([[0.798791, 0.162925, 0.0605118, 0.0405299, 2.47363e-6]])
    torch.testing.assert_close(s, expect, rtol=1e-4, atol=1e-8)


def test_pagerank_equals_the_loop_reference_with_padding_and_grouped_heads():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 3, generator=g), torch.randn(2, 2, 7, 3, generator=g)
    rows = torch.ones(2, 7, dtype=torch.bool)
    rows[1, :2] = False  # left padding: neither sends nor receives mass
    s = pagerank_importance(q, k, rows, 0.5, tau=0.3, steps=4)
    kk = k.repeat_interleave(2, dim=1)
    for b in range(2):
        logits = (q[b] @ kk[b].transpose(-1, -2)) * 0.5
        ref = _pagerank_loops(logits, rows[b].tolist(), 0.3, 4)
        torch.testing.assert_close(s[b], torch.tensor(ref), rtol=1e-4, atol=1e-7)
    assert torch.all(s[1, :2] == 0)


def _pagerank_from_probs(probs: torch.Tensor, valid: torch.Tensor, tau: float, steps: int) -> torch.Tensor:
    """AIM's importance from a layer's eager attention probabilities softmax(z): softmax(z / tau) is
    p^(1/tau) renormalised per row (float64)."""
    m = probs.double().pow(1 / tau) * valid[:, None, None, :]
    m = (m / m.sum(-1, keepdim=True).clamp_min(1e-300)) * valid[:, None, :, None]
    p = (valid.double() / valid.sum(1, keepdim=True))[:, None, None, :].expand(-1, m.shape[1], 1, -1)
    for _ in range(steps):
        p = p @ m
    return p[:, :, 0].square().mean(1).sqrt()


def test_pruning_keeps_the_pagerank_top_of_the_models_own_attention(llava_eager):
    """The first pruning step's selection equals the top floor(V * rate) visual tokens by PageRank over
    the eager attention probabilities the unpatched model returns for that layer (an independent path
    to the side-path scores: output_attentions instead of captured q / k)."""
    _, inp, _ = family_setup("llava")
    with torch.no_grad():
        att = llava_eager(**inp, output_attentions=True).attentions[1]  # (B, H, L, L), layer 1
    valid = inp["attention_mask"].bool()
    score = _pagerank_from_probs(att, valid, 0.1, 5)
    with vtoken.patch(llava_eager, "aim", merge=False, schedule=((2, 0.5),)) as p, torch.no_grad():
        llava_eager(**inp)
        kept = p.kept_positions()
    image = inp["input_ids"] == 3
    for b in range(2):
        cols = torch.nonzero(image[b]).flatten()
        top = score[b, cols].argsort(descending=True)[:18].sort().values
        assert kept[b].tolist() == top.tolist()


def test_default_schedules_are_the_authors():
    qwen28 = AIMPrune().configured(ModelInfo(family="qwen2_vl", llm_layers=28, llm="qwen2"))[0]
    assert qwen28.schedule == tuple((15 + j, 1 - (j + 1) / 8) for j in range(8))  # layers 15-21 see 7/8..1/8
    llama32 = AIMPrune().configured(ModelInfo(family="llava", llm_layers=32, llm="llama"))[0]
    assert llama32.schedule == tuple((14 + j, 1 - (j + 1) / 8) for j in range(8))  # layers 14-20, none from 21
    assert [llama32.budget(144, layer, 144) for layer in llama32.layers] == [126, 108, 90, 72, 54, 36, 18, 0]


def test_keep_all_is_bit_identical():
    model, inp, _ = family_setup("llava")
    with torch.no_grad():
        ref = model(**inp).logits
        with vtoken.patch(model, "aim", keep=1.0, schedule=((2, 1.0),)):
            assert torch.equal(model(**inp).logits, ref)
        with vtoken.patch(model, "aim", keep=0.25, schedule=((2, 0.5), (3, 0.0))) as p:
            out = model(**inp).logits
            assert p.stats.visual_per_layer == [[9, 9], [9, 9], [4, 4], [0, 0]]
            assert not torch.allclose(out[:, -1], ref[:, -1])
        assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_merge_then_prune_on_qwen_equals_recompute_and_each_sample_alone(kind):
    from vtoken.eval.tiny import QWEN_SPECIAL, qwen_continued, qwen_media_inputs, tiny_qwen

    model = tiny_qwen(kind, vision_layers=3)
    samples = [[(8, 8), (2, 8, 12)], [(3, 8, 8)], []]
    inp = qwen_media_inputs(samples, kind, seed=2)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, "aim", keep=6, schedule=((1, 0.5), (3, 0.0))) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        assert [len(k) for k in p.kept_positions()] == [0] * 6  # rate 0 at layer 3: no visual token left
        with p.prompt(n):
            full = model(**qwen_continued(inp, out.sequences[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=5e-5, rtol=1e-4)


def test_parameters_are_validated():
    with pytest.raises(vtoken.ParameterError, match="not both"):
        vtoken.get("aim")(keep=8, r=(4,))
    with pytest.raises(vtoken.ParameterError, match="at least one"):
        vtoken.get("aim")(merge=False, prune=False)
    with pytest.raises(vtoken.ParameterError, match="merge=False"):
        vtoken.get("aim")(merge=False, keep=8)
    for bad in (((2, 0.5), (2, 0.25)), ((2, 1.5),), ((3, 0.25), (4, 0.5)), "2:0.5", ((0, 0.5),)):
        with pytest.raises(vtoken.ParameterError, match="schedule"):
            vtoken.get("aim")(schedule=bad)
    with pytest.raises(vtoken.ParameterError, match="r must be"):
        vtoken.get("aim")(r=(4, 0))
    model, _, _ = family_setup("llava")
    with pytest.raises(vtoken.BudgetError, match="does not exist"):
        vtoken.patch(model, "aim", schedule=((4, 0.5),))
