"""Shapes benchmark determinism and correctness; the `vtoken run` runner end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from vtoken.eval import cli
from vtoken.eval.shapes import CATEGORIES, COLORS, SIZE, VIDEO_CATEGORIES, ShapesVQA, _mask, sample, video_sample


def test_generation_is_deterministic_and_split_dependent():
    a = [sample("test", i).image.tobytes() for i in range(5)]
    b = [sample("test", i).image.tobytes() for i in range(5)]
    assert a == b
    assert sample("train", 0).image.tobytes() != sample("test", 0).image.tobytes()
    assert sample("test", 0, seed=1).question != sample("test", 0, seed=0).question or \
        sample("test", 0, seed=1).image.tobytes() != sample("test", 0, seed=0).image.tobytes()
    digest = hashlib.sha1(b"".join(a)).hexdigest()
    assert len(digest) == 40


def test_categories_cycle_and_exist_is_balanced():
    ds = ShapesVQA("test", 700)
    items = [ds[i] for i in range(700)]
    assert [s.category for s in items[:7]] == list(CATEGORIES)
    exist = [s.answer for s in items if s.category == "exist"]
    assert 0.4 < exist.count("yes") / len(exist) < 0.6
    assert all(s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8 for s in items[:10])
    assert all(" " not in s.answer for s in items)


def test_answers_agree_with_the_rendered_image():
    """Counts and colours read back from the pixels match the scene the answer was derived from."""
    for i in range(60):
        s = sample("test", i)
        for o in s.objects:
            # a pixel of the object away from its (optional) character carries the object's colour
            m = _mask(o, 0, 0, SIZE, SIZE)
            ys, xs = np.nonzero(m)
            far = np.argmax((xs - o.x) ** 2 + (ys - o.y) ** 2)
            assert tuple(s.image[ys[far], xs[far]]) == COLORS[o.color]
        # the number of separate objects of each colour seen in the pixels matches the scene
        for color, rgb in COLORS.items():
            seen = sum(
                1 for o in s.objects
                if (s.image[_mask(o, 0, 0, SIZE, SIZE)] == rgb).all(-1).mean() > 0.5
            )
            assert seen == sum(o.color == color for o in s.objects)
        if s.question.startswith("how many objects"):
            assert s.answer == str(len(s.objects))


def test_run_end_to_end_writes_a_record(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    code = cli.main(["run", "--model", "tiny-llava-shapes", "--reducer", "fastv", "--keep", "64",
                     "--limit", "6", "--batch-size", "3", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| fastv | keep=64 |" in text and "| none |" in text
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["config"]["reducer"] == "fastv" and rec["config"]["limit"] == 6
    m = rec["metrics"]
    assert set(m) >= {"accuracy", "per_category", "visual_tokens", "flops_per_sample", "ttft_ms",
                      "decode_tokens_per_s", "peak_memory_mb", "retained_pct", "flops_pct", "accuracy_ci95"}
    assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert m["visual_tokens"] == {"mean": 576.0, "min": 576, "max": 576}  # fastv acts inside the LLM
    assert 0 < m["flops_pct"] < 100
    assert set(rec["environment"]) >= {"torch", "transformers", "device", "dtype", "git_commit"}


def test_bootstrap_interval_brackets_the_accuracy_and_narrows_with_more_questions():
    import math

    from vtoken.eval.runner import bootstrap_ci

    assert bootstrap_ci([True] * 20) == (1.0, 1.0) and bootstrap_ci([]) == (0.0, 0.0)
    small, large = bootstrap_ci([True, False] * 50), bootstrap_ci([True, False] * 500)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    # the normal approximation's half-width at p = 0.5, n = 1000 is 1.96 * sqrt(0.25 / 1000) = 0.031
    assert math.isclose((large[1] - large[0]) / 2, 1.96 * math.sqrt(0.25 / 1000), rel_tol=0.15)
    assert bootstrap_ci([True, False] * 50) == small  # seeded: reproducible records


@pytest.mark.parametrize("argv,msg", [
    (["run", "--model", "/nonexistent"], "cannot load model"),
    (["run", "--model", "tiny-llava-shapes", "--task", "mmmu"], "unknown task"),
    (["run", "--model", "tiny-llava-shapes", "--reducer", "fastvv"], "Did you mean"),
    (["run", "--model", "tiny-llava-shapes", "--reducer", "random", "--keep", "0"], "at least one"),
    (["run", "--model", "tiny-llava-shapes", "--reducer", "random", "--keep", "999", "--limit", "2"], "only 576"),
    (["run", "--model", "tiny-llava-shapes", "--task", "shapes-video", "--limit", "2"], "takes videos"),
])
def test_run_bad_input_exits_2_with_a_message(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_training_is_reproducible_and_resumes_exactly(tmp_path):
    """Train 4 steps straight vs 2 steps + checkpoint + resume: identical weights; shards <= 16 MB."""
    import torch
    from safetensors.torch import load_file

    from vtoken.eval import train

    common = ["--arch", "llava", "--size", "tiny", "--images", "6", "--batch", "2", "--qa", "2", "--device", "cpu",
              "--workers", "1", "--eval", "0", "--log-every", "1", "--save-every", "100", "--warmup", "2"]
    train.train(train.parse([*common, "--out", str(tmp_path / "a"), "--steps", "4"]))
    train.train(train.parse([*common, "--out", str(tmp_path / "b"), "--steps", "2"]))
    result = train.train(train.parse([*common, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"]))
    assert result["steps"] == 4
    a = train.load_sharded(tmp_path / "a" / "checkpoint", "model")
    b = train.load_sharded(tmp_path / "b" / "checkpoint", "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shards = list((tmp_path / "b" / "checkpoint").glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= train.SHARD_BYTES + 2**16 for p in shards)
    assert load_file(str(shards[0]))  # readable safetensors
    # the saved model loads offline with its processor and answers Shapes questions
    from vtoken.eval import models, runner

    model, proc, info = models.load(str(tmp_path / "b"))
    assert info["trained"] and info["steps"] == 4
    rec = runner.evaluate(model, proc, "none", {}, limit=3, batch_size=3, timing_batches=0, progress=False)
    assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0


def test_large_tensors_are_split_across_shards(tmp_path):
    import torch

    from vtoken.eval import train

    big = {"w": torch.arange(6 * 2**20, dtype=torch.float32).view(3 * 2**10, 2**11), "b": torch.ones(3)}
    train.save_sharded(big, tmp_path, "x")
    files = sorted(tmp_path.glob("x-*.safetensors"))
    assert len(files) >= 2 and all(f.stat().st_size <= train.SHARD_BYTES + 2**16 for f in files)
    back = train.load_sharded(tmp_path, "x")
    assert torch.equal(back["w"], big["w"]) and torch.equal(back["b"], big["b"])


def test_run_on_the_qwen_shapes_geometry(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert cli.main(["run", "--model", "tiny-qwen2vl-shapes", "--reducer", "random", "--keep", "64",
                     "--limit", "4", "--batch-size", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["metrics"]["visual_tokens"] == {"mean": 64.0, "min": 64, "max": 64}  # of 144 per image
    assert rec["metrics"]["flops_pct"] < 100


def test_video_objects_glide_over_a_fixed_background():
    """Each frame draws the same background and every object, shifted by its constant velocity, in its
    colour; the frames differ; the question's category is one a moving scene keeps true; deterministic."""
    for i in range(12):
        v = video_sample("test", i)
        assert v.frames.shape == (4, SIZE, SIZE, 3) and v.category in VIDEO_CATEGORIES
        assert np.array_equal(v.frames, video_sample("test", i).frames)
        assert not np.array_equal(v.frames[0], v.frames[-1])
        for f in range(1, 4):
            assert not np.array_equal(v.frames[f], v.frames[f - 1])  # every frame moves something
        for o in v.objects:  # frame 0: the objects as listed, in their colours
            m = _mask(o, 0, 0, SIZE, SIZE)
            assert (v.frames[0][m] == COLORS[o.color]).all(-1).mean() > 0.5
        still = np.ones((SIZE, SIZE), dtype=bool)
        for f in range(1, 4):
            still &= (v.frames[f] == v.frames[0]).all(-1)
        assert still.mean() > 0.5  # most of the picture is the unchanging background
        if v.question.startswith("how many objects"):
            assert v.answer == str(len(v.objects))


