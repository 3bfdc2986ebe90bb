"""Graph-safe (static) prefill (issue 14): no graph break or host read added by vtoken, compiled ==
eager, static layouts == exact layouts, and a batch that breaks the static promise is refused."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import family_setup, make_batch, make_prompt, pixels

import vtoken
import vtoken.adapters
from vtoken.eval.tiny import tiny_llava

# reducers whose LLaVA prefill compiles whole: the fixed-budget ones (aim: its merge and its pruning
# schedule fix every count); tome / pitome merge in the tower
# with a schedule that fixes each image's count; todre's stage 2 keeps all or none of an image by its
# attention ratios, on the device (what it drops becomes padding). DyMU decides its counts from the
# content in the tower: it keeps the exact, host-read layout
STATIC = {
    "random": {"keep": 16}, "pool": {"keep": 16}, "fastv": {"keep": 16}, "hiprune": {"keep": 16},
    "visionzip": {"keep": 16}, "divprune": {"keep": 16}, "transprune": {},
    "todre": {"keep": 16}, "todre_stage1": {"keep": 16, "stage2": False}, "tome": {"r": 3}, "pitome": {"keep": 12},
    "aim": {"keep": 16, "schedule": ((2, 0.5), (3, 0.25))},
}


def _patch(model, name):
    return vtoken.patch(model, name.split("_")[0], **STATIC[name])
ROOTS = tuple(str(Path(m.__file__).resolve().parent) for m in (vtoken, vtoken.adapters))


def _explain(model: torch.nn.Module, inp: dict) -> int:
    """Graph breaks of a warm model: transformers installs its output-capturing hooks on the first call
    (a one-time break whose count depends on the hooks already present), so one eager call runs first."""
    with torch.no_grad():
        model(**inp)
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(**inp).graph_break_count


@pytest.fixture(scope="module")
def unpatched_breaks() -> int:
    model, inp, _ = family_setup("llava")
    return _explain(model.eval(), inp)


@pytest.mark.parametrize("name", ["random", "hiprune", "fastv", "visionzip", "tome", "pitome", "todre", "aim"])
def test_patched_llava_has_the_unpatched_graph_breaks(name, unpatched_breaks):
    model, inp, _ = family_setup("llava")
    with _patch(model.eval(), name):
        assert _explain(model, inp) == unpatched_breaks


def test_exact_layout_breaks_the_graph_where_the_static_one_does_not(unpatched_breaks):
    """The test above can fail: forcing the host-read layout under tracing adds breaks."""
    model, inp, _ = family_setup("llava")
    with vtoken.patch(model.eval(), "random", keep=16) as h:
        h.static_layout = False
        assert _explain(model, inp) > unpatched_breaks


class _HostReads:
    """Counts host reads (.item, .tolist, .cpu, bool(), nonzero, ...) made from vtoken's own code."""

    names = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __enter__(self) -> _HostReads:
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        def wrapper(t, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ROOTS):
                self.calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return fn(t, *a, **k)

        return wrapper

    def __exit__(self, *exc) -> None:
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_prefill_reads_nothing_back_and_equals_the_exact_layout(name):
    model, inp, _ = family_setup("llava")
    model.eval()
    with _patch(model, name) as h, torch.no_grad():
        exact = model(**inp).logits
        exact_counts = h.stats.tokens_per_layer
        h.static_layout = True
        with _HostReads() as reads:
            static = model(**inp).logits
        assert reads.calls == []
        torch.testing.assert_close(static, exact, rtol=1e-5, atol=1e-5)
        assert h.stats.tokens_per_layer == exact_counts  # counted when read, from the device lengths
        with _HostReads() as reads:  # the check above can fail: the exact layout reads the mask back
            model(**inp)
            h.static_layout = False
            model(**inp)
        assert reads.calls


