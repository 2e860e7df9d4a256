"""Shapes world: small coloured shapes on textured backgrounds, with captions and QA from a closed vocabulary.

Every item is a pure function of (seed, index, kind, config). Objects are deliberately small (6-14 px on a
64 px frame) so that dropping visual tokens can lose them, and every question needs the image: answers are
balanced (yes/no, motion, order) or drawn uniformly (colours, positions), never readable from the question.

Conventions a trainer must know:

* Positions are the 3x3 grid cell of an object's centre: "top left", "top", ..., "bottom right".
  Centres keep a margin from the grid lines, so the cell is never ambiguous.
* In videos an object's position is its position at its appearance frame (frame 0 for most objects);
  position questions say "appear" / "first appears" to match. Relation yes/no questions for videos only
  compare objects visible from frame 0 whose relation holds in every frame.
* Late objects appear only at frames ``sample_frame_indices(T, config.order_frames)[1:-1]``, so "order"
  questions are answerable from those uniformly sampled frames. The order answer is the full
  "<colour> <shape>" name of the object (two words), as written in the question.
* Count questions about a video count every object that appears at any point in it.
* Answers (see answer_set()): colour names; counts as words "zero".."four"; grid cells; "yes"/"no"; shape
  names (for "what shape is left of the X ?"); motions "left"/"right"/"up"/"down"/"still"; and, for order,
  "<colour> <shape>".
"""

from __future__ import annotations

import colorsys
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 20),
    "purple": (150, 45, 205),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Row-major 3x3 grid cells.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "grainy", "shaded")
STRIPE_ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
# Counts are answered in words; four is the most objects an item can hold (see WorldConfig).
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

IMAGE_QUESTION_TYPES: tuple[str, ...] = ("colour", "count", "position", "relation", "yesno")
VIDEO_QUESTION_TYPES: tuple[str, ...] = IMAGE_QUESTION_TYPES + ("motion", "order")
QUESTION_TYPES = VIDEO_QUESTION_TYPES

KIND_CODES = {"image": 0, "video": 1}
_ID_PREFIX = {"image": "img", "video": "vid"}
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_WHERE = {  # how a caption says "at" a grid cell
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# (axis, whether the first object has the smaller coordinate) -> phrasings; y grows downwards.
_RELATIONS: dict[tuple[int, bool], tuple[str, ...]] = {
    (0, True): ("left of", "to the left of"),
    (0, False): ("right of", "to the right of"),
    (1, True): ("above",),
    (1, False): ("below",),
}
_LATER = ("later", "after that")  # first and second group of late objects in a caption

# Every sentence the world writes. vocabulary() reads its words from here, so new phrasings stay closed.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "intro": (
        "there {be} {n} {objects} on a {bg} background .",
        "this {kind} shows {n} {objects} on a {bg} background .",
        "we see {n} {objects} on a {bg} background .",
    ),
    "object_image": ("a {obj} is {where} .", "{where} there is a {obj} .", "there is a {obj} {where} ."),
    "object_still": ("a {obj} stays still {where} .", "a {obj} is {where} and does not move ."),
    "object_moving": ("a {obj} starts {where} and moves {dir} .", "a {obj} begins {where} and moves {dir} ."),
    "object_late_still": ("{later} , a {obj} appears {where} and stays still .",),
    "object_late_moving": ("{later} , a {obj} appears {where} and moves {dir} .",),
    "only": ("it is the only object in the {kind} .",),
    "relation": ("the {a} is {rel} the {b} .",),
    "colours_one": ("the object is {colour} .",),
    "colours_same": ("all objects are {colour} .",),
    "colours_many": ("the colours are {list} .",),
    "shapes": ("there {be} {list} .",),
    "sizes_one": ("the object is {size} .",),
    "sizes_same": ("all objects are {size} .",),
    "sizes_mixed": ("{k} {objects} {be} large and {m} {be_m} small .",),
    "background_striped": ("the background has {orientation} stripes .",),
    "background": ("the background is {bg} .",),
    "q_colour": ("what colour is the {ref} ?", "which colour is the {ref} ?", "what is the colour of the {ref} ?"),
    "q_count_all": ("how many objects are there ?", "how many objects are in the {kind} ?"),
    "q_count_attr": ("how many {attr} are there ?", "how many {attr} are in the {kind} ?"),
    "q_position_image": ("where is the {obj} ?", "where is the {obj} in the image ?"),
    "q_position_video": ("where does the {obj} appear ?", "where is the {obj} when it first appears ?"),
    "q_relation": ("is the {a} {rel} the {b} ?",),
    "q_relation_shape": ("what shape is {rel} the {b} ?",),
    "q_yesno": (
        "is there {art} {obj} ?",
        "is there {art} {obj} in the {kind} ?",
        "does the {kind} contain {art} {obj} ?",
    ),
    "q_motion": (
        "which way does the {obj} move ?",
        "in which direction does the {obj} move ?",
        "how does the {obj} move ?",
    ),
    "q_order": ("which appears {when} , the {a} or the {b} ?", "which object appears {when} , the {a} or the {b} ?"),
}


