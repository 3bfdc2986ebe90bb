"""Every transformers name vtoken relies on, in one place, resolved once per model at patch time.

transformers renames call arguments between releases (5.24 renamed `past_key_values` to `cache` in
every model, decoder-layer, attention and mask-builder signature, and the output field with it;
5.23 added `mm_encoder_outputs`). vtoken never spells such a name anywhere else: adapters ask this
module, which reads the installed release's signatures and attributes (`probe`). A probe that fails
raises `UnsupportedModelError` at patch time, naming the installed version and what is missing,
instead of a silent pass-through or a late shape error. Only this module imports transformers
internals (ruff's banned-api rule TID251 enforces it for the rest of the package).

Tested range: `TESTED` (docs/compat.md says how to widen it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask as _create_causal_mask

from vtoken.errors import UnsupportedModelError

VERSION = transformers.__version__
TESTED = ("5.17.0", "5.25.0")  # oldest and newest release the CI matrix runs
CACHE_NAMES = ("cache", "past_key_values")  # current name first, then the deprecated alias (until 5.40)
# inputs that carry images or videos (generate() forwards them on the first step of a continuation)
VISION_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                 "mm_encoder_outputs")
# per-token inputs sliced with input_ids
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")


def _missing(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"vtoken cannot use this model with the installed transformers {VERSION}: {what}. vtoken is tested "
        f"with transformers {TESTED[0]}..{TESTED[1]}; install a release in that range "
        f"(pip install 'transformers>={TESTED[0]},<5.26') or see docs/compat.md"
    )


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        raise _missing(f"cannot read the signature of {getattr(fn, '__qualname__', fn)}") from e


def _named(fn: Callable[..., Any], name: str, where: str) -> str:
    if name not in _params(fn):
        raise _missing(f"{where} takes no `{name}` argument")
    return name


def _cache_param(fn: Callable[..., Any], where: str) -> str:
    """The name under which `fn` takes the KV cache ('cache' from 5.24 on, 'past_key_values' before)."""
    params = _params(fn)
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise _missing(f"{where} takes no KV cache argument (looked for {' / '.join(CACHE_NAMES)})")


def find_cache(kwargs: dict[str, Any], name: str) -> Any:
    """The KV cache in one call's keyword arguments, or None when the call has none.

    Read under `name` (the probed argument) or its alias; a `Cache` found under any other key means
    transformers renamed the argument again, which must not pass as "no cache" (a decode step would
    be taken for a prefill): it raises instead.
    """
    keys = (name, *(k for k in CACHE_NAMES if k != name))  # a plain tuple: torch.compile traces it (no dict iterator)
    found = [k for k in keys if kwargs.get(k) is not None]
    if len(found) > 1:
        raise UnsupportedModelError(f"the call passes the KV cache twice ({', '.join(sorted(found))}); pass it once")
    if found:
        return kwargs[found[0]]
    stray = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if stray:
        raise _missing(f"the KV cache arrived as `{stray[0]}`, a name vtoken does not know")
    return None


def cache_key(kwargs: dict[str, Any], name: str) -> str:
    """The key the caller used for the cache (so a rewritten call keeps the caller's spelling)."""
    return next((k for k in CACHE_NAMES if kwargs.get(k) is not None), name)


@dataclass(frozen=True)
class LMNames:
    """Argument names of one VLM's forward, its language model and decoder layers, probed."""

    version: str
    top_cache: str  # the VLM's forward
    lm_cache: str  # the language model's forward
    layer_cache: str  # a decoder layer's forward
    mask_cache: str  # create_causal_mask
    output_cache: str  # the output field holding the cache
    mm_encoder_outputs: str | None  # pre-computed vision outputs (5.23+), else None
    logits_to_keep: str | None
    rope: Callable[..., Any]  # apply_rotary_pos_emb of the LLM's attention module

    def cache(self, kwargs: dict[str, Any], where: str = "top") -> Any:
        """The KV cache of a call of the VLM ("top"), its language model ("lm") or a decoder layer ("layer")."""
        name = self.layer_cache if where == "layer" else self.lm_cache if where == "lm" else self.top_cache
        return find_cache(kwargs, name)

    def output_cache_of(self, output: Any) -> Any:
        """The cache of a model output (never the deprecated alias, which warns)."""
        if dataclasses.is_dataclass(output) and self.output_cache not in {f.name for f in dataclasses.fields(output)}:
            raise _missing(f"{type(output).__name__} has no `{self.output_cache}` field")
        return getattr(output, self.output_cache)

    def causal_mask(self, config: Any, inputs_embeds: Any, attention_mask: Any, cache: Any,
                    position_ids: Any = None, layer_idx: int | None = None) -> Any:
        """transformers' own `create_causal_mask` (native eager / SDPA / flash / flex formats)."""
        return _create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, layer_idx=layer_idx, **{self.mask_cache: cache})

    def pre_computed_vision(self, inputs: dict[str, Any], modality: str = "image") -> Any:
        """The pre-computed encoder output of `modality` that generate() passes from 5.23 on, or None."""
        if self.mm_encoder_outputs is None:
            return None
        return (inputs.get(self.mm_encoder_outputs) or {}).get(modality)


