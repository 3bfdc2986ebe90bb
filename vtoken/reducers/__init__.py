"""Built-in reducers; importing this package registers them."""

from vtoken.reducers.aim import AIM, AIMMerge, AIMPrune
from vtoken.reducers.base import Reducer, Selection, SignalRequest, StageInput
from vtoken.reducers.divprune import DivPrune
from vtoken.reducers.dymu import DyMU
from vtoken.reducers.fastv import FastV
from vtoken.reducers.hiprune import HiPrune
from vtoken.reducers.holitom import HoliTom, HoliTomInner, HoliTomMerge
from vtoken.reducers.none import Identity
from vtoken.reducers.pitome import PiToMe
from vtoken.reducers.pool import Pool
from vtoken.reducers.random import RandomPrune
from vtoken.reducers.todre import ToDRE, ToDREDiversity, ToDRERelevance
from vtoken.reducers.tome import ToMe
from vtoken.reducers.transprune import TransPrune
from vtoken.reducers.visionzip import VisionZip

__all__ = [
    "AIM",
    "AIMMerge",
    "AIMPrune",
    "DivPrune",
    "DyMU",
    "FastV",
    "HiPrune",
    "HoliTom",
    "HoliTomInner",
    "HoliTomMerge",
    "Identity",
    "PiToMe",
    "Pool",
    "RandomPrune",
    "Reducer",
    "Selection",
    "SignalRequest",
    "StageInput",
    "ToDRE",
    "ToDREDiversity",
    "ToDRERelevance",
    "ToMe",
    "TransPrune",
    "VisionZip",
]