@dataclass(frozen=True)
class WorldConfig:
    """Generation settings. Pixel sizes are given for a 64 px frame and scale with ``image_size``."""

    image_size: int = 64  # square frames, even size (H.264 yuv420p needs even sides)
    video_frames: tuple[int, int] = (8, 16)  # frames per video, inclusive range, sampled per video
    fps: int = 8
    min_objects: int = 1
    max_objects: int = 4
    small_size: tuple[int, int] = (6, 8)  # px across at 64 px, inclusive
    large_size: tuple[int, int] = (11, 14)
    distractors: tuple[int, int] = (2, 5)  # grey/brown lines and specks per item, inclusive
    object_gap: float = 2.0  # min px between any two objects' boxes, in every frame
    grid_margin: float = 2.0  # min px between an object's centre and a 3x3 grid line
    relation_margin: float = 4.0  # min centre distance (px) for "left of"/"above" to be asked or stated
    travel: tuple[float, float] = (0.30, 0.45)  # distance a moving object covers over the clip, / frame width
    late_prob: float = 0.5  # chance that each video object after the first appears later
    order_frames: int = 4  # late objects appear at sample_frame_indices(T, order_frames)[1:-1]
    image_qa: tuple[int, int] = (4, 6)  # QA pairs per image, inclusive
    video_qa: tuple[int, int] = (6, 8)
    caption_max_tokens: int = 120  # by words(); optional sentences are added while they fit (templates give >= 40)
    placement_tries: int = 200

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 2:
            raise ValueError(f"image_size must be even and >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects < len(NUMBER_WORDS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(NUMBER_WORDS) - 1}")
        if not 3 <= self.order_frames <= self.video_frames[0] <= self.video_frames[1]:
            raise ValueError("need 3 <= order_frames <= video_frames[0] <= video_frames[1]")

    def px(self, value: float) -> float:
        """A length given for a 64 px frame, at this config's image size."""
        return value * self.image_size / 64


@dataclass
class QA:
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES


@dataclass
class Item:
    item_id: str  # "img_00000042" / "vid_00000042"
    kind: str  # "image" or "video"
    frames: np.ndarray  # uint8 [T, H, W, 3]; T == 1 for images
    caption: str
    qa: list[QA]
    scene: dict  # JSON-serialisable ground truth, see _scene()


@dataclass
class _Obj:
    """An object while an item is built; boxes are [x0, y0, x1, y1) per frame, None before it appears."""

    colour: str
    shape: str
    size: str
    size_px: int
    motion: str
    appear: int
    velocity: tuple[float, float]
    boxes: list[tuple[int, int, int, int] | None]
    position: str  # grid cell of the centre at the appearance frame

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def full_name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def centre(self, t: int) -> tuple[float, float]:
        x0, y0, x1, y1 = self.boxes[t]
        return (x0 + x1) / 2, (y0 + y1) / 2


def words(text: str) -> list[str]:
    """The world's tokenisation: lowercase words, and each of . , ? as its own token."""
    return re.findall(r"[.,?]|[^\s.,?]+", text.lower())


def sample_frame_indices(num_frames: int, count: int) -> np.ndarray:
    """``count`` uniformly spaced frame indices of a ``num_frames`` clip, first and last included."""
    return np.linspace(0, num_frames - 1, count).round().astype(int)