def _todre_taus(model, inp) -> dict[str, float]:
    """Stage-2 thresholds that make the exact layout drop every image, one sample's images only, or none
    (found from the exact layout's counts, so the test does not hang on one model's attention values)."""
    found: dict[str, float] = {}
    for tau in torch.linspace(0.0, 1.0, 51).tolist():
        with vtoken.patch(model, "todre", keep=16, tau=tau) as h, torch.no_grad():
            model(**inp)
            last = h.stats.visual_per_layer[-1]
        kind = "none" if all(last) else "all" if not any(last) else "ragged"
        found.setdefault(kind, tau)
    assert set(found) == {"none", "ragged", "all"}, f"no threshold splits this batch: {found}"
    return found


def test_static_todre_stage2_pads_what_it_drops_and_equals_the_exact_layout():
    """ToDRE's stage 2 keeps all or none of an image's visual tokens by its attention ratios. In a static
    layout its counts stay on the device and the rows it drops become masked padding: no host read,
    the exact layout's logits and token counts, and greedy generation (cached decoding over the
    padded cache) gives the exact layout's tokens, whether it drops every image, some or none."""
    model, inp, sup = family_setup("llava")
    model.eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=sup)
    for kind, tau in _todre_taus(model, inp).items():
        with vtoken.patch(model, "todre", keep=16, tau=tau) as h, torch.no_grad():
            exact = model(**inp).logits
            counts = h.stats.visual_per_layer
            tokens = model.generate(**inp, **kw)
            h.static_layout = True
            with _HostReads() as reads:
                static = model(**inp).logits
            assert reads.calls == [], kind
            assert h.layout.static and h.layout.count_t is not None
            torch.testing.assert_close(static, exact, rtol=1e-5, atol=1e-5)
            assert h.stats.visual_per_layer == counts
            assert torch.equal(model.generate(**inp, **kw), tokens), kind


def test_static_layout_is_not_taken_when_a_reducer_acts_after_a_device_counted_one():
    """A device-counted reducer (ToDRE's stage 2) leaves its counts on the device: a reducer after it
    would need them on the host, so such a pipeline keeps the exact (host-read) layout, as DyMU does."""
    model, inp, _ = family_setup("llava")
    model.eval()
    parts = [vtoken.get("todre_relevance")(check_layer=0), vtoken.get("fastv")(keep=8, k=2)]
    with vtoken.patch(model, parts) as h, torch.no_grad():
        assert not h.adapter.counts_fixed()
        exact = model(**inp).logits
        h.static_layout = True
        torch.testing.assert_close(model(**inp).logits, exact, rtol=1e-5, atol=1e-5)
        assert not h.layout.static


@pytest.mark.parametrize("side", ["left", "right"])
def test_static_layout_pads_ragged_prompts_with_masks(side):
    """Samples of different lengths (padding) and several images per sample: static == exact, and
    == each sample alone."""
    model = tiny_llava(seed=0).eval()
    prompts = [make_prompt(2, text=3, seed=1), make_prompt(2, text=9, seed=2)]
    inp = make_batch(prompts, side)
    inp["pixel_values"] = pixels(4, seed=3)
    with vtoken.patch(model, "hiprune", keep=10) as h, torch.no_grad():
        exact = model(**inp).logits
        h.static_layout = True
        static = model(**inp).logits
        assert h.layout.static
        for b, ids in enumerate(prompts):
            alone = model(input_ids=torch.tensor([ids]), pixel_values=inp["pixel_values"][2 * b:2 * b + 2]).logits[0]
            cols = inp["attention_mask"][b].bool()
            torch.testing.assert_close(static[b, cols], alone, rtol=1e-4, atol=1e-4)
    cols = inp["attention_mask"].bool()
    torch.testing.assert_close(static[cols], exact[cols], rtol=1e-5, atol=1e-5)


def _refused_when_static(model: torch.nn.Module, inp: dict, match: str) -> None:
    """The exact layout handles the batch; the static one refuses it with a vtoken message."""
    with vtoken.patch(model, "random", keep=8) as h, torch.no_grad():
        model(**inp)
        h.static_layout = True
        with pytest.raises(RuntimeError, match=match):
            model(**inp)


