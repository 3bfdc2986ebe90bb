"""Shapes VQA: a deterministic procedural benchmark of (image, question, answer, category).

Images are 336x336 (24x24 patches of 14 px, the LLaVA-1.5 geometry) with a textured gradient
background and 1-9 objects (6 shapes, 8 colours, from under one patch to ~80 px across), some
carrying a letter or digit. Questions mirror real benchmarks, one category each:

    color     (GQA-like attribute)   "what color is the largest star?"         -> "red"
    shape                            "what shape is the blue object?"          -> "circle"
    count     (CountBench-like)      "how many triangles are there?"           -> "3"
    exist     (POPE-like, balanced)  "is there a green square?"                -> "yes" / "no"
    position  (relation)             "is the red star left or right of the blue circle?" -> "left"
    size      (comparison)           "is the red star bigger or smaller than the blue circle?" -> "bigger"
    text      (TextVQA-like, detail) "what is written on the yellow hexagon?"  -> "k"

Answers are single lower-case words, scored by exact match. Everything is drawn with numpy from a
`numpy.random.Generator` seeded by (seed, split, index), with a built-in bitmap font, so a sample is
identical on every machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from vtoken.eval.font import CHARACTERS, glyph

SIZE = 336
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PLURAL = {s: s + "s" for s in SHAPES}
CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "exist", "position", "size", "text")
SPLITS = {"train": 0, "val": 1, "test": 2}
SIZE_CLASSES = {"small": (4, 7), "medium": (10, 22), "large": (24, 40)}  # radius in px


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, centre (x, y) and radius in pixels, optional character."""

    shape: str
    color: str
    x: float
    y: float
    r: float
    char: str | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        return float(_mask(self, 0, 0, int(2 * self.r) + 4, int(2 * self.r) + 4, centered=True).sum())


@dataclass
class Sample:
    """One benchmark item. `image` is (336, 336, 3) uint8 RGB."""

    image: np.ndarray
    question: str
    answer: str
    category: str
    objects: list[Obj] = field(default_factory=list)
    uid: str = ""


# --- rendering ---------------------------------------------------------------------------------------


def _star_radius(angle: np.ndarray, r: float, inner: float = 0.45) -> np.ndarray:
    """Boundary radius of a 5-point star (one point up) along each angle."""
    seg = 2 * np.pi / 10
    a = np.mod(angle + np.pi / 2, 2 * seg)  # 0 at an outer vertex
    a = np.where(a > seg, 2 * seg - a, a)
    p_out = np.array([r, 0.0])
    p_in = np.array([inner * r * np.cos(seg), inner * r * np.sin(seg)])
    e = p_in - p_out
    num = p_out[0] * e[1] - p_out[1] * e[0]
    den = np.cos(a) * e[1] - np.sin(a) * e[0]
    return num / den


