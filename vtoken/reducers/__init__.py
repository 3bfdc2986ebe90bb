"""Built-in reducers; importing this package registers them."""

from vtoken.reducers.base import Reducer, Selection, SignalRequest, StageInput
from vtoken.reducers.fastv import FastV
from vtoken.reducers.pool import Pool
from vtoken.reducers.random import RandomPrune

__all__ = ["FastV", "Pool", "RandomPrune", "Reducer", "Selection", "SignalRequest", "StageInput"]