def vocabulary(config: WorldConfig = WorldConfig()) -> list[str]:
    """Every token words() can yield on a caption, question or answer of this world (sorted)."""
    texts = [re.sub(r"\{\w+\}", " ", t) for ts in _TEMPLATES.values() for t in ts]
    fillers = [
        *NUMBER_WORDS[: config.max_objects + 1],
        "object objects is are a an and , image video first later yes no",
        *COLOURS,
        *SHAPES,
        *(f"{s}s" for s in SHAPES),
        *SIZES,
        *MOTIONS,
        *POSITIONS,
        *_WHERE.values(),
        *BACKGROUNDS,
        *STRIPE_ORIENTATIONS,
        *(p for ps in _RELATIONS.values() for p in ps),
        *_LATER,
    ]
    return sorted({w for t in texts + fillers for w in words(t)})


def answer_set(kind: str | None = None) -> list[str]:
    """All possible answers for ``kind`` ("image", "video", or None for both), each 1-2 words."""
    if kind not in (None, *KIND_CODES):
        raise ValueError(f"unknown kind {kind!r}")
    answers = [*COLOURS, *NUMBER_WORDS, *POSITIONS, "yes", "no", *SHAPES]
    if kind != "image":
        answers += [*MOTIONS, *(f"{c} {s}" for c in COLOURS for s in SHAPES)]
    return sorted(set(answers))


def make_item(seed: int, index: int, kind: str, config: WorldConfig = WorldConfig()) -> Item:
    """Item ``index`` of ``kind`` in the corpus of ``seed``: a pure function of its arguments."""
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    rng = np.random.default_rng([seed, index, KIND_CODES[kind]])
    lo, hi = config.video_frames
    num_frames = 1 if kind == "image" else int(rng.integers(lo, hi + 1))
    background, distractors = _sample_background(rng, config)
    objects = _sample_objects(rng, config, kind, num_frames)
    scene = _scene(kind, config, num_frames, background, distractors, objects)
    return Item(
        item_id=f"{_ID_PREFIX[kind]}_{index:08d}",
        kind=kind,
        frames=_render(scene),
        caption=_caption(rng, objects, background, kind, config),
        qa=_make_qa(rng, objects, kind, config),
        scene=scene,
    )


def iter_items(seed: int, count: int, kind: str, config: WorldConfig = WorldConfig(), start: int = 0) -> Iterator[Item]:
    """Items ``start .. start + count - 1`` of ``kind``, generated one at a time."""
    for index in range(start, start + count):
        yield make_item(seed, index, kind, config)


def blank_frames(item: Item) -> np.ndarray:
    """The item's frames with no objects (background and distractors only): the "blank media" control."""
    background = _render_background(item.scene)
    return np.repeat(background[None], item.frames.shape[0], axis=0)


# ----------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _fill(rng: np.random.Generator, key: str, **fields) -> str:
    return _pick(rng, _TEMPLATES[key]).format(**fields)


def _muted(hue: float, saturation: float, value: float) -> list[int]:
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value)]


def _sample_background(rng: np.random.Generator, config: WorldConfig) -> tuple[dict, list[dict]]:
    """A low-contrast textured background in muted colours, and 2-5 thin grey/brown distractors."""
    size = config.image_size
    hue, saturation, value = rng.random(), rng.uniform(0.05, 0.25), rng.uniform(0.58, 0.8)
    # Low saturation keeps every background pixel far from the saturated object colours.
    second = value + rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.12)
    pattern = _pick(rng, BACKGROUNDS)
    background = {
        "pattern": pattern,
        "colours": [_muted(hue, saturation, value), _muted(hue + rng.uniform(-0.05, 0.05), saturation, second)],
    }
    if pattern == "striped":
        background["orientation"] = _pick(rng, STRIPE_ORIENTATIONS)
    if pattern in ("striped", "checkered"):
        background["period"] = int(rng.integers(round(config.px(3)), round(config.px(8)) + 1))
    elif pattern == "shaded":
        background["angle"] = round(float(rng.uniform(0, 360)), 3)
    else:
        background["noise_seed"] = int(rng.integers(2**31))

    distractors = []
    for _ in range(int(rng.integers(config.distractors[0], config.distractors[1] + 1))):
        if rng.random() < 0.5:
            grey = int(rng.integers(60, 115))
            colour = [grey, grey, grey]
        else:  # brown: dark and unsaturated, unlike orange objects
            colour = [int(rng.integers(100, 131)), int(rng.integers(70, 91)), int(rng.integers(40, 61))]
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            angle, length = rng.uniform(0, 2 * math.pi), config.px(rng.uniform(5, 12))
            x1 = int(np.clip(round(x + length * math.cos(angle)), 0, size - 1))
            y1 = int(np.clip(round(y + length * math.sin(angle)), 0, size - 1))
            distractors.append({"kind": "line", "colour": colour, "xy": [x, y, x1, y1]})
        else:
            side = max(1, round(config.px(int(rng.integers(1, 3))))) - 1
            distractors.append({"kind": "dot", "colour": colour, "xy": [x, y, x + side, y + side]})
    return background, distractors