def _mask(o: Obj, x0: int, y0: int, w: int, h: int, centered: bool = False) -> np.ndarray:
    """Boolean mask of object `o` over the pixel box [x0, x0+w) x [y0, y0+h)."""
    ys, xs = np.ogrid[0:h, 0:w]
    ys, xs = ys.astype(np.float64), xs.astype(np.float64)
    if centered:
        dx, dy = xs + 0.5 - w / 2, ys + 0.5 - h / 2
    else:
        dx, dy = xs + x0 + 0.5 - o.x, ys + y0 + 0.5 - o.y
    r = o.r
    if o.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if o.shape == "square":
        s = 0.85 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if o.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if o.shape == "hexagon":
        c = np.sqrt(3) / 2
        return (np.abs(dy) <= c * r) & (c * np.abs(dx) + 0.5 * np.abs(dy) <= c * r)
    if o.shape == "triangle":
        rr = 1.15 * r  # circumradius; vertices up, bottom-left, bottom-right
        c = np.sqrt(3) / 2
        return (dy <= rr / 2) & (c * dx - 0.5 * dy <= rr / 2) & (-c * dx - 0.5 * dy <= rr / 2)
    if o.shape == "star":
        dist = np.sqrt(dx * dx + dy * dy)
        return dist <= _star_radius(np.arctan2(dy, dx), 1.2 * r)
    raise ValueError(o.shape)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted two-colour gradient in a random direction plus blotchy texture and faint stripes.

    Only IEEE basic arithmetic (no transcendental functions, no BLAS) touches the pixels, so the
    result is bit-identical on every platform. Returns (size, size, 3) uint8.
    """
    c0 = rng.uniform(70, 185, 3).astype(np.float32)[:, None, None]
    c1 = rng.uniform(70, 185, 3).astype(np.float32)[:, None, None]
    direction = rng.normal(size=2)
    direction = (direction / np.sqrt((direction**2).sum())).astype(np.float32)
    u = np.arange(size, dtype=np.float32) / np.float32(size - 1) - np.float32(0.5)
    t = (direction[0] * u[None, :] + direction[1] * u[:, None]) * np.float32(1.41) + np.float32(0.5)
    img = c0 + (c1 - c0) * np.clip(t, 0, 1)[None]  # (3, H, W)
    cells = rng.uniform(-22, 22, (3, 7, 7)).astype(np.float32)
    g = np.linspace(0, 6, size, dtype=np.float32)
    i0 = np.minimum(g.astype(np.int64), 5)
    f = g - i0.astype(np.float32)
    one = np.float32(1)
    cols = cells[:, :, i0] * (one - f) + cells[:, :, i0 + 1] * f  # (3, 7, W): separable bilinear upsampling
    img += cols[:, i0] * (one - f)[None, :, None] + cols[:, i0 + 1] * f[None, :, None]
    freq_x, freq_y = np.float32(rng.uniform(8, 20)), np.float32(rng.uniform(-6, 6))
    phase = (u[None, :] * freq_x + u[:, None] * freq_y) % np.float32(1.0)
    img += np.float32(12) * (np.abs(phase - np.float32(0.5)) - np.float32(0.25))  # triangle-wave stripes
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def glyph_scale(r: float) -> int:
    """Pixels per font dot of the character on an object of radius `r` (the 5x7 glyph spans 5s x 7s px)."""
    return max(1, int(r * 0.95) // 7)


def render(objects: list[Obj], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Draw the scene (background from `rng`, then each object and its character) as uint8 RGB."""
    img = _background(rng, size)
    for o in objects:
        x0, y0 = max(0, int(o.x - 1.3 * o.r) - 1), max(0, int(o.y - 1.3 * o.r) - 1)
        x1, y1 = min(size, int(o.x + 1.3 * o.r) + 2), min(size, int(o.y + 1.3 * o.r) + 2)
        m = _mask(o, x0, y0, x1 - x0, y1 - y0)
        img[y0:y1, x0:x1][m] = COLORS[o.color]
        if o.char is not None:
            scale = glyph_scale(o.r)
            g = np.kron(glyph(o.char), np.ones((scale, scale), dtype=bool))
            gh, gw = g.shape
            gx, gy = round(o.x - gw / 2), round(o.y - gh / 2)
            lum = np.dot(COLORS[o.color], (0.299, 0.587, 0.114))
            ink = (0, 0, 0) if lum > 120 else (255, 255, 255)
            img[gy:gy + gh, gx:gx + gw][g] = ink
    return img


# --- scenes ------------------------------------------------------------------------------------------


def _place(rng: np.random.Generator, n: int, size: int, text_p: float) -> list[Obj]:
    objs: list[Obj] = []
    tries = 0
    while len(objs) < n and tries < 400:
        tries += 1
        cls = rng.choice(["small", "medium", "large"], p=[0.3, 0.45, 0.25])
        lo, hi = SIZE_CLASSES[str(cls)]
        r = float(rng.uniform(lo, hi))
        m = 1.25 * r + 3
        x, y = float(rng.uniform(m, size - m)), float(rng.uniform(m, size - m))
        if any((x - o.x) ** 2 + (y - o.y) ** 2 < (1.25 * (r + o.r) + 4) ** 2 for o in objs):
            continue
        char = str(rng.choice(CHARACTERS)) if r >= 12 and rng.random() < text_p else None
        objs.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), x, y, r, char))
    return objs


