"""The reducer contract: what a reducer declares (stage, signals, budget) and computes (a Selection).

A reducer is a dataclass registered by name. It never touches a model module: the adapter hands it a
`StageInput` (the visual tokens of every image at one point of the model, with the signals it asked
for) and applies the `Selection` it returns through the token ledger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from vtoken.budget import Keep, check_keep, resolve_keep
from vtoken.errors import ParameterError, SignalError

Stage = Literal["encoder", "boundary", "decoder", "attention"]
STAGE_ORDER: dict[str, int] = {"encoder": 0, "boundary": 1, "decoder": 2, "attention": 3}


@dataclass(frozen=True)
class SignalRequest:
    """A quantity a reducer needs, computed by the adapter only when some reducer asks for it.

    kind:
      - ``"llm_attention"``: attention probability each sequence row receives at LLM layer `layer`
        (0-based), mean over heads, from the query rows named by `query` (``"last"``: the last prompt
        token; ``"instruction"``: the text after the last image). Computed on a side path from that
        layer's q/k with its RoPE, so the model keeps its attention kernel.
    """

    kind: str
    layer: int
    query: str = "last"


@dataclass
class Selection:
    """What a reducer returns for each image: which tokens survive, and (for merges) their new content.

    keep:   (n_img, N) bool; exactly the per-image budget is True (never a padded slot).
    values: (n_img, N, d) replacement features, read at kept slots only (None: unchanged).
    sizes:  (n_img, N) how many original tokens each survivor stands for (None: unchanged).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    sizes: torch.Tensor | None = None


@dataclass
class StageInput:
    """The visual tokens of every image in the batch at one reduction point, padded to N = max count.

    features:  (n_img, N, d) the tokens (projected features at the boundary, hidden states in the LLM).
    valid:     (n_img, N) bool, False for padded slots (images with fewer tokens).
    positions: (n_img, N) long, raster index of each token in its image's original grid.
    sizes:     (n_img, N) float, original tokens each token stands for (1 unless merged before).
    grids:     per image, its original (rows, cols) grid.
    keep:      per image, how many tokens the reducer must keep.
    """

    features: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    grids: list[tuple[int, int]]
    keep: list[int]
    _signal: Callable[[SignalRequest], torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]

    def signal(self, request: SignalRequest) -> torch.Tensor:
        """The requested signal for these tokens, (n_img, N), aligned with `features`."""
        if self._signal is None:
            raise SignalError(f"no signals are available at this point; {request} was not captured")
        return self._signal(request)

    def keep_tensor(self) -> torch.Tensor:
        """Per-image budget as a (n_img,) long tensor on the features' device."""
        return torch.tensor(self.keep, device=self.features.device, dtype=torch.long)


@dataclass
class Reducer:
    """Base class of all reducers.

    Common parameters:
      keep:     visual tokens per image that survive this reducer: an int, or a float fraction of the
                tokens the image has when it reaches this reducer.
      renumber: give the survivors (and every later token) compact position ids instead of their
                original ones (default False: kept tokens keep their original position ids).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = "boundary"
    keep: Keep | None = None
    renumber: bool = False

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if not isinstance(self.renumber, bool):
            raise ParameterError(f"{self.name}: renumber must be True or False, got {self.renumber!r}")

    # --- what the reducer declares -------------------------------------------------------------
    @property
    def layer(self) -> int | None:
        """LLM layer index (0-based) before which a decoder-stage reducer acts; None otherwise."""
        return None

    def signals(self) -> tuple[SignalRequest, ...]:
        """Signals this reducer reads; the adapter captures exactly these."""
        return ()

    def budget(self, n: int) -> int:
        """Tokens to keep for an image that has `n` tokens when it reaches this reducer."""
        if self.keep is None:
            raise ParameterError(f"{self.name}: no budget given; pass keep=<int tokens or float fraction>")
        return resolve_keep(self.keep, n)

    def static_count(self, n: int) -> int | None:
        """Tokens left for an image of `n` tokens if that count is fixed in advance (None if adaptive)."""
        return self.budget(n)

    # --- what the reducer computes -------------------------------------------------------------
    def select(self, x: StageInput) -> Selection:
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the reducer, its stage and its parameters."""
        params = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.init
        )
        where = f"{self.stage}" + (f" @ LLM layer {self.layer}" if self.layer is not None else "")
        return f"{self.name}({params}) [{where}]"


def build(cls: type[Reducer], params: dict[str, Any]) -> Reducer:
    """Instantiate a reducer class, turning unknown parameter names into a ParameterError."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in params if k not in names]
    if unknown:
        from vtoken.errors import close_names

        hints = "".join(close_names(k, names) for k in unknown)
        raise ParameterError(
            f"{cls.name} has no parameter {', '.join(map(repr, unknown))}.{hints} "
            f"Its parameters: {', '.join(names)}."
        )
    return cls(**params)
