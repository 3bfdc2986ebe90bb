"""Issue 12 A4 / B5 / C: every parameter, budget and combination is checked at patch time with a clear
error; a deep copy of a patched model is a patched model that vtoken manages."""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import N_IMG, make_batch, make_prompt, pixels

import vtoken
from vtoken.eval.tiny import tiny_llava
from vtoken.reducers.base import ModelInfo, Reducer, Selection, StageInput


@pytest.fixture(autouse=True)
def _unpatched_llava(llava):
    """A test that fails with a patch left on the shared model must not fail the tests after it."""
    yield
    vtoken.unpatch(llava)


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def one_image():
    return {"input_ids": torch.tensor([make_prompt(1)]), "pixel_values": pixels(1)}


# --- A4: conflicting or ignored budgets, bools as numbers, wrong types, NaN, out of range ----------------------


def test_fastv_keep_and_ratio_are_one_budget(llava):
    with pytest.raises(vtoken.BudgetError, match="not both"):
        vtoken.patch(llava, "fastv", keep=6, ratio=0.3)
    with pytest.raises(vtoken.BudgetError, match="not both"):
        vtoken.patch(llava, "fastv", keep=0.5, ratio=0.3)  # an explicit keep equal to the default too
    with vtoken.patch(llava, "fastv", ratio=0.25) as p:
        assert p.reducers[0].keep == 0.75
        run(llava, **one_image())
        assert p.stats.visual_per_layer[-1] == [27]
    with vtoken.patch(llava, "fastv") as p:
        assert p.reducers[0].keep == 0.5
    assert vtoken.patched(llava) is None


def test_empty_reducer_list_is_refused(llava):
    with pytest.raises(vtoken.ParameterError, match="empty list"):
        vtoken.patch(llava, [])
    with pytest.raises(vtoken.ParameterError, match="empty list"):
        vtoken.patch(llava, ())
    assert vtoken.patched(llava) is None


BAD = [  # (reducer, params, error message fragment): each must fail at patch time
    ("fastv", {"ratio": False}, "ratio must be"),
    ("fastv", {"ratio": float("nan")}, "ratio must be"),
    ("fastv", {"ratio": "0.3"}, "ratio must be"),
    ("fastv", {"ratio": 1.0}, r"ratio must lie in \[0.0, 1.0\)"),
    ("fastv", {"k": True}, "k must be an int"),
    ("fastv", {"k": 2.0}, "k must be an int"),
    ("fastv", {"keep": None}, None),  # keep=None, ratio=None: the default 0.5 (checked below), not an error
    ("hiprune", {"wrap": "yes"}, "wrap must be True or False"),
    ("hiprune", {"wrap": 1}, "wrap must be True or False"),
    ("hiprune", {"alpha": True}, "alpha must be"),
    ("hiprune", {"alpha": float("nan")}, "alpha must be"),
    ("hiprune", {"alpha": 1.5}, "alpha must lie in"),
    ("hiprune", {"object_layer": "8"}, "object_layer must be"),
    ("hiprune", {"keep": None}, "no budget given"),
    ("random", {"seed": "x"}, "seed must be an int"),
    ("random", {"seed": True}, "seed must be an int"),
    ("random", {"seed": 2**64}, "seed must lie in"),
    ("random", {"renumber": "no"}, "renumber must be True or False"),
    ("pool", {"keep": float("inf")}, r"\(0, 1\]"),
    ("visionzip", {"dominant": True}, "dominant must be"),
    ("visionzip", {"dominant": -1}, "dominant must lie in"),
    ("visionzip", {"keep": 8, "dominant": 9}, "dominant <= 8"),
    ("visionzip", {"keep": 0.25, "dominant": 10}, "dominant <= 9"),  # 0.25 of the 36 tokens
    ("visionzip", {"vision_layer": 0.5}, "vision_layer must be an int"),
    ("divprune", {"keep": "8"}, "keep must be an int"),
    ("todre", {"tau": float("nan")}, "tau must be"),
    ("todre", {"tau": True}, "tau must be"),
    ("todre", {"tau": 2.0}, "tau must lie in"),
    ("todre", {"selection": "greedy"}, "selection must be one of 'kcenter', 'maxsum'"),
    ("todre", {"pivot": 0}, "pivot must be one of"),
    ("todre", {"stage1": "yes"}, "stage1 must be True or False"),
    ("todre", {"check_layer": True}, "check_layer must be"),
    ("todre", {"stage1": False, "keep": 8}, "stage1=False"),
    ("todre", {"stage1": False, "selection": "maxsum"}, "would be ignored"),
    ("todre", {"stage2": False, "tau": 0.3}, "would be ignored"),
    ("todre", {"stage2": False, "check_layer": 1}, "would be ignored"),
    ("todre", {"pivot": "cls", "seed": 3}, "seed=3 would be ignored"),
    ("todre_relevance", {"keep": 8}, "takes no budget"),
    ("transprune", {"schedule": "bad"}, "sequence of \\(layer, ratio\\) pairs"),
    ("transprune", {"schedule": [(1, "a")]}, "ratios must be numbers"),
    ("transprune", {"schedule": [(1.5, 0.5)]}, "layers must be ints"),
    ("transprune", {"schedule": [(1, 0.5, 2)]}, "not a pair"),
    ("transprune", {"schedule": [(1, True)]}, "ratios must be numbers"),
    ("transprune", {"iga": "no"}, "iga must be True or False"),
    ("transprune", {"accumulate_from": -1}, "accumulate_from must lie in"),
    ("transprune", {"keep": 37}, "keep <= 36"),
    ("none", {"renumber": 1}, "renumber must be True or False"),
]


