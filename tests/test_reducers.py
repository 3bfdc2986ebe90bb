"""Signals (side path vs eager attention) and the attention/feature-guided reducers on hand-made cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import BEAMS_SEE_OWN_IMAGES, N_IMG, make_batch, make_prompt, pixels

import vtoken
from vtoken.eval.tiny import IMAGE_TOKEN, tiny_llava
from vtoken.ops.attention import received_attention
from vtoken.ops.diversity import greedy_diverse
from vtoken.reducers import DivPrune, HiPrune, TransPrune, VisionZip
from vtoken.reducers.base import ModelInfo, Reducer, Selection, SignalRequest, StageInput
from vtoken.reducers.hiprune import neighbours


@dataclass
class Probe(Reducer):
    """Records the signals it asks for and keeps every token (boundary stage)."""

    stage: ClassVar[str] = "boundary"
    keep: float = 1.0
    requests: tuple[SignalRequest, ...] = ()
    seen: dict = field(default_factory=dict)  # shared with the copy vtoken.patch makes

    def signals(self):
        return self.requests

    def select(self, x: StageInput) -> Selection:
        for r in self.requests:
            self.seen[r] = x.signal(r)
        self.seen["positions"] = x.positions
        return Selection(keep=x.valid.clone())


@dataclass
class DecoderProbe(Probe):
    stage: ClassVar[str] = "decoder"
    at: int = 2

    @property
    def layer(self):
        return self.at


def batch3():
    prompts = [make_prompt(1, text=4, seed=1), make_prompt(2, text=6, seed=2), make_prompt(0, text=9, seed=3)]
    return make_batch(prompts), pixels(3, seed=5)


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(seed=4, attn="eager", vision_layers=4, llm_layers=5)


def image_cols(ids: torch.Tensor, b: int) -> torch.Tensor:
    return torch.nonzero(ids[b] == IMAGE_TOKEN).flatten()


def test_vision_signals_match_eager_attention(eager):
    batch, px = batch3()
    reqs = (SignalRequest("vision_attention", 1, "all"), SignalRequest("vision_attention", -1, "cls"),
            SignalRequest("vision_keys", 1), SignalRequest("vision_features", -1))
    probe = Probe(requests=reqs)
    with vtoken.patch(eager, probe), torch.no_grad():
        eager(**batch, pixel_values=px)
    with torch.no_grad():
        vis = eager.model.vision_tower(px, output_attentions=True, output_hidden_states=True)
    feat_layer = len(eager.model.vision_tower.encoder.layers) - 2  # vision_feature_layer -2
    want_all = vis.attentions[1].mean(1).mean(1)[:, 1:]  # heads, then query rows; CLS column dropped
    want_cls = vis.attentions[feat_layer].mean(1)[:, 0, 1:]
    torch.testing.assert_close(probe.seen[reqs[0]], want_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.seen[reqs[1]], want_cls, atol=1e-5, rtol=1e-5)
    attn = eager.model.vision_tower.encoder.layers[1].self_attn
    normed = eager.model.vision_tower.encoder.layers[1].layer_norm1(vis.hidden_states[1])
    keys = attn.k_proj(normed).view(3, N_IMG + 1, attn.num_heads, -1).mean(2)[:, 1:]
    torch.testing.assert_close(probe.seen[reqs[2]], keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.seen[reqs[3]], vis.hidden_states[-2][:, 1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("query", ["all", "cls"])
def test_received_attention_blocks_match_one_full_softmax(query):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 50, 32, generator=g), torch.randn(3, 50, 32, generator=g)
    scores = torch.einsum("nqhd,nkhd->nhqk", q.view(3, 50, 4, 8), k.view(3, 50, 4, 8)) * 0.3
    p = scores.softmax(-1)
    want = (p[:, :, :1] if query == "cls" else p).mean(2).mean(1)
    for block in (1, 7 * 12 * 50, 2**30):  # one row at a time, ragged blocks, one block
        got = received_attention(q, k, heads=4, scale=0.3, query=query, block_elements=block)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_vision_signals_follow_images_through_beam_expansion(eager):
    """generate() encodes images before the prefill and beam search repeats them: signals follow."""
    batch, px = batch3()
    req = SignalRequest("vision_attention", -1, "cls")
    probe = Probe(requests=(req,))
    with vtoken.patch(eager, probe), torch.no_grad():
        eager.generate(**batch, pixel_values=px, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
        vis = eager.model.vision_tower(px, output_attentions=True)
    # each sample's images once per beam: sample 0 (image 0) x2, then sample 1 (images 1, 2) x2; before
    # 5.23 transformers repeats pixel_values per image, and the beams get the images in that order
    order = [0, 0, 1, 2, 1, 2] if BEAMS_SEE_OWN_IMAGES else [0, 0, 1, 1, 2, 2]
    want = vis.attentions[-2].mean(1)[:, 0, 1:][order]
    torch.testing.assert_close(probe.seen[req], want, atol=1e-5, rtol=1e-5)


def test_stale_vision_capture_is_refused(eager):
    batch, px = batch3()
    probe = Probe(requests=(SignalRequest("vision_attention", -1, "cls"),))
    with vtoken.patch(eager, probe), torch.no_grad():
        feats = eager.get_image_features(pixel_values=px)
        eager.get_image_features(pixel_values=pixels(3, seed=9))  # another tower run in between
        with pytest.raises(vtoken.SignalError, match="do not match"):
            eager(**batch, mm_encoder_outputs={"image": feats})


@pytest.mark.parametrize("query", ["last", "instruction", "visual"])
def test_llm_attention_signals_match_eager(eager, query):
    batch, px = batch3()
    ids = batch["input_ids"]
    reqs = (SignalRequest("llm_attention", 1, query), SignalRequest("llm_attention_pre", 2, query))
    probe = DecoderProbe(requests=reqs, at=2)
    with torch.no_grad():
        ref = eager(**batch, pixel_values=px, output_attentions=True).attentions
    with vtoken.patch(eager, probe), torch.no_grad():
        eager(**batch, pixel_values=px)
    mask = batch["attention_mask"].bool()
    for req, layer in zip(reqs, (1, 2)):
        got = probe.seen[req]
        att = ref[layer].mean(1)  # (B, L, L), head mean
        img = 0
        for b in range(3):
            cols = image_cols(ids, b)
            if not len(cols):
                continue
            last_img = int(cols.max())
            if query == "last":
                rows = torch.tensor([ids.shape[1] - 1])
            elif query == "instruction":
                rows = torch.nonzero(mask[b] & (torch.arange(ids.shape[1]) > last_img)).flatten()
            else:
                rows = cols
            want = att[b, rows][:, cols].mean(0).view(-1, N_IMG)
            torch.testing.assert_close(got[img:img + len(want)], want, atol=1e-5, rtol=1e-5)
            img += len(want)


def test_modality_mass_and_ttv_match_direct_computation(eager):
    batch, px = batch3()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    reqs = (SignalRequest("llm_modality_mass", 1, "t2v"), SignalRequest("ttv", 0, "signed"))
    probe = DecoderProbe(requests=reqs, at=3)
    io: dict = {}
    layers = eager.model.language_model.layers

    def cap(name):
        def hook(m, a, k, out):
            t_in = a[0] if a else k["hidden_states"]
            io.setdefault(name, []).append((t_in, out[0] if isinstance(out, tuple) else out))
        return hook

    hooks = [mod.register_forward_hook(cap(f"{i}"), with_kwargs=True)
             for i in range(3) for mod in (layers[i].self_attn, layers[i].mlp)]
    try:
        with torch.no_grad():
            ref = eager(**batch, pixel_values=px, output_attentions=True).attentions
        with vtoken.patch(eager, probe), torch.no_grad():
            eager(**batch, pixel_values=px)
    finally:
        for h in hooks:
            h.remove()
    ttv = torch.zeros(ids.shape)
    for i in range(3):
        for t_in, t_out in io[f"{i}"][:2]:  # the unpatched forward's attention and MLP
            mag = t_out.norm(dim=-1) / t_in.norm(dim=-1)
            d = 1 - F.cosine_similarity(t_out, t_in, dim=-1)
            ttv += mag * d.masked_fill(~mask, float("-inf")).softmax(-1)
    att = ref[1].mean(1)
    img = 0
    for b in range(2):
        cols = image_cols(ids, b)
        instr = torch.nonzero(mask[b] & (torch.arange(ids.shape[1]) > cols.max())).flatten()
        mass = att[b, instr][:, cols].sum(1).mean()
        n = len(cols) // N_IMG
        torch.testing.assert_close(probe.seen[reqs[0]][img:img + n], mass.expand(n, N_IMG), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probe.seen[reqs[1]][img:img + n], ttv[b, cols].view(n, N_IMG), atol=1e-5, rtol=1e-4)
        img += n


# --- hand-made cases ---------------------------------------------------------------------------------


def clusters(n_clusters=4, per=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(n_clusters, dim) * 5
    pts = centers[:, None] + 0.05 * torch.randn(n_clusters, per, dim, generator=g)
    perm = torch.randperm(n_clusters * per, generator=g)
    return pts.reshape(-1, dim)[perm][None], (torch.arange(n_clusters).repeat_interleave(per))[perm]


@pytest.mark.parametrize("mode", ["maxmin", "maxsum"])
def test_greedy_diversity_picks_one_per_cluster(mode):
    x, label = clusters()
    keep = greedy_diverse(x, torch.ones(1, 24, dtype=torch.bool), [4], torch.tensor([0]), mode)
    assert keep.sum() == 4
    assert sorted(label[keep[0]].tolist()) == [0, 1, 2, 3]


def test_greedy_diversity_matches_brute_force_and_large_inputs_run():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 16, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    got = greedy_diverse(x, valid, [7, 5], torch.tensor([3, 0]), "maxmin")
    xn = F.normalize(x, dim=-1)
    for i, (k, first) in enumerate([(7, 3), (5, 0)]):
        chosen = [first]
        while len(chosen) < k:
            sim = xn[i] @ xn[i, chosen].T
            score = sim.max(1).values
            score[chosen] = float("inf")
            score[~valid[i]] = float("inf")
            chosen.append(int(score.argmin()))
        assert set(torch.nonzero(got[i]).flatten().tolist()) == set(chosen)
    big = torch.randn(3, 2880, 64, generator=g)
    sel = greedy_diverse(big, torch.ones(3, 2880, dtype=torch.bool), [288, 288, 100], torch.zeros(3, dtype=torch.long))
    assert sel.sum(1).tolist() == [288, 288, 100]


@pytest.mark.parametrize("mode", ["maxmin", "maxsum"])
def test_greedy_diversity_from_an_outside_reference_matches_brute_force(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 30, 8, generator=g)
    valid = torch.ones(3, 30, dtype=torch.bool)
    valid[2, 20:] = False
    ref = torch.randn(3, 8, generator=g)
    seeded = torch.tensor([True, False, True])
    got = greedy_diverse(x, valid, [6, 4, 5], torch.tensor([2, 7, 0]), mode, ref, seeded)
    xn, rn = F.normalize(x, dim=-1), F.normalize(ref, dim=-1)
    for i, (k, first) in enumerate([(6, 2), (4, 7), (5, 0)]):
        chosen = [] if seeded[i] else [first]
        while len(chosen) < k:
            sims = [xn[i] @ rn[i]] if seeded[i] else []
            sims += [xn[i] @ xn[i, c] for c in chosen]
            stacked = torch.stack(sims, 1)
            score = stacked.max(1).values if mode == "maxmin" else stacked.sum(1)
            score[chosen] = float("inf")
            score[~valid[i]] = float("inf")
            chosen.append(int(score.argmin()))
        assert set(torch.nonzero(got[i]).flatten().tolist()) == set(chosen), i


def test_hiprune_buffers_are_spatial_neighbours_without_row_wrap():
    a = torch.zeros(1, 12, dtype=torch.bool)
    a[0, 3] = True  # end of row 0 in a 3x4 grid
    a[0, 8] = True  # start of row 2
    got = set(torch.nonzero(neighbours(a, 3, 4, wrap=False)[0]).flatten().tolist())
    assert got == {2, 7, 4, 9}
    official = set(torch.nonzero(neighbours(a, 3, 4, wrap=True)[0]).flatten().tolist())
    assert official == {2, 4, 7, 9, 0, 11} - {3, 8}  # a+1 wraps to 4, a-1 wraps to 7, clamps add 0 and 11


def stage_input(n=16, grid=(4, 4), keep=5, d=4, signals=None, feats=None):
    valid = torch.ones(1, n, dtype=torch.bool)
    feats = torch.randn(1, n, d) if feats is None else feats
    return StageInput(features=feats, valid=valid, positions=torch.arange(n)[None], sizes=torch.ones(1, n),
                      grids=[grid], keep=[keep], _signal=lambda req: signals[req])


def test_hiprune_selection_on_hand_made_attention():
    r = HiPrune(keep=10, alpha=1.0, object_layer=0)  # T = round(10 * 1 / 5) = 2 anchors
    obj, deep = r.signals()
    s_obj = torch.zeros(1, 16)
    s_obj[0, 5], s_obj[0, 15] = 0.9, 0.8  # anchors 5 (row 1, col 1) and 15 (corner)
    s_deep = torch.arange(16, dtype=torch.float)[None] / 100  # registers prefer high indices
    sel = r.select(stage_input(keep=10, signals={obj: s_obj, deep: s_deep}))
    kept = set(torch.nonzero(sel.keep[0]).flatten().tolist())
    anchors_and_buffers = {5, 1, 4, 6, 9, 15, 11, 14}
    assert anchors_and_buffers <= kept and len(kept) == 10
    assert kept - anchors_and_buffers == {13, 12}  # the 2 registers: highest deep scores among the rest


def test_visionzip_contextual_tokens_hand_worked():
    r = VisionZip(keep=4, dominant=2)
    att, key, feat = r.signals()
    cls = torch.tensor([[0.0, 0.9, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0]])  # dominant: 1 and 4
    keys = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [0, 1], [1, 0], [0.9, 0.1], [0.2, 1]]])
    feats = torch.arange(8, dtype=torch.float)[None, :, None].repeat(1, 1, 2)
    x = stage_input(n=8, grid=(2, 4), keep=4, d=2, feats=feats.clone(),
                    signals={att: cls, key: keys, feat: feats})
    sel = r.select(x)
    # remaining (raster) = [0, 2, 3, 5, 6, 7]; C = 2 targets at stride 6 // 2 = 3 -> tokens 0 and 5
    assert torch.nonzero(sel.keep[0]).flatten().tolist() == [0, 1, 4, 5]
    # others 2, 3, 6, 7: by key, 2 -> 0 (x-axis), 6 -> 0; 3 -> 5? no: 3 and 7 point along y, 5 along x
    # targets' keys: 0 = (1, 0), 5 = (1, 0): all go to the first best (0) -> token 0 = 0 + mean(2, 3, 6, 7)
    assert sel.values[0, 0].tolist() == [0 + (2 + 3 + 6 + 7) / 4] * 2
    assert sel.values[0, 5].tolist() == [5.0, 5.0] and sel.sizes[0, 0] == 5 and sel.sizes[0, 5] == 1


def test_divprune_starts_from_the_most_isolated_token():
    feats = torch.tensor([[[1.0, 0], [0.99, 0.1], [0.98, 0.15], [0, 1], [-1, 0.05]]])
    sel = DivPrune(keep=1).select(stage_input(n=5, grid=(1, 5), keep=1, d=2, feats=feats))
    # token 3 (0, 1) is farthest from its nearest neighbour... token 4 (-1, .05) nearest is 3 at ~90 deg too;
    # cos(3, 4) = 0.05 vs cos(3, 2) = 0.15: token 4's nearest neighbour (3) is the most distant one
    assert torch.nonzero(sel.keep[0]).flatten().tolist() == [4]
    sel = DivPrune(keep=3).select(stage_input(n=5, grid=(1, 5), keep=3, d=2, feats=feats))
    assert torch.nonzero(sel.keep[0]).flatten().tolist() == [0, 3, 4]


def test_transprune_official_schedule_on_a_32_layer_llm():
    r = TransPrune()
    r.configure(ModelInfo("llava", llm_layers=32, vision_layers=24))
    assert r.layers == (7, 9, 12) and r.accumulate_from == 6
    counts = []
    n = 576
    for layer in r.layers:
        n = r.budget(n, layer, 576)
        counts.append(n)
    assert counts == [504, 360, 72]
    r = TransPrune(keep=64)
    r.configure(ModelInfo("llava", llm_layers=32))
    assert r.budget(360, 12, 576) == 64
    with pytest.raises(vtoken.ParameterError, match="increasing"):
        TransPrune(schedule=((5, 0.5), (3, 0.2)))


def test_todre_stage_switches_and_defaults():
    model = tiny_llava(llm_layers=8)
    with vtoken.patch(model, "todre", keep=8) as p:
        names = [r.name for r in p.reducers]
        assert names == ["todre_diversity", "todre_relevance"]
        assert p.reducers[1].check_layer == 6  # round(7 * 8 / 8) - 1
    with vtoken.patch(model, "todre", keep=8, stage2=False) as p:
        assert [r.name for r in p.reducers] == ["todre_diversity"]
    with vtoken.patch(model, "todre", stage1=False, tau=1.0) as p, torch.no_grad():
        model(input_ids=torch.tensor([make_prompt(1)]), pixel_values=pixels(1))
        assert p.stats.visual_per_layer[6] == [N_IMG] and p.stats.visual_per_layer[7] == [0]
    with pytest.raises(vtoken.ParameterError, match="at least one"):
        vtoken.patch(model, "todre", stage1=False, stage2=False)


def test_reducer_overhead_is_reported(llava):
    with vtoken.patch(llava, "divprune", keep=8) as p, torch.no_grad():
        llava(input_ids=torch.tensor([make_prompt(1)]), pixel_values=pixels(1))
        assert p.stats.overhead_s > 0


def test_todre_declares_every_parameter_of_its_stages():
    """ToDRE hands each stage its own parameters by name: a stage parameter ToDRE lacks would be
    silently left at the stage's default (the drift the redesign removed)."""
    import dataclasses

    from vtoken.reducers.todre import ToDRE, ToDREDiversity, ToDRERelevance

    def names(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}

    assert names(ToDREDiversity) | (names(ToDRERelevance) - {"keep"}) <= names(ToDRE)
    stage1, _ = ToDRE(keep=9, vision_layer=-2, seed=3, pivot="random", renumber=True).parts()
    assert (stage1.keep, stage1.vision_layer, stage1.seed, stage1.renumber) == (9, -2, 3, True)
