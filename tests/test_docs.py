"""The documented switches to the authors' behaviour (docs/deviations.md) exist on the reducers named."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vtoken

DEVIATIONS = Path(__file__).resolve().parents[1] / "docs" / "deviations.md"
SETTING = re.compile(r"`(\w+)=(\"[^\"]*\"|True|False|-?\d+(?:\.\d+)?)`")


def _rows() -> list[tuple[list[str], list[tuple[str, object]]]]:
    rows = []
    for line in DEVIATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        names = [n for n in re.findall(r"`(\w+)`", cells[0]) if n in vtoken.available()]
        rows.append((names, [(k, ast.literal_eval(v)) for k, v in SETTING.findall(cells[4])]))
    return rows


def test_every_documented_switch_is_a_parameter_of_its_reducer():
    rows = _rows()
    assert len(rows) >= 10 and all(names for names, _ in rows), "the table's rows name registered reducers"
    checked = 0
    for names, settings in rows:
        for name in names:
            for key, value in settings:
                reducer = vtoken.get(name)(**{key: value})
                assert getattr(reducer, key) == value, (name, key)
                checked += 1
    assert checked >= 6  # hiprune wrap, transprune renumber / abs_direction, vtu on the three mergers
