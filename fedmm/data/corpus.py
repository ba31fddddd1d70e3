"""The pretraining corpus: generated scene-caption pairs for building a foundation base.

It is not the clients' data. It has its own seed stream, richer scenes (one to three objects of two
sizes on tinted, noisy backgrounds, sometimes a small occluding patch) and free-form captions written
from its own templates (descriptions, several objects per caption, questions followed by their answer,
now and then a stray word). A pair's `key` names what its caption states, so retrieval can count a
caption as right for an image when it describes the same scene.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from fedmm.data.scenes import _COLOR_WORDS, _RGB, COLORS, POSITIONS, SHAPES, shape_mask

# Seeds of the pretraining streams start with this word, so no client draw (seeded [seed, task, ...])
# can coincide with them.
CORPUS_STREAM = 0xBA5E

TRAIN, HELD_OUT = 0, 1

_SIZE_WORDS = {False: ("small", "little", "tiny"), True: ("large", "big", "huge")}
_POSITION_WORDS = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
}
_WHERE = ("in the {pos}", "in the {pos} corner", "at the {pos}", "{pos}")
_DESCRIPTIONS = (
    "a {obj} {where}",
    "there is a {obj} {where}",
    "{where} there is a {obj}",
    "the image shows a {obj} {where}",
    "a photo of a {obj} {where}",
    "we can see a {obj} {where}",
    "one {obj} is placed {where}",
)
_QUESTIONS = (
    "what color is the {shape} ? {color}",
    "which color does the {shape} have ? it is {color}",
    "what shape is {where} ? a {shape}",
    "which kind of shape is in the picture ? a {shape}",
    "where is the {color} {shape} ? {where}",
    "in which corner is the {shape} ? the {pos}",
    "how big is the {shape} ? {size}",
    "what is {where} ? a {obj}",
)
_BACKGROUNDS = ("dark", "gray", "light")


@dataclass(frozen=True)
class SceneObject:
    shape: int
    color: int
    position: int
    large: bool


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """A tinted, noisy background, sometimes with a gradient; returns it and its brightness class."""
    level = rng.uniform(25.0, 120.0)
    tint = rng.normal(0.0, 12.0, 3)
    image = level + tint + rng.normal(0.0, rng.uniform(6.0, 26.0), (size, size, 3))
    if rng.random() < 0.3:
        ramp = np.linspace(-1.0, 1.0, size)[:, None, None] * rng.uniform(-20.0, 20.0)
        image = image + (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
    return image, int(np.digitize(level, (55.0, 90.0)))


def render_corpus_scene(objects: list[SceneObject], rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """The objects (one per quadrant) on a background, maybe a small occluding patch; uint8 image and
    the background's brightness class."""
    image, brightness = _background(rng, size)
    half = size / 2
    for obj in objects:
        cy = (obj.position // 2) * half + half / 2 + rng.uniform(-2.5, 2.5)
        cx = (obj.position % 2) * half + half / 2 + rng.uniform(-2.5, 2.5)
        r = rng.uniform(0.55, 0.7) * half if obj.large else rng.uniform(0.32, 0.48) * half
        mask = shape_mask(obj.shape, cy, cx, r, size)
        image[mask] = _RGB[obj.color] + rng.normal(0.0, 20.0, 3) + rng.normal(0.0, 8.0, (int(mask.sum()), 3))
    if rng.random() < 0.35:  # occlusion: a small patch of flat grey, white or black anywhere
        side = int(rng.integers(2, 6))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        image[y : y + side, x : x + side] = rng.choice((0.0, 128.0, 255.0)) + rng.normal(0.0, 10.0)
    return np.clip(image, 0, 255).astype(np.uint8), brightness


def _phrase(obj: SceneObject, rng: np.random.Generator, with_size: bool) -> dict[str, str]:
    pos = str(rng.choice(_POSITION_WORDS[POSITIONS[obj.position]]))
    color = str(rng.choice(_COLOR_WORDS[COLORS[obj.color]]))
    size = str(rng.choice(_SIZE_WORDS[obj.large]))
    shape = SHAPES[obj.shape]
    words = {"pos": pos, "color": color, "size": size, "shape": shape,
             "obj": f"{size} {color} {shape}" if with_size else f"{color} {shape}"}
    words["where"] = str(rng.choice(_WHERE)).format(pos=pos)
    return words


def write_caption(objects: list[SceneObject], brightness: int, rng: np.random.Generator,
                  complete: bool = False) -> str:
    """A free-form caption of the scene: a description of every object, or a question about one of
    them with its answer (a single object only, so the question names it unambiguously). A `complete`
    caption describes every attribute of every object and nothing else (retrieval's held-out pairs)."""
    if complete:
        return " and ".join(str(rng.choice(_DESCRIPTIONS)).format(**_phrase(o, rng, with_size=True))
                            for o in objects)
    if len(objects) == 1 and rng.random() < 0.35:
        caption = str(rng.choice(_QUESTIONS)).format(**_phrase(objects[0], rng, with_size=True))
    else:
        parts = [str(rng.choice(_DESCRIPTIONS)).format(**_phrase(o, rng, with_size=rng.random() < 0.7))
                 for o in objects]
        caption = str(rng.choice((" and ", " , ", " . "))).join(parts)
        if rng.random() < 0.3:
            caption += f" on a {_BACKGROUNDS[brightness]} background"
    if rng.random() < 0.15:  # a stray word the caption does not need
        words = caption.split()
        stray = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(2, 5))))
        words.insert(int(rng.integers(len(words) + 1)), stray)
        caption = " ".join(words)
    return caption


def scene_key(objects: list[SceneObject]) -> tuple[tuple[int, int, int, bool], ...]:
    return tuple(sorted((o.shape, o.color, o.position, o.large) for o in objects))


@dataclass
class Corpus:
    images: np.ndarray  # uint8 (N, size, size, 3)
    captions: list[str]
    keys: list[tuple]  # the scene each pair shows (see scene_key): held-out captions state all of it


def make_corpus(num_pairs: int, seed: int, split: int, image_size: int) -> Corpus:
    """`num_pairs` generated image-caption pairs; `split` selects an independent stream: 0 trains,
    1 is held out for retrieval (complete captions)."""
    rng = np.random.default_rng([CORPUS_STREAM, seed, split])
    images = np.zeros((num_pairs, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    keys: list[tuple] = []
    for i in range(num_pairs):
        count = int(rng.choice((1, 2, 3), p=(0.55, 0.35, 0.10)))
        positions = rng.permutation(4)[:count]
        objects = [SceneObject(int(rng.integers(4)), int(rng.integers(4)), int(p), bool(rng.integers(2)))
                   for p in positions]
        images[i], brightness = render_corpus_scene(objects, rng, image_size)
        captions.append(write_caption(objects, brightness, rng, complete=split == HELD_OUT))
        keys.append(scene_key(objects))
    return Corpus(images, captions, keys)
