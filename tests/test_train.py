"""The CPU training recipe (eval/train_cpu.py) and model loading by Hub id (no network touched)."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

from vtoken.eval import cli, models, runner
from vtoken.eval.shapes import CATEGORIES


def test_hub_id_offline_mode_fails_with_the_offline_cause(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        models.load("llava-hf/llava-1.5-7b-hf")


def test_hub_id_without_network_fails_fast_naming_the_network(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub

    def refuse(*args, **kwargs):
        raise OSError("network unreachable (mocked)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert cli.main(["run", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--reducer", "random", "--keep", "8"]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub id" in err and "no network connection" in err and "mocked" in err


def test_local_directory_still_loads_and_unknown_names_are_refused(tmp_path):
    model, proc = models.tiny_shapes_model()
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    loaded, _, info = models.load(str(tmp_path / "m"))
    assert info["trained"] and type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="Hub id"):
        models.load(str(tmp_path / "missing"))  # a path, not an owner/name id: no Hub lookup


def _tiny(out, steps: tuple[int, int, int], *extra: str) -> list[str]:
    return ["--out", str(out), "--vision", "1,32,2", "--llm", "1,32,2,1", "--pool", "6", "--refresh", "1",
            "--small-pool", "4",
            "--vision-steps", str(steps[0]), "--llm-steps", str(steps[1]), "--joint-steps", str(steps[2]),
            "--vision-batch", "2", "--batch", "2", "--qa", "2", "--warmup", "1", "--eval", "0", "--log-every", "1",
            "--attn-layer", "0", *extra]


def test_staged_cpu_training_resumes_bit_identically_and_saves_a_plain_llava(tmp_path):
    from vtoken.eval import train, train_cpu

    a = train_cpu.train(train_cpu.parse(_tiny(tmp_path / "a", (2, 2, 2), "--save", str(tmp_path / "model"))))
    assert a["steps"] == 6 and a["finished"]
    train_cpu.train(train_cpu.parse(_tiny(tmp_path / "b", (2, 1, 0))))  # stops inside the llm stage
    b = train_cpu.train(train_cpu.parse(_tiny(tmp_path / "b", (2, 2, 2), "--resume")))
    assert b["steps"] == 6 and b["images"] == a["images"]
    for prefix in ("model", "aux"):
        wa = train.load_sharded(tmp_path / "a" / "checkpoint", prefix)
        wb = train.load_sharded(tmp_path / "b" / "checkpoint", prefix)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), prefix
    model, proc, info = models.load(str(tmp_path / "model"))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and info["recipe"] == "train_cpu"
    assert not any("aux" in k for k in model.state_dict())
    # --certify: the test split (seeds 0 and 1) and the check subset go into vtoken.json, beside the recipe's
    seen = train_cpu.certify(tmp_path / "model", limit=8, check=8)
    meta = json.loads((tmp_path / "model" / "vtoken.json").read_text())
    assert meta["recipe"] == "train_cpu" and meta["check"]["limit"] == 8
    assert meta["test"] == json.loads(json.dumps(seen["test"]))
    for seed in ("seed0", "seed1"):
        lo, hi = meta["test"][seed]["accuracy_ci95"]
        assert lo <= meta["test"][seed]["accuracy"] <= hi and meta["test"][seed]["per_category"]
    assert meta["meets_bar"] is False  # a 6-step model is at chance
    again = runner.evaluate(model, proc, "none", {}, limit=8, seed=0, timing_batches=0, progress=False)
    assert again["metrics"]["accuracy"] == meta["check"]["accuracy"]
    assert next(model.parameters()).dtype == torch.float32  # load() casts the bf16 file to the asked dtype
    rec = runner.evaluate(model, proc, "none", {}, limit=2, batch_size=2, timing_batches=0, progress=False)
    assert rec["metrics"]["visual_tokens"]["mean"] == 144  # 336 px in 28-px patches


def test_patch_labels_mark_each_object_centre():
    from vtoken.eval.shapes import Obj
    from vtoken.eval.train_cpu import patch_labels

    objs = [Obj("star", "red", 20.0, 30.0, 10.0, "K"), Obj("circle", "blue", 300.0, 300.0, 5.0),
            Obj("square", "green", 25.0, 10.0, 4.0)]
    lab = patch_labels(objs, 12)
    assert lab["centres"].tolist().count(0) == 141 and lab["centres"][1 * 12 + 0] == 1
    assert lab["centres"][0] == 1 and lab["shape"][0] == 1  # square at (25, 10): patch (0, 0)
    assert lab["shape"][12] == 3 and lab["color"][12] == 0  # the star, red, patch (row 1, col 0)
    assert lab["char"][10 * 12 + 10] == 29  # the circle has no character: the extra class
    assert (lab["shape"] >= 0).sum() == 3
    covered = lab["cover_shape"] < 6
    star = covered & (lab["cover_color"] == 0)  # red: only the star
    assert star.sum() >= 2 and (lab["cover_char"][star] == 15).all()  # "K" on every patch the star covers
    assert (lab["cover_char"][covered & ~star] == 29).all() and (lab["cover_char"][~covered] == -1).all()
    assert np.allclose(lab["cover_geom"][star], (20 / 336, 30 / 336, math.log(10) / math.log(40)))


def test_token_aux_targets_are_the_patch_words():
    from vtoken.eval.models import build_processor
    from vtoken.eval.shapes import Obj
    from vtoken.eval.train_cpu import patch_labels, token_aux_loss, word_ids

    tok = build_processor(patch_size=28).tokenizer
    words = word_ids(tok)
    star = Obj("star", "red", 20.0, 30.0, 14.0, "K")
    lab = {k: torch.from_numpy(v)[None] for k, v in patch_labels([star], 12).items()}
    assert (lab["cover_color"] >= 0).any() and lab["char"][0, 12] == 15  # "K" at the centre patch (row 1, col 0)
    no_cover = {**lab, "cover_color": torch.full_like(lab["cover_color"], -1),
                "cover_shape": torch.full_like(lab["cover_shape"], 6)}
    logits = torch.full((1, 144, len(tok)), -30.0)
    logits[0, 12, tok.convert_tokens_to_ids("k")] = 0.0
    assert token_aux_loss(logits, no_cover, words).item() < 1e-6  # the centre's target: its character word
    logits = torch.full((1, 144, len(tok)), -30.0)
    logits[0][:, [tok.convert_tokens_to_ids(w) for w in ("red", "star")]] = 0.0
    no_char = {**lab, "char": torch.full_like(lab["char"], -1)}
    loss = token_aux_loss(logits, no_char, words).item()
    assert abs(loss - math.log(2)) < 1e-4  # covered patches: half "red", half "star"
    logits[0][:, tok.convert_tokens_to_ids("k")] = 0.0  # cover_char: "K" on every covered patch as well
    assert abs(token_aux_loss(logits, lab, words, "cover_char").item() - math.log(3)) < 1e-4
    # position: the star (x 20, y 30 of 336) is left of and above the centre lines on every covered patch
    logits[0][:, [tok.convert_tokens_to_ids(w) for w in ("left", "above")]] = 0.0
    assert abs(token_aux_loss(logits, lab, words, "cover_char", position=True).item() - math.log(5)) < 1e-4
    logits[0][:, tok.convert_tokens_to_ids("left")] = -30.0  # a wrong side costs: "right" is not the target
    logits[0][:, tok.convert_tokens_to_ids("right")] = 0.0
    assert token_aux_loss(logits, lab, words, "cover_char", position=True).item() > math.log(5) + 1


def test_curriculum_and_token_aux_resume_bit_identically(tmp_path):
    from vtoken.eval import train, train_cpu

    extra = ("--curriculum", "2", "--curriculum-steps", "2", "--token-aux", "1", "--unique-qa")
    a = train_cpu.train(train_cpu.parse(_tiny(tmp_path / "a", (1, 3, 1), *extra)))
    train_cpu.train(train_cpu.parse(_tiny(tmp_path / "b", (1, 1, 0), *extra)))  # stops inside the curriculum
    (tmp_path / "b" / "checkpoint").rename(tmp_path / "b" / "checkpoint.old")  # as if killed between renames
    b = train_cpu.train(train_cpu.parse(_tiny(tmp_path / "b", (1, 3, 1), *extra, "--resume")))
    assert a["steps"] == b["steps"] == 5
    assert sorted(x.name for x in (tmp_path / "b").iterdir()) == ["checkpoint"]  # no .old / .tmp left behind
    wa = train.load_sharded(tmp_path / "a" / "checkpoint", "model")
    wb = train.load_sharded(tmp_path / "b" / "checkpoint", "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(1 <= len(o) <= 2 for o in train_cpu.Pool(3, 0, 12, max_objects=2).objs)
    report = train_cpu.probe(tmp_path / "a" / "checkpoint", scenes=2, per_category=2)
    assert report["step"] == 5 and set(report["answer_loss"]) == set(train_cpu.CATEGORIES)
    assert all(0 <= r["acc"] <= 1 for r in report["patch_probe"].values())
    from vtoken.eval.shapes import glyph_scale, sample

    scenes = [sample("val", 3 * 10**5 + i, 0, category="text") for i in range(2)]  # char_by_scale's scenes
    chars = [glyph_scale(o.r) for s in scenes for o in s.objects if o.char]
    assert {k: v["n"] for k, v in report["char_by_scale"].items()} == {k: chars.count(k) for k in set(chars)}


def test_text_p_sets_how_often_training_objects_carry_a_character():
    from vtoken.eval.train import _scene
    from vtoken.eval.train_cpu import Pool

    default = Pool(6, 0, 12)
    assert [o for s in default.objs for o in s] == [o for i in range(6) for o in _scene((0, i))[1]]  # None: as before
    for p, want in ((1.0, True), (0.0, False)):
        objs = [o for s in Pool(6, 0, 12, text_p=p).objs + Pool(6, 0, 12, max_objects=3, text_p=p).objs for o in s]
        readable = [o for o in objs if o.r >= 12]
        assert readable and all((o.char is not None) == want for o in readable)
        assert all(o.char is None for o in objs if o.r < 12)


def test_unique_qa_batches_never_repeat_a_question_and_label_only_answers():
    import numpy as np

    from vtoken.eval.models import build_processor
    from vtoken.eval.train_cpu import Pool, make_batch_unique

    proc = build_processor(patch_size=28)
    tok = proc.tokenizer
    pool = Pool(4, 0, 12, max_objects=1)  # one object: few distinct questions, so repeats would be common
    batch = make_batch_unique(torch.arange(4), pool.objs, proc, 12, np.random.default_rng(0), 144)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 144
        text = " ".join(t for t in tok.convert_ids_to_tokens(ids.tolist()) if t not in ("<image>", "<pad>"))
        questions = [q.split(" ASSISTANT:")[0] for q in text.split("USER: ")[1:]]
        assert len(questions) == len(set(questions)) >= 3
        labelled = tok.convert_ids_to_tokens(labels[labels != -100].tolist())
        assert labelled[1::2] == ["</s>"] * len(questions)  # answer word, end of turn; prompts unlabelled


def test_resume_from_a_recipe_without_the_newer_aux_heads(tmp_path):
    """An older checkpoint (run 2's recipe had no cover_char / cover_geom heads) resumes: its weights and
    optimiser moments load unchanged, the missing heads start fresh."""
    from safetensors.torch import save_file

    from vtoken.eval import train, train_cpu

    train_cpu.train(train_cpu.parse(_tiny(tmp_path / "a", (2, 1, 0), "--token-pos")))
    ckpt = tmp_path / "a" / "checkpoint"
    aux = train.load_sharded(ckpt, "aux")
    for path in ckpt.glob("aux-*.safetensors"):
        path.unlink()
    new = ("heads.cover_char.", "heads.cover_geom.")
    save_file({k: v for k, v in aux.items() if not k.startswith(new)}, str(ckpt / "aux-0000.safetensors"))
    opt = train.load_sharded(ckpt, "optim")
    last = max(int(k.split(".")[0]) for k in opt)  # the four new heads' parameters come last
    kept = {k: v for k, v in opt.items() if int(k.split(".")[0]) <= last - 4}
    for path in ckpt.glob("optim-*.safetensors"):
        path.unlink()
    save_file(kept, str(ckpt / "optim-0000.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items() if int(k) <= last - 4}
    state["optimizer"]["param_groups"][0]["params"] = list(range(last - 3))
    (ckpt / "state.json").write_text(json.dumps(state))
    model, _ = train_cpu.build((1, 32, 2), (1, 32, 2, 1), 28)
    heads = train_cpu.AuxHeads(32)
    opt_ = torch.optim.AdamW([*model.parameters(), *heads.parameters()])
    train_cpu.load_checkpoint(ckpt, model, heads, opt_, np.random.default_rng(0))
    assert torch.equal(heads.heads["char"].weight, aux["heads.char.weight"])
    moments = [opt_.state[p] for p in opt_.param_groups[0]["params"]]
    saved = {int(k.split(".")[0]) for k in kept if k.endswith("exp_avg")}
    assert saved and {i for i, m in enumerate(moments) if m} == saved and max(saved) < last - 3
    i = max(saved)
    assert torch.equal(moments[i]["exp_avg"], kept[f"{i}.exp_avg"])


def test_early_token_logits_read_a_layers_output_through_the_final_norm():
    """`--token-layer k`: the token aux reads the residual stream after LLM layer k (1-based) with the LM
    head, through the final norm; k = the depth is the model's own logits."""
    from vtoken.eval.train_cpu import build, early_logits

    model, _ = build((1, 32, 2), (3, 32, 2, 1), 28, -1)
    ids = torch.randint(3, 50, (2, 7))
    rows = ids % 2 == 0
    seen = {}
    layer = model.model.language_model.layers[0]
    hook = layer.register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    lm = model.model.language_model
    torch.testing.assert_close(early_logits(model, out.hidden_states, 1, rows), model.lm_head(lm.norm(seen["h"][rows])))
    torch.testing.assert_close(early_logits(model, out.hidden_states, 3, rows), out.logits[rows])


def test_grounding_targets_the_named_objects_patches():
    """`--attn-sup`: each turn that names objects gives the answer-predicting position and, in the order
    named, the patches each object covers; the loss is -log of the attention mass a head puts on them."""
    from vtoken.eval.shapes import Obj, sample
    from vtoken.eval.train_cpu import build, grounding_loss, make_batch_unique, named_objects, object_patches

    scene = [Obj("star", "red", 50.0, 50.0, 20.0), Obj("circle", "blue", 300.0, 200.0, 10.0),
             Obj("star", "green", 200.0, 300.0, 6.0)]
    assert named_objects("is the blue circle left or right of the red star?", scene) == [1, 0]
    assert named_objects("what shape is the green object?", scene) == [2]
    assert named_objects("what color is the star?", scene) == []  # two stars: "the star" names none
    assert named_objects("how many stars are there?", scene) == []
    # the circle (x 290-310, y 190-210) lies in patches (row 6, col 10) and (7, 10) with >= 16 pixels each
    assert object_patches(scene[1], 12).tolist() == [6 * 12 + 10, 7 * 12 + 10]
    assert len(object_patches(Obj("circle", "red", 14.0, 14.0, 2.0), 12)) == 1  # tiny: its fullest patch
    s = sample("train", 3, category="position")
    model, proc = build((1, 32, 2), (1, 32, 2, 1), 28, -1)
    batch = make_batch_unique(torch.tensor([0, 0]), [s.objects], proc, 6, np.random.default_rng(1), 144, ground=True)
    assert batch["ground"]
    ids = batch["input_ids"]
    answers = batch["labels"] != -100
    for row, q, objects in batch["ground"]:
        assert answers[row, q + 1] and not answers[row, q]  # q predicts the answer's first token
        assert all(len(p) for p in objects)
    row, q, objects = batch["ground"][0]
    att = torch.zeros(2, 2, ids.shape[1], ids.shape[1])
    first = int((ids[row] == model.config.image_token_id).nonzero()[0])
    att[row, 0, q, first + torch.from_numpy(objects[0])] = 0.5 / len(objects[0])  # half the mass on the first
    loss = grounding_loss(att, ids, model.config.image_token_id, batch["ground"][:1], heads=1)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(0.5 + 1e-6)))


def test_training_with_grounding_runs_and_logs_it(tmp_path, capsys):
    from vtoken.eval import train_cpu

    out = train_cpu.train(train_cpu.parse(_tiny(tmp_path / "g", (1, 1, 1), "--attn-sup", "1", "--attn-layer", "0")))
    assert out["steps"] == 3 and " ground " in capsys.readouterr().out
    diag = train_cpu.probe(tmp_path / "g" / "checkpoint", scenes=2, per_category=3)
    assert set(diag["answer_loss"]) == set(CATEGORIES)
    for cat in ("position", "size"):  # two named objects: the mass on each, per layer, is a fraction
        masses = diag["named_attention"][cat]["layer 0"]
        assert len(masses) == 2 and all(0 < m < 1 for m in masses)


def test_grounding_layer_outside_the_llm_is_refused(tmp_path):
    from vtoken.eval import train_cpu

    with pytest.raises(SystemExit, match="--attn-layer 1 is not a layer of the 1-layer LLM"):
        train_cpu.train(train_cpu.parse(_tiny(tmp_path / "x", (1, 1, 1), "--attn-layer", "1")))
