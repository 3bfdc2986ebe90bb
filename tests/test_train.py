"""The CPU training recipe (eval/train_cpu.py) and model loading by Hub id (no network touched)."""

from __future__ import annotations

import socket

import pytest
import torch

from vtoken.eval import cli, models


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
            "--vision-steps", str(steps[0]), "--llm-steps", str(steps[1]), "--joint-steps", str(steps[2]),
            "--vision-batch", "2", "--batch", "2", "--qa", "2", "--warmup", "1", "--eval", "0", "--log-every", "1",
            *extra]


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
    assert next(model.parameters()).dtype == torch.float32  # load() casts the bf16 file to the asked dtype
    from vtoken.eval import runner

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
