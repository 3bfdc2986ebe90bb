"""Measurement correctness (issue 12, E14-E15): the vision side paths of attention-guided reducers are
counted in the reducer's FLOPs, checked against torch's FlopCounterMode; the overhead timer is given
the device of the tensors it times (CUDA events there)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prompt, pixels
from torch.utils.flop_counter import FlopCounterMode

import vtoken
from vtoken import timing
from vtoken.eval.tiny import tiny_llava
from vtoken.ops.attention import received_attention, received_attention_flops


@pytest.fixture(scope="module")
def eager():
    # eager attention: on the CPU, FlopCounterMode does not see inside SDPA's fused kernel
    return tiny_llava(seed=1, llm_layers=3, attn="eager")


def _counted(model, name: str, params: dict) -> tuple[dict, int, int]:
    """(vtoken's FLOPs, FlopCounterMode's total, vision attention maps the reducer requests)."""
    ids, px = torch.tensor([make_prompt(1, text=20)]), pixels(1)
    with vtoken.patch(model, name, **params) as p:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(input_ids=ids, pixel_values=px, use_cache=False)
        maps = len({s for s in p.runtime.signals if s.kind == "vision_attention"})
        return dict(p.stats.flops), counter.get_total_flops(), maps


@pytest.mark.parametrize("query", ["all", "cls"])
def test_received_attention_flops_match_the_counter(query):
    q, k = torch.randn(3, 17, 24), torch.randn(3, 17, 24)
    counter = FlopCounterMode(display=False)
    with counter:
        received_attention(q, k, heads=4, scale=0.2, query=query, block_elements=64)  # several query blocks
    assert received_attention_flops(q, k, query) == counter.get_total_flops()


def test_hiprune_vision_side_path_is_counted_exactly(eager):
    """HiPrune's only extra work beside random's (same budget, same LLM rows) is the vision attention
    map over the tower's rows: FlopCounterMode's difference between the two is vtoken's reducer FLOPs."""
    flops, counted, maps = _counted(eager, "hiprune", {"keep": 10})
    base, base_counted, _ = _counted(eager, "random", {"keep": 10})
    tower = eager.model.vision_tower.config
    rows = (tower.image_size // tower.patch_size) ** 2 + 1  # patches + CLS
    side = 2 * rows * rows * tower.hidden_size  # one image, all query rows, q k^T
    assert maps >= 1 and flops["reducer"] == maps * side
    assert base["reducer"] == 0
    assert counted - base_counted == flops["total"] - base["total"] == flops["reducer"]


@pytest.mark.parametrize("name,params", [("visionzip", {"keep": 10}), ("todre", {"keep": 9})])
def test_cls_attention_side_path_is_counted(eager, name, params):
    flops, counted, maps = _counted(eager, name, params)
    tower = eager.model.vision_tower.config
    rows = (tower.image_size // tower.patch_size) ** 2 + 1
    assert maps >= 1 and flops["reducer"] >= maps * 2 * rows * tower.hidden_size  # the CLS row against every key
    assert flops["total"] <= counted  # what is left uncounted is the reducers' own similarity products


def test_timer_uses_cuda_events_for_cuda_tensors(monkeypatch):
    """With a (stand-in) CUDA device the timer records events and reads them once, not host time."""
    made: list[_FakeEvent] = []

    class _FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            made.append(self)

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: _FakeEvent) -> float:
            return 250.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    t = timing.Timer()
    for _ in range(2):
        with t.at(torch.device("cuda")):
            pass
    assert len(made) == 4
    assert t.seconds == pytest.approx(0.5)
    with t.at("cpu"):
        pass
    assert len(made) == 4  # host timing on the CPU


def test_reducers_are_timed_on_the_device_of_their_inputs(monkeypatch):
    model = tiny_llava(seed=0)
    devices: list[torch.device] = []
    original = timing.Timer.at

    def at(self, device):
        devices.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(timing.Timer, "at", at)
    with vtoken.patch(model, "random", keep=5) as p, torch.no_grad():
        model(input_ids=torch.tensor([make_prompt(1)]), pixel_values=pixels(1))
        assert p.stats.overhead_s > 0
    assert devices and all(d == model.device for d in devices)


def test_llm_side_path_flops_match_the_counter():
    """FastV / TransPrune / ToDRE's LLM side path: the q k^T products FlopCounterMode sees."""
    from vtoken.signals.attention import received_from_queries, received_from_queries_flops

    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 11, 8)  # grouped-query: 4 query heads on 2 kv heads
    idx = torch.tensor([[8, 9, 10], [5, 6, 7]])
    counter = FlopCounterMode(display=False)
    with counter:
        qvalid, keys = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 11, dtype=torch.bool)
        out = received_from_queries(q, k, idx, qvalid, keys, 0.3)
    assert received_from_queries_flops(q, k.shape[2]) == counter.get_total_flops()
    torch.testing.assert_close(out.sum(1), torch.ones(2))  # each query row's attention sums to 1