def _sample_objects(rng: np.random.Generator, config: WorldConfig, kind: str, num_frames: int) -> list[_Obj]:
    """min..max objects with unique (colour, shape) pairs that never come within object_gap of each other."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    late_frames = sample_frame_indices(num_frames, config.order_frames)[1:-1] if kind == "video" else []
    gap = config.px(config.object_gap)
    objects: list[_Obj] = []
    for i in range(count):
        taken = {(o.colour, o.shape) for o in objects}
        for attempt in range(config.placement_tries):
            # Attributes survive many placement tries so that hard-to-place ones (large, moving) are not
            # swapped for easy ones, which would skew the size and motion answers.
            if attempt % 25 == 0:
                attrs = _sample_attributes(rng, config, kind, num_frames, late_frames if i else [], taken)
            obj = _place(rng, config, num_frames, **attrs)
            if obj is not None and not any(_clash(obj, other, gap) for other in objects):
                objects.append(obj)
                break
        # An object that finds no room is dropped: crowded scenes simply hold fewer objects.
    return objects


def _sample_attributes(
    rng: np.random.Generator, config: WorldConfig, kind: str, num_frames: int, late_frames, taken: set
) -> dict:
    """Colour/shape (an unused pair), size, motion, appearance frame and velocity of one object."""
    colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken])
    size = _pick(rng, SIZES)
    lo, hi = config.small_size if size == "small" else config.large_size
    size_px = int(rng.integers(round(config.px(lo)), round(config.px(hi)) + 1))
    motion = _pick(rng, MOTIONS) if kind == "video" else "still"
    appear = int(_pick(rng, late_frames)) if len(late_frames) and rng.random() < config.late_prob else 0
    speed = 0.0
    if motion != "still":
        speed = rng.uniform(*config.travel) * config.image_size / (num_frames - 1)
    dx, dy = _DIRECTIONS[motion]
    velocity = (dx * speed, dy * speed)
    return dict(colour=colour, shape=shape, size=size, size_px=size_px, motion=motion, appear=appear, velocity=velocity)


def _place(
    rng: np.random.Generator,
    config: WorldConfig,
    num_frames: int,
    colour: str,
    shape: str,
    size: str,
    size_px: int,
    motion: str,
    appear: int,
    velocity: tuple[float, float],
) -> _Obj | None:
    """Boxes for an object with these attributes, or None if the drawn grid cell cannot hold its path."""
    size_frame = config.image_size
    # Pick the grid cell first so positions are uniform over cells, then a centre inside it that keeps
    # the whole constant-velocity path (over all frames) inside the frame.
    row, col = divmod(int(rng.integers(9)), 3)
    third, margin, half = size_frame / 3, config.px(config.grid_margin), size_px / 2
    ref = []
    for v, k in ((velocity[0], col), (velocity[1], row)):
        first, last = -v * appear, v * (num_frames - 1 - appear)  # offsets from the appearance-frame centre
        lo_c, hi_c = half - min(first, last), size_frame - half - max(first, last)
        if k > 0:
            lo_c = max(lo_c, k * third + margin)
        if k < 2:
            hi_c = min(hi_c, (k + 1) * third - margin)
        if lo_c > hi_c:
            return None
        ref.append(rng.uniform(lo_c, hi_c))

    boxes: list[tuple[int, int, int, int] | None] = []
    for t in range(num_frames):
        if t < appear:
            boxes.append(None)
            continue
        x0 = math.floor(ref[0] + velocity[0] * (t - appear) - half + 0.5)
        y0 = math.floor(ref[1] + velocity[1] * (t - appear) - half + 0.5)
        boxes.append((x0, y0, x0 + size_px, y0 + size_px))
    # Rounding moves the drawn centre by <= 0.5 px, less than grid_margin, so the cell is still (row, col).
    return _Obj(colour, shape, size, size_px, motion, appear, velocity, boxes, POSITIONS[3 * row + col])


def _clash(a: _Obj, b: _Obj, gap: float) -> bool:
    """Whether a and b come closer than ``gap`` px in any frame where both are visible."""
    for box_a, box_b in zip(a.boxes, b.boxes, strict=True):
        if box_a is None or box_b is None:
            continue
        if (
            box_a[0] < box_b[2] + gap
            and box_b[0] < box_a[2] + gap
            and box_a[1] < box_b[3] + gap
            and box_b[1] < box_a[3] + gap
        ):
            return True
    return False


def _relation(a: _Obj, b: _Obj, axis: int, margin: float) -> bool | None:
    """True if a is clearly left of / above b in every frame both are visible, False if clearly right of /
    below in every such frame, None when too close to call or when the relation changes over the clip."""
    diffs = [a.centre(t)[axis] - b.centre(t)[axis] for t in range(len(a.boxes)) if a.boxes[t] and b.boxes[t]]
    if all(d <= -margin for d in diffs):
        return True
    if all(d >= margin for d in diffs):
        return False
    return None


def _scene(
    kind: str, config: WorldConfig, num_frames: int, background: dict, distractors: list[dict], objects: list[_Obj]
) -> dict:
    """The item's JSON ground truth; frames (and blank frames) are rendered from it alone.

    Objects, in sampling order (the first appears at frame 0): colour, shape, size ("small"/"large"),
    size_px, motion, appear_frame, position and center (at the appearance frame), velocity (px/frame) and
    boxes ([x0, y0, x1, y1) per frame, null before the object appears). Videos add fps and order_frames.
    """
    scene = {
        "kind": kind,
        "image_size": config.image_size,
        "num_frames": num_frames,
        "background": background,
        "distractors": distractors,
        "objects": [
            {
                "colour": o.colour,
                "shape": o.shape,
                "size": o.size,
                "size_px": o.size_px,
                "motion": o.motion,
                "appear_frame": o.appear,
                "position": o.position,  # at the appearance frame
                "center": list(o.centre(o.appear)),
                "velocity": [round(v, 4) for v in o.velocity],  # px per frame
                "boxes": [list(b) if b else None for b in o.boxes],  # [x0, y0, x1, y1) per frame
            }
            for o in objects
        ],
    }
    if kind == "video":
        scene["fps"] = config.fps
        scene["order_frames"] = sample_frame_indices(num_frames, config.order_frames).tolist()
    return scene


# ---------------------------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


@lru_cache(maxsize=256)
def _sprite(shape: str, size: int) -> np.ndarray:
    """Boolean mask of a shape filling a size x size box."""
    img = Image.new("L", (size, size), 0)
    draw, e = ImageDraw.Draw(img), size - 1
    if shape == "circle":
        draw.ellipse([0, 0, e, e], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, e, e], fill=255)
    elif shape == "triangle":
        draw.polygon([(e / 2, 0), (e, e), (0, e)], fill=255)
    else:
        draw.polygon([(e / 2, 0), (e, e / 2), (e / 2, e), (0, e / 2)], fill=255)
    mask = np.asarray(img) > 0
    mask.flags.writeable = False
    return mask


def _render_background(scene: dict) -> np.ndarray:
    """uint8 [H, W, 3] background with distractors, rebuilt from the scene alone."""
    size, background = scene["image_size"], scene["background"]
    first, second = (np.asarray(c, np.float32) for c in background["colours"])
    x, y = _grid(size)
    pattern = background["pattern"]
    if pattern == "striped":
        coord = {"horizontal": y, "vertical": x, "diagonal": x + y}[background["orientation"]]
        weight = (coord // background["period"]) % 2
    elif pattern == "checkered":
        weight = (x // background["period"] + y // background["period"]) % 2
    elif pattern == "shaded":
        angle = math.radians(background["angle"])
        proj = x * math.cos(angle) + y * math.sin(angle)
        weight = (proj - proj.min()) / (proj.max() - proj.min())
    else:  # grainy: 2x2 px grains, coarse enough to survive video compression
        grains = np.random.default_rng(background["noise_seed"]).random((size // 2, size // 2), np.float32)
        weight = grains.repeat(2, axis=0).repeat(2, axis=1)
    img = np.rint(first + weight[..., None] * (second - first)).astype(np.uint8)
    if scene["distractors"]:
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        for d in scene["distractors"]:
            if d["kind"] == "line":
                draw.line(d["xy"], fill=tuple(d["colour"]), width=1)
            else:
                draw.rectangle(d["xy"], fill=tuple(d["colour"]))
        img = np.array(pil)
    return img


def _render(scene: dict) -> np.ndarray:
    frames = np.repeat(_render_background(scene)[None], scene["num_frames"], axis=0)
    # Row i + 1 is object i's colour, so an object index map colours its frame in one step.
    palette = np.array([(0, 0, 0)] + [COLOURS[o["colour"]] for o in scene["objects"]], np.uint8)
    for t in range(scene["num_frames"]):
        index = object_index_map(scene, t)
        drawn = index > 0
        frames[t][drawn] = palette[index[drawn]]
    return frames


def object_index_map(scene: dict, t: int = 0) -> np.ndarray:
    """int16 [H, W] of frame ``t``: 0 where no object is drawn, ``i + 1`` where ``scene["objects"][i]`` is.

    Drawn with the same sprites and in the same order as the frames, so it labels exactly their object pixels.
    """
    size = scene["image_size"]
    out = np.zeros((size, size), np.int16)
    for i, obj in enumerate(scene["objects"]):
        box = obj["boxes"][t]
        if box is not None:
            x0, y0, x1, y1 = box
            out[y0:y1, x0:x1][_sprite(obj["shape"], obj["size_px"])] = i + 1
    return out


# ------------------------------------------------------------------------------------------------ captions


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _noun(count: int, noun: str = "object") -> str:
    return noun if count == 1 else f"{noun}s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def _frame0(objects: list[_Obj]) -> list[_Obj]:
    """Objects that relation questions and sentences may compare (all of them in images)."""
    return [o for o in objects if o.appear == 0]


def _relations(objects: list[_Obj], margin: float) -> list[tuple[_Obj, _Obj, int, bool]]:
    """(a, b, axis, a-before-b) for every ordered pair visible from frame 0 with a clear, stable relation."""
    pool = _frame0(objects)
    out = []
    for a in pool:
        for b in pool:
            if a is not b:
                for axis in (0, 1):
                    rel = _relation(a, b, axis, margin)
                    if rel is not None:
                        out.append((a, b, axis, rel))
    return out


def _caption(rng: np.random.Generator, objects: list[_Obj], background: dict, kind: str, config: WorldConfig) -> str:
    n = len(objects)
    ordered = sorted(objects, key=lambda o: o.appear)  # stable sort: sentences follow appearance order
    late_groups = sorted({o.appear for o in objects if o.appear})
    sentences = [
        _fill(rng, "intro", be=_be(n), n=NUMBER_WORDS[n], objects=_noun(n), bg=background["pattern"], kind=kind)
    ]
    for o in ordered:
        fields = {"obj": o.full_name, "where": _WHERE[o.position], "dir": o.motion}
        if kind == "image":
            key = "object_image"
        elif o.appear == 0:
            key = "object_still" if o.motion == "still" else "object_moving"
        else:
            key = "object_late_still" if o.motion == "still" else "object_late_moving"
            fields["later"] = _LATER[min(late_groups.index(o.appear), 1)]
        sentences.append(_fill(rng, key, **fields))
    if n == 1:
        sentences.append(_fill(rng, "only", kind=kind))

    # Optional sentences, added in this order while the caption stays within caption_max_tokens.
    extras = []
    relations = _relations(objects, config.px(config.relation_margin))
    stated: set[frozenset[str]] = set()
    for i in rng.permutation(len(relations)):
        a, b, axis, rel = relations[i]
        if len(stated) < 2 and {a.name, b.name} not in stated:  # at most one sentence per pair, two in all
            stated.add(frozenset((a.name, b.name)))
            extras.append(_fill(rng, "relation", a=a.name, b=b.name, rel=_pick(rng, _RELATIONS[axis, rel])))
    colours = list(dict.fromkeys(o.colour for o in ordered))
    if n == 1:
        extras.append(_fill(rng, "colours_one", colour=colours[0]))
    elif len(colours) == 1:
        extras.append(_fill(rng, "colours_same", colour=colours[0]))
    else:
        extras.append(_fill(rng, "colours_many", list=_join(colours)))
    shapes = Counter(o.shape for o in ordered)
    parts = [f"{NUMBER_WORDS[k]} {_noun(k, s)}" for s, k in shapes.items()]
    extras.append(_fill(rng, "shapes", be=_be(next(iter(shapes.values()))), list=_join(parts)))
    large = sum(o.size == "large" for o in objects)
    if n == 1:
        extras.append(_fill(rng, "sizes_one", size=objects[0].size))
    elif large in (0, n):
        extras.append(_fill(rng, "sizes_same", size=objects[0].size))
    else:
        small = n - large
        fields = {"k": NUMBER_WORDS[large], "objects": _noun(large), "be": _be(large), "m": NUMBER_WORDS[small]}
        extras.append(_fill(rng, "sizes_mixed", be_m=_be(small), **fields))
    if background["pattern"] == "striped":
        extras.append(_fill(rng, "background_striped", orientation=background["orientation"]))
    else:
        extras.append(_fill(rng, "background", bg=background["pattern"]))

    tokens = sum(len(words(s)) for s in sentences)
    for sentence in extras:
        if tokens + len(words(sentence)) <= config.caption_max_tokens:
            sentences.append(sentence)
            tokens += len(words(sentence))
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------------- QA


def _q_colour(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    # Only refer to an object by a description that picks it out uniquely.
    refs = []
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            refs.append((o.shape, o))
        if sum(p.shape == o.shape and p.size == o.size for p in objects) == 1:
            refs.append((f"{o.size} {o.shape}", o))
    if not refs:
        return None
    ref, o = _pick(rng, refs)
    return QA(_fill(rng, "q_colour", ref=ref), o.colour, "colour")


def _q_count(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    if rng.random() < 1 / 3:
        return QA(_fill(rng, "q_count_all", kind=kind), NUMBER_WORDS[len(objects)], "count")
    attrs = [(f"{c} objects", sum(o.colour == c for o in objects)) for c in COLOURS]
    attrs += [(f"{s}s", sum(o.shape == s for o in objects)) for s in SHAPES]
    attrs += [(f"{z} objects", sum(o.size == z for o in objects)) for z in SIZES]
    # Draw the answer first among the counts this item offers, favouring the rarer large counts, so that
    # "zero" and "one" do not dominate the answers.
    values = sorted({k for _, k in attrs})
    weights = np.array([max(k, 1) for k in values], float)
    target = values[rng.choice(len(values), p=weights / weights.sum())]
    attr = _pick(rng, [a for a, k in attrs if k == target])
    return QA(_fill(rng, "q_count_attr", attr=attr, kind=kind), NUMBER_WORDS[target], "count")


def _q_position(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    o = _pick(rng, objects)
    return QA(_fill(rng, f"q_position_{kind}", obj=o.name), o.position, "position")


def _q_relation(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    margin = config.px(config.relation_margin)
    if rng.random() < 0.3:
        # "what shape is left of the X ?": only when exactly one object is on that side of X, every other
        # object is clearly not, and the answer is visible from frame 0.
        options = []
        for b in _frame0(objects):
            others = [o for o in objects if o is not b]
            for axis in (0, 1):
                rels = [_relation(o, b, axis, margin) for o in others]
                if None in rels:
                    continue
                for before in (True, False):
                    hits = [o for o, r in zip(others, rels, strict=True) if r == before]
                    if len(hits) == 1 and hits[0].appear == 0:
                        options.append((hits[0], b, axis, before))
        if options:
            a, b, axis, before = _pick(rng, options)
            question = _fill(rng, "q_relation_shape", rel=_pick(rng, _RELATIONS[axis, before]), b=b.name)
            return QA(question, a.shape, "relation")
    relations = _relations(objects, margin)
    if not relations:
        return None
    a, b, axis, rel = _pick(rng, relations)
    yes = bool(rng.random() < 0.5)  # ask the true or the opposite relation: exactly balanced yes/no
    question = _fill(rng, "q_relation", a=a.name, b=b.name, rel=_pick(rng, _RELATIONS[axis, rel if yes else not rel]))
    return QA(question, "yes" if yes else "no", "relation")


def _q_yesno(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    with_size = rng.random() < 0.3
    yes = bool(rng.random() < 0.5)
    if yes:
        o = _pick(rng, objects)
        desc = o.full_name if with_size else o.name
    elif with_size and rng.random() < 0.5:  # a present object with the wrong size
        o = _pick(rng, objects)
        desc = f"{SIZES[1 - SIZES.index(o.size)]} {o.colour} {o.shape}"
    else:
        present = {(o.colour, o.shape) for o in objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # Half the time a hard negative that shares the colour or the shape of a present object.
        hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = _pick(rng, hard if hard and rng.random() < 0.5 else absent)
        desc = f"{_pick(rng, SIZES)} {colour} {shape}" if with_size else f"{colour} {shape}"
    question = _fill(rng, "q_yesno", art=_article(desc), obj=desc, kind=kind)
    return QA(question, "yes" if yes else "no", "yesno")


def _q_motion(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    # Draw the answer first among the item's motions, so no motion dominates the answers.
    motion = _pick(rng, [m for m in MOTIONS if any(o.motion == m for o in objects)])
    o = _pick(rng, [o for o in objects if o.motion == motion])
    return QA(_fill(rng, "q_motion", obj=o.name), motion, "motion")


def _q_order(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> QA | None:
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :] if a.appear != b.appear]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    if rng.random() < 0.5:  # the answer is the first-named object half the time
        a, b = b, a
    when = _pick(rng, ("first", "later"))
    early, late = (a, b) if a.appear < b.appear else (b, a)
    answer = early if when == "first" else late
    return QA(_fill(rng, "q_order", when=when, a=a.name, b=b.name), answer.name, "order")


_EXTRA_WEIGHT = {"relation": 4.0, "order": 4.0}
_QUESTIONS = {
    "colour": _q_colour,
    "count": _q_count,
    "position": _q_position,
    "relation": _q_relation,
    "yesno": _q_yesno,
    "motion": _q_motion,
    "order": _q_order,
}


def _make_qa(rng: np.random.Generator, objects: list[_Obj], kind: str, config: WorldConfig) -> list[QA]:
    """One question of each type the item can answer (in random order), then random types up to the count."""
    types = IMAGE_QUESTION_TYPES if kind == "image" else VIDEO_QUESTION_TYPES
    lo, hi = config.image_qa if kind == "image" else config.video_qa
    wanted = int(rng.integers(lo, hi + 1))
    qa: list[QA] = []
    asked: set[str] = set()

    def add(qtype: str) -> None:
        for _ in range(3):  # a few redraws to avoid asking the same question twice
            pair = _QUESTIONS[qtype](rng, objects, kind, config)
            if pair is None:
                return
            if pair.question not in asked:
                asked.add(pair.question)
                qa.append(pair)
                return

    for i in rng.permutation(len(types)):
        if len(qa) < wanted:
            add(types[i])
    # Relation and order questions are often impossible (one object, no late object), so when they are
    # possible the extra questions favour them, to even out the types over the corpus.
    weights = np.array([_EXTRA_WEIGHT.get(t, 1.0) for t in types])
    for _ in range(30):
        if len(qa) >= wanted:
            break
        add(types[rng.choice(len(types), p=weights / weights.sum())])
    return qa