def module_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A function defined in the modeling file of `module`'s class (e.g. its rotary helper)."""
    fn = getattr(sys.modules[type(module).__module__], name, None)
    if not callable(fn):
        raise _missing(f"{type(module).__module__} defines no `{name}`")
    return fn


def probe(model: nn.Module, lm: nn.Module, layer: nn.Module) -> LMNames:
    """Resolve the names for one VLM (`model`), its language model `lm` and one decoder `layer`."""
    top = model.forward
    params = _params(top)
    var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "return_dict"):
        if name not in params and not var_kwargs:
            raise _missing(f"{type(model).__name__}.forward takes no `{name}`")
    for name in ("inputs_embeds", "attention_mask", "position_ids"):
        _named(lm.forward, name, f"{type(lm).__name__}.forward")
    for name in ("hidden_states", "attention_mask", "position_embeddings"):
        _named(layer.forward, name, f"{type(layer).__name__}.forward")
    top_cache = _cache_param(top, f"{type(model).__name__}.forward")
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise _missing(f"{type(layer).__name__} has no `self_attn`")
    return LMNames(
        version=VERSION,
        top_cache=top_cache,
        lm_cache=_cache_param(lm.forward, f"{type(lm).__name__}.forward"),
        layer_cache=_cache_param(layer.forward, f"{type(layer).__name__}.forward"),
        mask_cache=_cache_param(_create_causal_mask, "create_causal_mask"),
        output_cache=top_cache,  # transformers names the output field as the argument
        mm_encoder_outputs="mm_encoder_outputs" if "mm_encoder_outputs" in params else None,
        logits_to_keep="logits_to_keep" if "logits_to_keep" in params else None,
        rope=module_function(attn, "apply_rotary_pos_emb"),
    )


def attribute(obj: Any, path: str, family: str) -> Any:
    """`obj.<path>` (dotted), or UnsupportedModelError naming the family's missing part."""
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise _missing(f"the {family} model has no `{path}` (no `{part}` on {type(cur).__name__})")
        cur = getattr(cur, part)
    return cur


# --- family helpers (resolved by the adapters at patch time) ----------------------------------------


def qwen_vision_rope(attn: nn.Module) -> Callable[..., Any]:
    """Qwen2-VL / 2.5-VL: the vision tower's 2-D rotary helper."""
    return module_function(attn, "apply_rotary_pos_emb_vision")


def vision_window_index() -> Callable[..., Any]:
    """Qwen2.5-VL: the window permutation of the packed tower (`get_vision_window_index`)."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError as e:
        raise _missing("transformers.vision_utils.get_vision_window_index is missing") from e
    return get_vision_window_index


@dataclass(frozen=True)
class AnyresHelpers:
    """The anyres layout functions of LLaVA-NeXT (or a family that defines its own: LLaVA-OneVision)."""

    grid_shape: Callable[..., Any]
    num_patches: Callable[..., Any]
    unpad: Callable[..., Any]


def anyres_helpers(family: str = "llava_next") -> AnyresHelpers:
    try:
        m = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError as e:
        raise _missing(f"transformers.models.{family} is missing") from e
    try:
        return AnyresHelpers(m.get_anyres_image_grid_shape, m.image_size_to_num_patches, m.unpad_image)
    except AttributeError as e:
        raise _missing(f"the anyres helper {e.name} of {family} is missing") from e


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register an attention function under `name` (transformers' AttentionInterface)."""
    AttentionInterface.register(name, fn)


def unregister_attention(name: str) -> None:
    """Remove a registered attention function (the global mapping is transformers')."""
    mapping = getattr(AttentionInterface, "_global_mapping", None)
    if isinstance(mapping, dict):
        mapping.pop(name, None)


def seq_length(cache: Any, layer: int | None = None) -> int:
    """Tokens a KV cache holds (in `layer`). A static cache keeps the count in a device tensor (read
    back here: a host sync, paid in its cached steps only); a dynamic cache's is a shape."""
    n = cache.get_seq_length() if layer is None else cache.get_seq_length(layer)
    return int(n)


def keep_2d_mask(config: Any, inputs_embeds: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for the model's `create_masks_for_generate` while patched: generate() would build a 4-D
    mask in advance for a static cache, but vtoken re-slices the 2-D padding mask for the reduced rows;
    the language model then builds its own 4-D mask, as it does with a dynamic cache."""
    return attention_mask