def test_static_layout_refuses_a_batch_with_unequal_image_counts():
    inp = make_batch([make_prompt(2, seed=1), make_prompt(0, text=80, seed=2)])
    inp["pixel_values"] = pixels(2)
    _refused_when_static(tiny_llava(seed=0).eval(), inp, "every sample must hold 1 image")


def test_compiled_equals_eager_with_inductor():
    model, inp, _ = family_setup("llava")
    model.eval()
    with vtoken.patch(model, "random", keep=16) as h, torch.no_grad():
        eager = model(**inp).logits
        counts = h.stats.tokens_per_layer
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for _ in range(2):  # the second call replays the compiled graphs
            out = compiled(**inp).logits
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
            assert h.stats.tokens_per_layer == counts
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["hiprune", "fastv", "visionzip"])
def test_compiled_equals_eager(name):
    """dynamo's graphs (aot_eager: traced and functionalised, not code-generated) give the eager result."""
    model, inp, _ = family_setup("llava")
    model.eval()
    with vtoken.patch(model, name, **STATIC[name]) as h, torch.no_grad():
        eager = model(**inp).logits
        counts = h.stats.tokens_per_layer
        torch._dynamo.reset()
        out = torch.compile(model, backend="aot_eager")(**inp).logits
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        assert h.stats.tokens_per_layer == counts
    torch._dynamo.reset()


def test_static_layout_switch_is_validated():
    model = tiny_llava(seed=0)
    with vtoken.patch(model, "random", keep=8) as h, pytest.raises(vtoken.ParameterError, match="static_layout"):
        h.static_layout = "yes"


def test_static_prefill_generate_equals_exact():
    model, inp, sup = family_setup("llava")
    model.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, suppress_tokens=sup)
    with vtoken.patch(model, "fastv", keep=16) as h, torch.no_grad():
        exact = model.generate(**inp, **kw)
        flops = h.stats.flops
        h.static_layout = True
        static = model.generate(**inp, **kw)
        assert torch.equal(static, exact)
        assert h.stats.flops == flops



