"""lmms-eval integration: `--model vtoken` wraps lmms-eval's own model classes and patches their model.

    lmms-eval --model vtoken \\
        --model_args base=llava_hf,pretrained=PATH,reducer=hiprune,keep=64,stats_out=runs/stats.jsonl \\
        --tasks mme --device cuda --output_path runs/lmms

`base` names an lmms-eval model (llava_hf — also LLaVA-NeXT / OneVision checkpoints —, qwen2_vl,
qwen2_5_vl, qwen3_vl, ...; its simple class) that holds a Hugging Face transformers model: lmms-eval's
`llava` and `llava_onevision` wrappers run the original LLaVA(-NeXT) code base (the `llava` package)
and are refused, with llava_hf named in their place (docs/lmms-eval.md). Every model arg that is a
parameter of the reducer goes to the reducer; the rest go to the base model unchanged, so every
lmms-eval task works as with the base.
Requests are served one at a time so that vtoken's statistics (visual tokens entering the LLM,
FLOPs by part, reducer time) are recorded per document; with `stats_out` they are written as JSONL
next to lmms-eval's results. Generated text is trimmed by the base class with the *original* prompt
length (generate returns the original prompt followed by the new tokens), and log-likelihood scoring
keeps the context alone in charge of text-conditioned reductions (the continuation's labels mark
where it starts).

Registered through the `lmms_eval.models` entry point (`manifest`); lmms-eval is the optional extra
`vtoken[lmms]`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import vtoken


def manifest():
    """The entry point lmms-eval reads to find `--model vtoken`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtoken", simple_class_path="vtoken.eval.lmms.VTokenModel")


# lmms-eval wrappers whose model comes from the original LLaVA / LLaVA-NeXT code base (`from llava.model.builder
# import load_pretrained_model`), not from transformers: nothing vtoken can patch. llava_hf loads the transformers
# checkpoints of both families (llava-hf/llava-1.5-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf).
LLAVA_PACKAGE_BASES = ("llava", "llava_onevision")


def _base_class():
    from lmms_eval.api.model import lmms

    return lmms


class VTokenModel(_base_class()):  # type: ignore[misc]
    """An lmms-eval model that runs another lmms-eval model with a vtoken reducer patched in."""

    is_simple = True

    def __init__(self, base: str = "llava_hf", reducer: str | None = "none", stats_out: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from lmms_eval.models import get_model

        if base in LLAVA_PACKAGE_BASES:
            raise ValueError(
                f"base={base}: lmms-eval's {base} wrapper runs the original LLaVA-NeXT `llava` package's model, "
                "not a Hugging Face transformers model vtoken can patch; use base=llava_hf with a transformers "
                "checkpoint (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf, llava-hf/llava-1.5-7b-hf)")

        try:
            cls = vtoken.get(reducer) if reducer else None
        except vtoken.UnknownReducerError as e:
            raise ValueError(str(e)) from None
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        params = {k: v for k, v in kwargs.items() if k in fields}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
        if "batch_size" in base_kwargs:
            base_kwargs["batch_size"] = int(base_kwargs["batch_size"])
        base_cls = get_model(base, force_simple=True)
        accepts = inspect.signature(base_cls.__init__).parameters
        if "device_map" in accepts and "device_map" not in base_kwargs and "device" in base_kwargs:
            # the wrappers' default device maps ("" / "cuda") fail or ignore --device under transformers 5
            base_kwargs["device_map"] = str(base_kwargs["device"])
        self.inner = base_cls(**base_kwargs)
        hf_model = getattr(self.inner, "_model", None) or self.inner.model
        self.patch = vtoken.patch(hf_model, reducer, **params) if reducer else None
        self.base, self.reducer, self.params = base, reducer, params
        self.stats_out = Path(stats_out) if stats_out else None
        self.records: list[dict[str, Any]] = []
        if self.stats_out is not None:
            self.stats_out.parent.mkdir(parents=True, exist_ok=True)
            self.stats_out.write_text("")

    # lmms-eval reads these from the model
    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "patch"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def _sync_task_dict(self) -> None:
        self.inner.task_dict = self.task_dict

    def _serve(self, method: str, requests: list[Any]) -> list[Any]:
        self._sync_task_dict()
        out = []
        for req in requests:
            res = getattr(self.inner, method)([req])
            out.extend(res)
            self._record(req)
        return out

    def _record(self, req: Any) -> None:
        if self.patch is None:
            return
        st = self.patch.stats
        rec = {
            "task": req.task_name, "doc_id": req.doc_id, "request": req.request_type,
            "reducer": self.reducer, "params": self.params,
            "visual_tokens": st.visual_tokens, "visual_tokens_last_layer": (st.visual_per_layer or [[]])[-1],
            "flops": st.flops, "reducer_seconds": st.overhead_s,
        }
        self.records.append(rec)
        if self.stats_out is not None:
            with self.stats_out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def generate_until(self, requests: list[Any]) -> list[str]:
        return self._serve("generate_until", requests)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        return self._serve("loglikelihood", requests)

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        return self._serve("generate_until_multi_round", requests)


# --- the offline Shapes task -------------------------------------------------------------------------

TASK_YAML = """\
task: vtoken_shapes
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: data/test.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.1
"""

TASK_UTILS = '''"""vtoken_shapes: Shapes VQA (vtoken.eval.shapes) as an offline lmms-eval task."""

import io

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(io.BytesIO(doc["image"]["bytes"] if isinstance(doc["image"], dict) else doc["image"]))
            .convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    words = results[0].strip().lower().split()
    pred = words[0].strip(".?!,") if words else ""
    return {"exact_match": float(pred == doc["answer"])}
'''


def export_task(out: str | Path, limit: int = 200, seed: int = 0, split: str = "test") -> Path:
    """Write an lmms-eval task directory for Shapes VQA: YAML, utils.py and data/test.parquet."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vtoken.eval.shapes import ShapesVQA

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[Any]] = {"id": [], "image": [], "question": [], "answer": [], "category": []}
    ds = ShapesVQA(split, n=limit, seed=seed)
    for i in range(limit):
        s = ds[i]
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG")
        rows["id"].append(s.uid)
        rows["image"].append({"bytes": buf.getvalue(), "path": f"{s.uid}.png"})
        rows["question"].append(s.question)
        rows["answer"].append(s.answer)
        rows["category"].append(s.category)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({k: pa.array(v, type=image_type if k == "image" else None) for k, v in rows.items()})
    pq.write_table(table, out / "data" / "test.parquet")
    (out / "vtoken_shapes.yaml").write_text(TASK_YAML)
    (out / "utils.py").write_text(TASK_UTILS)
    return out


def find_results(output_path: str | Path) -> Path | None:
    """The newest `*_results.json` lmms-eval wrote under `output_path` (None if evaluation failed)."""
    found = sorted(Path(output_path).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