def _unique(objs: list[Obj], key) -> list[Obj]:
    """Objects whose `key` value occurs once in the scene."""
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def _question(cat: str, objs: list[Obj], rng: np.random.Generator) -> tuple[str, str] | None:
    """A (question, answer) of category `cat` about `objs`, or None if the scene cannot support one."""
    named = _unique(objs, lambda o: o.name)
    if cat == "color":
        by_shape = _unique(objs, lambda o: o.shape)
        if by_shape and rng.random() < 0.5:
            o = by_shape[rng.integers(len(by_shape))]
            return f"what color is the {o.shape}?", o.color
        shapes = [s for s in SHAPES if sum(o.shape == s for o in objs) >= 2]
        if not shapes:
            return None
        s = shapes[rng.integers(len(shapes))]
        group = sorted((o for o in objs if o.shape == s), key=lambda o: o.r)
        if rng.random() < 0.5 and group[-1].r >= 1.3 * group[-2].r:
            return f"what color is the largest {s}?", group[-1].color
        if group[1].r >= 1.3 * group[0].r:
            return f"what color is the smallest {s}?", group[0].color
        return None
    if cat == "shape":
        by_color = _unique(objs, lambda o: o.color)
        if not by_color:
            return None
        o = by_color[rng.integers(len(by_color))]
        return f"what shape is the {o.color} object?", o.shape
    if cat == "count":
        kind = rng.integers(3)
        if kind == 0:
            return "how many objects are there?", str(len(objs))
        if kind == 1:
            s = SHAPES[rng.integers(len(SHAPES))]
            return f"how many {PLURAL[s]} are there?", str(sum(o.shape == s for o in objs))
        c = list(COLORS)[rng.integers(len(COLORS))]
        return f"how many {c} objects are there?", str(sum(o.color == c for o in objs))
    if cat == "exist":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[rng.integers(len(present))]
            return f"is there a {c} {s}?", "yes"
        o = objs[rng.integers(len(objs))]  # near miss: keep one attribute of a present object
        for _ in range(20):
            c = o.color if rng.random() < 0.5 else list(COLORS)[rng.integers(len(COLORS))]
            s = o.shape if c != o.color else SHAPES[rng.integers(len(SHAPES))]
            if (c, s) not in present:
                return f"is there a {c} {s}?", "no"
        return None
    if cat in ("position", "size", "text"):
        if cat == "text":
            cands = [o for o in named if o.char is not None]
            if not cands:
                return None
            o = cands[rng.integers(len(cands))]
            return f"what is written on the {o.name}?", o.char.lower()
        if len(named) < 2:
            return None
        i, j = rng.choice(len(named), 2, replace=False)
        a, b = named[i], named[j]
        if cat == "size":
            big, small = (a, b) if a.r > b.r else (b, a)
            if big.r < 1.4 * small.r:
                return None
            return f"is the {a.name} bigger or smaller than the {b.name}?", "bigger" if a is big else "smaller"
        if rng.random() < 0.5:
            if abs(a.x - b.x) < 20:
                return None
            return f"is the {a.name} left or right of the {b.name}?", "left" if a.x < b.x else "right"
        if abs(a.y - b.y) < 20:
            return None
        return f"is the {a.name} above or below the {b.name}?", "above" if a.y < b.y else "below"
    raise ValueError(f"unknown category {cat!r}")