@pytest.mark.parametrize("name,params,match", BAD, ids=[f"{n}-{p}" for n, p, _ in BAD])
def test_bad_parameters_fail_at_patch_time(llava, name, params, match):
    if match is None:
        with vtoken.patch(llava, name, **params) as p:
            assert p.reducers[0].keep == 0.5
        return
    with pytest.raises(vtoken.VTokenError, match=match):
        vtoken.patch(llava, name, **params)
    assert vtoken.patched(llava) is None


def test_numpy_numbers_are_accepted_and_converted(llava):
    with vtoken.patch(llava, "random", keep=np.int64(8), seed=np.int64(3)) as p:
        r = p.reducers[0]
        assert type(r.keep) is int and type(r.seed) is int and r.keep == 8
        run(llava, **one_image())
        assert p.stats.visual_tokens == [8]
    with vtoken.patch(llava, "hiprune", keep=8, alpha=np.float32(0.5)) as p:
        assert type(p.reducers[0].alpha) is float


@dataclass
class Scaled(Reducer):
    """A third-party reducer: its simple annotated fields are checked like the built-ins'."""

    stage: ClassVar[str] = "boundary"
    keep: int | float | None = 8
    weight: float = 1.0
    flip: bool = False
    mode: str = "a"

    def select(self, x: StageInput) -> Selection:
        return Selection(keep=x.valid.clone())


def test_third_party_reducer_fields_are_type_checked():
    for bad in ({"weight": True}, {"weight": float("nan")}, {"flip": "no"}, {"mode": 3}, {"keep": None}):
        with pytest.raises(vtoken.VTokenError):
            Scaled(**bad)
    assert Scaled(weight=2).weight == 2.0


# --- B5: copy.deepcopy of a patched model ------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("random", {"keep": 6}), ("fastv", {"keep": 5}),
                                         ("tome", {"r": 6, "vtu": "exact"})])
def test_deepcopy_of_patched_model_is_a_managed_patched_model(name, params):
    model = tiny_llava(seed=3)
    x = one_image()
    plain = run(model, **x).logits
    p = vtoken.patch(model, name, **params)
    reduced = run(model, **x).logits
    twin = copy.deepcopy(model)
    q = vtoken.patched(twin)
    assert q is not None and q is not p and q.active
    assert q.adapter is not p.adapter and q.adapter.model is twin
    # the copy is reduced like the original, with its own statistics
    torch.testing.assert_close(run(twin, **x).logits, reduced, rtol=0, atol=0)
    assert q.stats.visual_per_layer[-1] == p.stats.visual_per_layer[-1]
    other = {"input_ids": make_batch([make_prompt(1, seed=7), make_prompt(1, seed=8)])["input_ids"],
             "pixel_values": pixels(2, seed=9)}
    run(twin, **other)
    assert len(q.stats.visual_tokens) == 2 and len(p.stats.visual_tokens) == 1  # the original's state untouched
    with pytest.raises(vtoken.AlreadyPatchedError):
        vtoken.patch(twin, "pool", keep=4)
    assert vtoken.unpatch(twin) is True and vtoken.patched(twin) is None
    assert torch.equal(run(twin, **x).logits, plain)  # bit-identical to the unpatched model
    torch.testing.assert_close(run(model, **x).logits, reduced, rtol=0, atol=0)  # original still patched
    assert vtoken.patched(model) is p
    with vtoken.patch(twin, "random", keep=4) as r:  # patching the copy again works (no stacked hooks)
        run(twin, **x)
        assert r.stats.visual_tokens == [4]
    p.remove()
    assert torch.equal(run(model, **x).logits, plain)


