"""Fixed-budget reducers run without host syncs or data-dependent shapes: their selection traces into
one graph (`torch.compile(fullgraph=True)`, eager backend so no compiler is needed)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.reducers.base import ModelInfo, StageInput

INFO = ModelInfo("llava", llm_layers=8, vision_layers=4, feature_layer=2, vision_tokens=16)
GRAPH_SAFE = [("random", {"keep": 5}), ("pool", {"keep": 4}), ("fastv", {"keep": 5}), ("hiprune", {"keep": 6}),
              ("visionzip", {"keep": 6}), ("divprune", {"keep": 5}), ("todre_diversity", {"keep": 5}),
              ("transprune", {"keep": 3})]
NOT_GRAPH_SAFE = ["todre_relevance (all-or-nothing: the count depends on the attention)",
                  "dymu (threshold merging: the count depends on the image)"]


def stage_input(reducer) -> StageInput:
    g = torch.Generator().manual_seed(0)
    n_img, n, d = 2, 16, 8
    signals = {}
    for req in reducer.signals():
        shape = (n_img, n, 8) if req.kind in ("vision_keys", "vision_features") else (n_img, n)
        signals[req] = torch.rand(*shape, generator=g)
    layer = reducer.layers[0] if reducer.layers else None
    return StageInput(features=torch.randn(n_img, n, d, generator=g), valid=torch.ones(n_img, n, dtype=torch.bool),
                      positions=torch.arange(n).expand(n_img, n), sizes=torch.ones(n_img, n), grids=[(4, 4)] * 2,
                      keep=[reducer.budget(n, layer, n)] * n_img, layer=layer, counts=[n] * n_img,
                      project=torch.nn.Identity(), _signal=lambda req: signals[req])


@pytest.mark.parametrize("name,params", GRAPH_SAFE)
def test_selection_traces_into_one_graph(name, params):
    reducer = vtoken.get(name)(**params)
    reducer.configure(INFO)
    x = stage_input(reducer)
    eager = reducer.select(x)
    torch._dynamo.reset()
    compiled = torch.compile(reducer.select, fullgraph=True, backend="eager")(x)
    assert torch.equal(compiled.keep, eager.keep)
    assert compiled.keep.sum(1).tolist() == x.keep


@pytest.mark.parametrize("name,params", [("tome", {"r": 3}), ("pitome", {"ratio": 0.8})])
def test_merge_plans_trace_into_one_graph(name, params):
    reducer = vtoken.get(name)(**params)
    reducer.configure(INFO)
    metric = torch.randn(2, 17, 8, generator=torch.Generator().manual_seed(1))
    eager = reducer.plan(0, metric, [17, 17])
    torch._dynamo.reset()
    compiled = torch.compile(reducer.plan, fullgraph=True, backend="eager")(0, metric, [17, 17])
    assert torch.equal(compiled.dest, eager.dest) and compiled.counts == eager.counts


def test_adaptive_reducers_are_declared():
    assert vtoken.get("todre_relevance").adaptive and vtoken.get("dymu").adaptive
    assert not any(vtoken.get(n).adaptive for n, _ in GRAPH_SAFE)