def sample(split: str, index: int, seed: int = 0, category: str | None = None, size: int = SIZE) -> Sample:
    """Item `index` of `split` ("train" / "val" / "test"); its category cycles through CATEGORIES."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    cat = category or CATEGORIES[index % len(CATEGORIES)]
    for attempt in range(100):
        rng = np.random.default_rng([seed, SPLITS[split], index, attempt])
        n = int(rng.integers(1, 10))
        objs = _place(rng, n, size, text_p=0.9 if cat == "text" else 0.35)
        qa = _question(cat, objs, rng) if objs else None
        if qa is not None:
            image = render(objs, rng, size)
            return Sample(image, qa[0], qa[1], cat, objs, uid=f"{split}-{seed}-{index}")
    raise RuntimeError(f"could not build a {cat} question for {split}/{index}")


class ShapesVQA:
    """A split of the benchmark as a sequence of `Sample`s (generated on access, deterministic)."""

    def __init__(self, split: str = "test", n: int = 1000, seed: int = 0, size: int = SIZE) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.split, self.n, self.seed, self.size = split, n, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return sample(self.split, i, self.seed, size=self.size)


VIDEO_CATEGORIES = ("color", "shape", "count", "exist")  # questions a moving scene leaves true in every frame


@dataclass
class VideoSample:
    """One moving-shapes item: `frames` is (F, size, size, 3) uint8 RGB; `objects` are frame 0's."""

    frames: np.ndarray
    question: str
    answer: str
    category: str
    objects: list[Obj] = field(default_factory=list)
    uid: str = ""


def _moves(rng: np.random.Generator, objs: list[Obj], frames: int, size: int) -> list[tuple[float, float]] | None:
    """A constant velocity (px per frame) per object that keeps it inside the image in every frame."""
    out = []
    for o in objs:
        m = 1.25 * o.r + 3
        for _ in range(20):
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(6, 14)
            vx, vy = speed * np.cos(angle), speed * np.sin(angle)
            ex, ey = o.x + vx * (frames - 1), o.y + vy * (frames - 1)
            if m <= ex <= size - m and m <= ey <= size - m:
                out.append((float(vx), float(vy)))
                break
        else:
            return None
    return out


def video_sample(split: str, index: int, seed: int = 0, frames: int = 4, size: int = SIZE,
                 category: str | None = None) -> VideoSample:
    """Item `index` of the moving-shapes video task: a scene whose objects glide at constant speeds over
    `frames` frames (the background stays), with a question that holds in every frame (colour, shape,
    count, existence; the image task's vocabulary). A video smoke test for the runner, not a benchmark
    of temporal reasoning."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    cat = category or VIDEO_CATEGORIES[index % len(VIDEO_CATEGORIES)]
    for attempt in range(100):
        rng = np.random.default_rng([seed, SPLITS[split], index, attempt, frames])
        objs = _place(rng, int(rng.integers(1, 7)), size, text_p=0.0)
        moves = _moves(rng, objs, frames, size) if objs else None
        qa = _question(cat, objs, rng) if moves is not None else None
        if qa is None:
            continue
        state = rng.bit_generator.state  # every frame draws the same background
        video = []
        for f in range(frames):
            rng.bit_generator.state = state
            moved = [dataclasses.replace(o, x=o.x + vx * f, y=o.y + vy * f) for o, (vx, vy) in zip(objs, moves)]
            video.append(render(moved, rng, size))
        return VideoSample(np.stack(video), qa[0], qa[1], cat, objs, uid=f"video-{split}-{seed}-{index}")
    raise RuntimeError(f"could not build a {cat} video question for {split}/{index}")


class ShapesVideoQA:
    """A split of the moving-shapes video task (generated on access, deterministic)."""

    def __init__(self, split: str = "test", n: int = 100, seed: int = 0, frames: int = 4, size: int = SIZE) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.split, self.n, self.seed, self.frames, self.size = split, n, seed, frames, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> VideoSample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return video_sample(self.split, i, self.seed, self.frames, self.size)


def vocabulary() -> list[str]:
    """Every word that can appear in a question or an answer (for a word-level tokenizer)."""
    words = {"what", "color", "is", "the", "largest", "smallest", "shape", "object", "how", "many", "are",
             "there", "objects", "a", "bigger", "or", "smaller", "than", "left", "right", "of", "above",
             "below", "written", "on", "yes", "no", "?"}
    words |= set(COLORS) | set(SHAPES) | set(PLURAL.values()) | {str(i) for i in range(10)}
    words |= {c.lower() for c in CHARACTERS}
    return sorted(words)