def test_deepcopy_of_handle_and_model_together():
    model = tiny_llava(seed=3)
    p = vtoken.patch(model, "random", keep=6)
    twin_model, twin_patch = copy.deepcopy((model, p))
    assert twin_patch is vtoken.patched(twin_model) and twin_patch is not p
    with p.prompt([5, 6, 7]):  # a copy made inside a prompt block is outside it
        twin = copy.deepcopy(model)
    assert vtoken.patched(twin).runtime.prompt_end is None
    run(twin, **make_batch([make_prompt(1), make_prompt(1, seed=2)]), pixel_values=pixels(2))
    p.remove()
    assert copy.deepcopy(p) is p  # a removed handle has nothing to copy


@pytest.mark.parametrize("name,params", [("fastv", {"keep": 5}), ("tome", {"r": 6, "vtu": "exact"})])
def test_dropped_patched_model_is_freed(name, params):
    model = tiny_llava(seed=3)
    ref = weakref.ref(model)
    vtoken.patch(model, name, **params)
    del model
    gc.collect()
    assert ref() is None


def test_patching_inside_a_patched_model_is_refused(llava):
    with vtoken.patch(llava, "random", keep=4), pytest.raises(vtoken.AlreadyPatchedError, match="part of a patched"):
        vtoken.patch(llava.model.language_model, "random", keep=4)


# --- C: clear errors at patch time ------------------------------------------------------------------------


@pytest.mark.parametrize("names,match", [
    (["fastv", "fastv"], "same layer"),
    (["fastv", "transprune"], "transprune removes tokens"),
    (["random", "pool"], "pool reads each image's whole token grid"),
    (["divprune", "hiprune"], "hiprune reads each image's whole token grid"),
    (["tome", "visionzip"], "encoder merging"),
])
def test_conflicting_compositions_fail_at_patch_time(llava, names, match):
    with pytest.raises(vtoken.ParameterError, match=match):
        vtoken.patch(llava, names)
    assert vtoken.patched(llava) is None


@pytest.mark.parametrize("spec,params", [
    (["pool", "random"], {"pool": {"keep": 16}, "random": {"keep": 8}}),
    (["none", "pool"], {"pool": {"keep": 16}}),
    # fastv k=2 reads layer 1's attention, taken after fastv k=1 reduced before layer 1: consistent
    ([vtoken.get("fastv")(keep=0.5, k=1), vtoken.get("fastv")(keep=0.5, k=2)], {}),
], ids=["pool-random", "none-pool", "fastv1-fastv2"])
def test_compatible_compositions_still_work(llava, spec, params):
    with vtoken.patch(llava, spec, **params) as p:
        run(llava, **one_image())
        assert p.stats.visual_per_layer[-1][0] < N_IMG


def test_unpatch_and_patched_reject_non_modules(llava):
    for fn in (vtoken.unpatch, vtoken.patched, vtoken.patch):
        with pytest.raises(vtoken.UnsupportedModelError, match=r"expects a torch\.nn\.Module"):
            fn("str")
    with vtoken.patch(llava, "random", keep=4) as p, pytest.raises(vtoken.UnsupportedModelError, match="remove"):
        vtoken.unpatch(p)
    with pytest.raises(vtoken.ParameterError, match="an instance"):
        vtoken.patch(llava, vtoken.get("random"))


def test_prompt_lengths_are_validated(llava):
    batch = make_batch([make_prompt(1, seed=1), make_prompt(1, seed=2)])
    px = pixels(2)
    with vtoken.patch(llava, "fastv", keep=6) as p:
        for bad in (0, -5, True, 2.5, "3", [], [4, 0]):
            with pytest.raises(vtoken.ParameterError, match="prompt length"), p.prompt(bad):
                pass
        with p.prompt([40, 41, 42]), pytest.raises(vtoken.LayoutError, match="batch of 2"):
            run(llava, **batch, pixel_values=px)
        with p.prompt([40, 41]):
            run(llava, **batch, pixel_values=px)
        with p.prompt(torch.tensor([40, 41])):
            run(llava, **batch, pixel_values=px)
        run(llava, **batch, pixel_values=px)  # the check is gone after the block
        assert p.stats.visual_per_layer[-1] == [6, 6]