def test_compiled_graphs_of_an_unpatched_twin_are_not_replayed_for_the_patched_model():
    """torch.compile does not guard on module hooks by default, so the graphs traced for an unpatched
    model of the same class (or for this model before the patch) would be replayed for the patched
    one, without vtoken's hooks; vtoken turns the hook guards on when it patches."""
    model, inp, _ = family_setup("llava")
    model.eval()
    twin = copy.deepcopy(model)
    compiled, twin_c = torch.compile(model, backend="aot_eager"), torch.compile(twin, backend="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        plain = compiled(**inp).logits
        for name, kw in (("random", {"keep": 8}), ("fastv", {"keep": 4})):
            with vtoken.patch(model, name, **kw) as h:
                assert torch.equal(twin_c(**inp).logits, plain)  # the twin is traced with the patch on
                torch.testing.assert_close(compiled(**inp).logits, model(**inp).logits, rtol=1e-5, atol=1e-5)
                assert h.stats.visual_tokens == [kw["keep"] if name == "random" else 36] * 2
        assert torch.equal(compiled(**inp).logits, plain)
    torch._dynamo.reset()


QWEN = ["qwen2_vl", "qwen2_5_vl"]


def _qwen(family: str, sizes=((8, 12), (8, 12))):
    from vtoken.eval.tiny import qwen_inputs, tiny_qwen

    return tiny_qwen(family).eval(), qwen_inputs([[s] for s in sizes], seed=1)


_UNPATCHED: dict[str, int] = {}


def _qwen_unpatched(family: str) -> int:
    """The unpatched tiny Qwen's graph breaks (warm), measured once per family for this module."""
    if family not in _UNPATCHED:
        _UNPATCHED[family] = _explain(*_qwen(family))
    return _UNPATCHED[family]


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("name", ["random", "fastv", "todre"])
def test_patched_qwen_has_the_unpatched_graph_breaks(family, name):
    """Qwen's images vary in size, so its static layout is asked for (`static_layout = True`); the
    batch's images then share one size."""
    unpatched = _qwen_unpatched(family)
    model, inp = _qwen(family)
    with vtoken.patch(model, name, keep=8) as h:
        h.static_layout = True
        assert _explain(model, inp) == unpatched
        if name == "random":  # the check can fail: the host-read layout breaks the graph
            h.static_layout = False
            assert _explain(model, inp) > unpatched
    torch._dynamo.reset()


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("name", ["random", "fastv", "divprune", "todre"])
def test_static_qwen_prefill_reads_nothing_back_and_equals_the_exact_layout(family, name):
    model, inp = _qwen(family)
    with vtoken.patch(model, name, keep=8) as h, torch.no_grad():
        exact = model(**inp).logits
        counts, flops = h.stats.tokens_per_layer, h.stats.flops
        h.static_layout = True
        with _HostReads() as reads:
            static = model(**inp).logits
        assert reads.calls == []
        assert h.layout.static
        torch.testing.assert_close(static, exact, rtol=1e-5, atol=1e-5)
        assert h.stats.tokens_per_layer == counts
        got = h.stats.flops
        # ToDRE's side path takes its query rows up to a host bound, which a static layout cannot
        # tighten by reading the prompt's lengths: more q k^T rows (honestly counted), the same model FLOPs
        assert got["reducer"] >= flops["reducer"]
        assert {k: v for k, v in got.items() if k not in ("reducer", "total")} == \
            {k: v for k, v in flops.items() if k not in ("reducer", "total")}


def test_static_qwen_refuses_images_of_different_sizes():
    _refused_when_static(*_qwen("qwen2_vl", sizes=((8, 12), (8, 8))), "vtoken static")


def test_static_qwen_grid_reducers_need_the_grid_declared():
    """HiPrune reads each image's rows and columns, which only image_grid_thw's values give: a forced
    static layout without a declared grid is refused (not silently laid out by host reads), and a
    declared grid that does not fit the batch is refused before anything runs."""
    model, inp = _qwen("qwen2_vl")
    with vtoken.patch(model, "hiprune", keep=8) as h, torch.no_grad():
        h.static_layout = True
        with pytest.raises(vtoken.ParameterError, match=r"static_grid = \(rows, cols\)"):
            model(**inp)
        h.static_grid = (6, 6)
        with pytest.raises(vtoken.ParameterError, match="gives 36 LLM tokens per image"):
            model(**inp)
        for bad in ((4,), (0, 6), (4.0, 6), "4x6"):
            with pytest.raises(vtoken.ParameterError, match="static_grid must be"):
                h.static_grid = bad
    with vtoken.patch(tiny_llava(seed=0), "random", keep=8) as h, pytest.raises(vtoken.ParameterError,
                                                                                   match="leave it None"):
        h.static_grid = (24, 24)


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("name", ["pool", "hiprune", "visionzip"])
def test_static_qwen_with_a_declared_grid_reads_nothing_back(family, name):
    """Grid reducers and vision-tower signals (HiPrune, VisionZip) with `static_grid` declared: no host
    read, the exact layout's logits, token counts and FLOPs (Qwen2.5-VL's window order planned once)."""
    model, inp = _qwen(family)
    with vtoken.patch(model, name, keep=8) as h, torch.no_grad():
        exact = model(**inp).logits
        counts, flops = h.stats.tokens_per_layer, h.stats.flops
        h.static_layout, h.static_grid = True, (4, 6)  # image_grid_thw (1, 8, 12): 4 x 6 LLM tokens
        with _HostReads() as reads:
            static = model(**inp).logits
        assert reads.calls == []
        assert h.layout.static
        assert torch.equal(static, exact)
        assert h.stats.tokens_per_layer == counts and h.stats.flops == flops


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("name", ["pool", "hiprune", "visionzip"])
def test_static_qwen_with_a_declared_grid_has_the_unpatched_graph_breaks(family, name):
    """Grid reducers and vision-tower signals compile like the unpatched model on Qwen with a declared
    grid: the capture hooks are alike on every vision block (a hook on some blocks only, or one that
    differs by a per-layer constant, retraces the tower's attention and meets transformers' own
    `lengths.tolist()` break once more) and the merger hook runs no tensor op (dynamo compiles it as a
    graph of its own)."""
    unpatched = _qwen_unpatched(family)
    model, inp = _qwen(family)
    with vtoken.patch(model, name, keep=8) as h:
        h.static_layout, h.static_grid = True, (4, 6)
        assert _explain(model, inp) == unpatched
    torch._dynamo.reset()


def test_static_qwen_declared_grid_is_checked_on_the_device():
    """A batch whose image_grid_thw differs from the declared grid (same token count) is refused."""
    model, inp = _qwen("qwen2_vl")
    with vtoken.patch(model, "pool", keep=8) as h, torch.no_grad():
        h.static_layout, h.static_grid = True, (6, 4)
        with pytest.raises(RuntimeError, match="declared static_grid"):
            model(**inp)


@pytest.mark.parametrize("name", ["random", "fastv"])
def test_static_cache_generate_equals_the_dynamic_cache(name):
    """generate(cache_implementation="static") would hand the model a prepared 4-D mask; while patched
    the model keeps the 2-D one (an instance attribute, removed with the patch)."""
    model, inp, sup = family_setup("llava")
    model.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, suppress_tokens=sup)
    with torch.no_grad():
        unpatched = model.generate(**inp, cache_implementation="static", **kw)
        with vtoken.patch(model, name, keep=16) as h:
            assert "create_masks_for_generate" in model.__dict__
            dynamic = model.generate(**inp, **kw)
            for static_layout in (False, True):
                h.static_layout = static_layout
                assert torch.equal(model.generate(**inp, cache_implementation="static", **kw), dynamic)
        assert "create_masks_for_generate" not in model.__dict__
        assert torch.equal(model.generate(**inp, cache_implementation="static", **kw), unpatched)


