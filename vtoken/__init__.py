"""vtoken: training-free visual token reduction (merging and pruning) for vision-language models.

    import vtoken
    vtoken.patch(model, "fastv", keep=64)   # then use the model exactly as before
"""

from vtoken import flops
from vtoken.errors import (
    AlreadyPatchedError,
    BudgetError,
    LayoutError,
    ParameterError,
    SignalError,
    UnknownReducerError,
    UnsupportedModelError,
    VTokenError,
)
from vtoken.patch import Patch, patch, patched, unpatch
from vtoken.reducers.base import ModelInfo, Reducer, Selection, SignalRequest, StageInput
from vtoken.registry import available, get, register
from vtoken.stats import Stats

__version__ = "0.1.0"

__all__ = [
    "AlreadyPatchedError",
    "BudgetError",
    "LayoutError",
    "ModelInfo",
    "ParameterError",
    "Patch",
    "Reducer",
    "Selection",
    "SignalError",
    "SignalRequest",
    "StageInput",
    "Stats",
    "UnknownReducerError",
    "UnsupportedModelError",
    "VTokenError",
    "available",
    "flops",
    "get",
    "patch",
    "patched",
    "register",
    "unpatch",
]