def test_transprune_keep_everything_and_keep_too_large(llava):
    plain = run(llava, **one_image()).logits
    for keep in (1.0, N_IMG):
        with vtoken.patch(llava, "transprune", keep=keep) as p:
            out = run(llava, **one_image()).logits
            assert all(v == [N_IMG] for v in p.stats.visual_per_layer)
        torch.testing.assert_close(out, plain)
    with vtoken.patch(llava, "transprune", keep=0.7) as p:  # earlier steps never keep fewer than keep
        run(llava, **one_image())
        assert p.stats.visual_per_layer[-1] == [25]
    with pytest.raises(vtoken.BudgetError, match=r"use keep <= 36, or a fraction"):
        vtoken.patch(llava, "transprune", keep=37)


# --- declared, not module-named: which selections the stage re-checks, per-backbone defaults --------------
def test_a_selection_that_breaks_its_budget_is_refused(llava):
    """A reducer whose own `select` is not declared tested (a third-party one, or a subclass of a
    built-in that overrides `select`) is checked to keep exactly its budget."""
    @vtoken.register("_keeps_everything")
    @dataclass
    class KeepsEverything(vtoken.get("random")):
        def select(self, x):
            return Selection(keep=x.valid.clone())

    ids, px = torch.tensor([make_prompt(1, text=4)]), pixels(1)
    with vtoken.patch(llava, "_keeps_everything", keep=3), pytest.raises(vtoken.VTokenError, match="budget is"):
        llava(input_ids=ids, pixel_values=px)
    with vtoken.patch(llava, "random", keep=3) as p:  # the built-in's own select: tested, not re-checked
        llava(input_ids=ids, pixel_values=px)
    assert p.stats.visual_tokens == [3]


def test_hiprune_object_layer_follows_the_declared_tower():
    clip = vtoken.get("hiprune")()
    clip.configure(ModelInfo(family="anything", llm_layers=2, vision_layers=24))
    qwen = vtoken.get("hiprune")()
    qwen.configure(ModelInfo(family="anything", llm_layers=2, vision_layers=32, tower="qwen-vit"))
    assert (clip.object_layer, qwen.object_layer) == (8, 15)  # layer 9 of 24; the middle block of 32


def test_a_patch_configures_new_frozen_reducers(llava):
    """`configured` returns new reducers: the one given to patch() keeps its unresolved defaults, and
    the patch's own cannot be changed behind its back (that would desynchronise its hooks)."""
    mine = vtoken.get("todre")(keep=4)
    with vtoken.patch(llava, mine) as p:
        stage1, stage2 = p.runtime.reducers
        assert (mine.pivot, stage1.pivot) == ("auto", "cls") and stage2.check_layer is not None
        with pytest.raises(vtoken.ParameterError, match="frozen"):
            stage1.keep = 8
    mine.keep = 8  # the caller's instance stays an ordinary, modifiable reducer
    assert mine.keep == 8


def test_internal_steps_are_not_listed_and_copies_of_patch_reducers_are_modifiable(llava):
    with vtoken.patch(llava, "tome", r=2) as p:
        assert [r.name for r in p.reducers] == ["tome"]  # the boundary step it adds is vtoken's own
        assert all(line.strip().startswith(("vtoken patch", "tome")) for line in p.describe().splitlines())
        variant = copy.copy(p.reducers[0])
        variant.r = 3  # a copy is a new, modifiable reducer; the patch's own stays frozen
        with pytest.raises(vtoken.ParameterError, match="frozen"):
            p.reducers[0].r = 3


def test_random_draws_follow_the_seed_when_a_reducer_is_reused(llava):
    """The caller's reducer shares its score cache with the patch's copy: a new seed must not reuse it."""
    ids, px = torch.tensor([make_prompt(1, text=4)]), pixels(1)
    mine = vtoken.get("random")(keep=3, seed=0)
    kept = []
    for seed in (0, 1):
        mine.seed = seed
        with vtoken.patch(llava, mine) as p:
            llava(input_ids=ids, pixel_values=px)
            kept.append(p.runtime.last_layout.index[0].tolist())
    fresh = vtoken.get("random")(keep=3, seed=1)
    with vtoken.patch(llava, fresh) as p:
        llava(input_ids=ids, pixel_values=px)
        assert p.runtime.last_layout.index[0].tolist() == kept[1] != kept[0]