def test_compiled_forward_with_a_static_cache_generates_what_eager_does():
    model, inp, sup = family_setup("llava")
    model.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, suppress_tokens=sup, cache_implementation="static")
    with vtoken.patch(model, "fastv", keep=16) as h, torch.no_grad():
        eager = model.generate(**inp, **kw)
        flops = h.stats.flops
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="aot_eager")  # transformers' documented pattern
        try:
            for _ in range(2):
                assert torch.equal(model.generate(**inp, **kw), eager)
                assert h.stats.flops == flops
        finally:
            del model.forward
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_static_cache_generate_equals_the_dynamic_cache_in_every_family(family):
    model, inp, sup = family_setup(family)
    model.eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=sup)
    with vtoken.patch(model, "fastv", keep=8), torch.no_grad():
        assert torch.equal(model.generate(**inp, cache_implementation="static", **kw), model.generate(**inp, **kw))


@pytest.mark.parametrize(("name", "kw"), [("tome", {"r": 3}), ("tome", {"r": 40}), ("tome", {"r": [0, 7, 2]}),
                                          ("tome", {"keep": 10}), ("pitome", {"keep": 12}), ("pitome", {"keep": 0.5})])
def test_merged_group_count_fixed_by_the_schedule_is_the_counted_one(name, kw):
    """The static layout takes each image's merged-group count from the schedule (`output_tokens`,
    planned on a placeholder metric); it must be what merging the real images leaves, clamps included
    (r=40 asks more merges than half the tokens)."""
    model, inp, _ = family_setup("llava")
    with vtoken.patch(model.eval(), name, **kw) as h, torch.no_grad():
        (groups,) = [r for r in h.runtime.reducers if r.internal]
        model(**inp)  # the exact layout counts the groups from the merged tower
        assert groups.fixed is not None and h.stats.visual_tokens == [groups.fixed] * 2
    with vtoken.patch(model, "dymu", thresholds=[0.5] * 8) as h:
        assert next(r for r in h.runtime.reducers if r.internal).fixed is None  # content-adaptive