def test_run_the_video_task_on_the_qwen_shapes_geometry(tmp_path):
    """`vtoken run --task shapes-video`: 4-frame videos (2 temporal patches of 144 tokens) through HoliTom."""
    out = tmp_path / "v.jsonl"
    assert cli.main(["run", "--model", "tiny-qwen2vl-shapes", "--task", "shapes-video", "--reducer", "holitom",
                     "--keep", "0.25", "--param", "tau=0.5", "--limit", "4", "--batch-size", "2",
                     "--out", str(out)]) == 0
    holitom = json.loads(out.read_text().splitlines()[-1])
    assert holitom["config"]["task"] == "shapes-video" and holitom["config"]["reducer"] == "holitom"
    assert 60 <= holitom["metrics"]["visual_tokens"]["mean"] <= 80  # about a quarter of 288 (content-dependent)
    assert holitom["metrics"]["flops_pct"] < 100


@pytest.mark.parametrize("model,task,reducer,params,tokens", [
    ("tiny-qwen2.5vl-shapes", "shapes", "fastv", ["--keep", "32"], 144),  # 24x24 patches, merged 2x2
    ("tiny-qwen3vl-shapes", "shapes", "aim", ["--keep", "0.5"], 121),  # 16-px patches: 352 px, 11x11
    ("tiny-onevision-shapes", "shapes-video", "holitom", ["--keep", "0.25", "--param", "tau=0.5"], 4 * 144),
])
def test_run_on_every_family_by_name(tmp_path, model, task, reducer, params, tokens):
    """The built-in random model of each family runs the image or video task: at most the unreduced visual
    tokens (`tokens` per image or video) in every LLM layer, fewer in the last, fewer FLOPs."""
    out = tmp_path / "r.jsonl"
    assert cli.main(["run", "--model", model, "--task", task, "--reducer", reducer, *params, "--limit", "2",
                     "--batch-size", "2", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text().splitlines()[-1])["metrics"]
    per_layer = metrics["visual_tokens_per_layer"]  # mean tokens entering each LLM layer
    assert max(per_layer) <= tokens and per_layer[-1] < tokens and metrics["flops_pct"] < 100


def test_run_refuses_holitom_on_qwen3_videos(capsys):
    """A merge across frames cannot carry Qwen3-VL's per-frame deepstack rows: exit 2 with the reason."""
    assert cli.main(["run", "--model", "tiny-qwen3vl-shapes", "--task", "shapes-video", "--reducer", "holitom",
                     "--limit", "2", "--batch-size", "2"]) == 2
    assert "deepstack" in capsys.readouterr().err
