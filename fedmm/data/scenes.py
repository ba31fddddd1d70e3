"""Data: the generated multi-modal scenes, Hugging Face datasets, and partitioning across clients.

Every task's data is a `datasets.Dataset` with columns `image` (uint8 H x W x 3), `text` (str) and
`label` (int). Each task is split across the clients that hold it with a flwr-datasets partitioner;
each client's share is split into train / validation / test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Array3D, Dataset, Features, Value
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedmm.core.schema import DataConfig, RunConfig
from fedmm.core.tasks import SYNTHETIC_TASKS

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
_RGB = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40]], dtype=np.float32)
_COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "navy", "azure"),
    "yellow": ("yellow", "golden", "amber"),
}
_SIZES = ("small", "tiny", "large", "big")
_SURFACES = ("wooden", "gray", "white", "dark", "plain")
_CAPTIONS = (
    "there is a {size} {color} {shape} in the {pos}",
    "in the {pos} you can see a {color} {shape}",
    "a {shape} , {color} and {size} , sits in the {pos} of a {surface} table",
    "the picture shows one {color} {shape} on a {surface} background",
    "look at the {size} {shape} , it is {color}",
)
_QUESTIONS = {
    "color": ("what color is the {shape} ?", "which color does the object have ?", "tell me the color"),
    "shape": ("what shape is shown ?", "which kind of shape is in the picture ?", "name the shape"),
    "position": ("where is the object ?", "in which corner is the {color} thing ?", "where is it placed"),
}
# VQA answers: the 4 colors, then the 4 shapes, then the 4 positions.
_ANSWER_OFFSET = {"color": 0, "shape": 4, "position": 8}

def _features(image_size: int) -> Features:
    return Features(
        {
            "image": Array3D(shape=(image_size, image_size, 3), dtype="uint8"),
            "text": Value("string"),
            "label": Value("int64"),
        }
    )


def shape_mask(shape: int, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    """Pixels (size, size) covered by shape `shape` of radius `r` centred at (cy, cx)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if SHAPES[shape] == "circle":
        return dy**2 + dx**2 <= r**2
    if SHAPES[shape] == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if SHAPES[shape] == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    w = r * 0.35  # cross
    return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))


def render_scene(shape: int, color: int, position: int, large: bool, rng: np.random.Generator,
                 size: int = 32) -> np.ndarray:
    """One object on a noisy background; returns uint8 (size, size, 3)."""
    image = rng.normal(60.0, 18.0, (size, size, 3))
    half = size / 2
    cy = (position // 2) * half + half / 2 + rng.uniform(-2, 2)
    cx = (position % 2) * half + half / 2 + rng.uniform(-2, 2)
    r = (0.62 if large else 0.45) * half + rng.uniform(-0.5, 0.5)
    mask = shape_mask(shape, cy, cx, r, size)
    rgb = _RGB[color] + rng.normal(0.0, 18.0, 3)
    image[mask] = rgb + rng.normal(0.0, 8.0, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _caption(shape: int, color: int, position: int, large: bool, rng: np.random.Generator) -> str:
    template = _CAPTIONS[rng.integers(len(_CAPTIONS))]
    return template.format(
        size=_SIZES[2 * int(large) + rng.integers(2)],
        color=rng.choice(_COLOR_WORDS[COLORS[color]]),
        shape=SHAPES[shape],
        pos=POSITIONS[position],
        surface=rng.choice(_SURFACES),
    )


def make_synthetic_task(task: str, num_examples: int, seed: int, image_size: int = 32) -> Dataset:
    """Generate `num_examples` scenes for a synthetic task; labels follow from the scene."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(SYNTHETIC_TASKS)}")
    rng = np.random.default_rng([seed, _task_index(task)])
    return _generate(task, num_examples, rng, image_size)


def _task_index(task: str) -> int:
    return sorted(SYNTHETIC_TASKS).index(task)


def _generate(task: str, num_examples: int, rng: np.random.Generator, image_size: int,
              labels: np.ndarray | None = None) -> Dataset:
    """Scenes drawn from `rng`; with `labels`, each scene is made to have its given label."""
    images = np.zeros((num_examples, image_size, image_size, 3), dtype=np.uint8)
    texts: list[str] = []
    out = np.zeros(num_examples, dtype=np.int64)
    for i in range(num_examples):
        shape, color, position = (int(v) for v in rng.integers(4, size=3))
        large = bool(rng.integers(2))
        kind = ""
        if labels is not None:
            shape, color, position, kind = _with_label(task, int(labels[i]), shape, color, position)
        if task != "txt_color":
            images[i] = render_scene(shape, color, position, large, rng, image_size)
        if task == "img_shape":
            texts.append("")
            out[i] = shape
        elif task == "txt_color":
            texts.append(_caption(shape, color, position, large, rng))
            out[i] = color
        else:  # vqa
            kind = kind or ("color", "shape", "position")[rng.integers(3)]
            question = _QUESTIONS[kind][rng.integers(3)]
            texts.append(question.format(shape=SHAPES[shape], color=rng.choice(_COLOR_WORDS[COLORS[color]])))
            out[i] = _ANSWER_OFFSET[kind] + {"color": color, "shape": shape, "position": position}[kind]
    return Dataset.from_dict({"image": images, "text": texts, "label": out}, features=_features(image_size))


def _with_label(task: str, label: int, shape: int, color: int, position: int) -> tuple[int, int, int, str]:
    """Scene attributes changed so the scene's label for `task` is `label` (and the VQA question kind)."""
    if task == "img_shape":
        return label, color, position, ""
    if task == "txt_color":
        return shape, label, position, ""
    kind = ("color", "shape", "position")[label // 4]  # VQA answers: colors, shapes, positions (_ANSWER_OFFSET)
    attributes = {"shape": shape, "color": color, "position": position, kind: label % 4}
    return attributes["shape"], attributes["color"], attributes["position"], kind


def synthetic_vocabulary() -> set[str]:
    """Every word the generator can write (used to check tokenizers for collisions)."""
    words: set[str] = set()
    templates = list(_CAPTIONS) + [q for qs in _QUESTIONS.values() for q in qs]
    for template in templates:
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update(SHAPES, _SIZES, _SURFACES, *_COLOR_WORDS.values())
    words.update(w for p in POSITIONS for w in p.split())
    return words


def map_hf_columns(ds: Dataset, image_column: str, text_column: str, label_column: str,
                   image_size: int) -> Dataset:
    """Rename and convert a Hugging Face dataset's columns into fedmm's `image`/`text`/`label`."""
    for key, column in (("data.hf_image_column", image_column), ("data.hf_text_column", text_column),
                        ("data.hf_label_column", label_column)):
        if column and column not in ds.column_names:
            raise ValueError(f"{key}={column!r} is not a column of the dataset; columns: {ds.column_names}")

    def convert(batch: dict) -> dict:
        n = len(batch[label_column])
        images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
        if image_column:
            for i, img in enumerate(batch[image_column]):
                images[i] = _to_rgb_array(img, image_size)
        texts = [str(t) for t in batch[text_column]] if text_column else [""] * n
        return {"image": images, "text": texts, "label": [int(v) for v in batch[label_column]]}

    return ds.map(convert, batched=True, remove_columns=ds.column_names, features=_features(image_size))


def _to_rgb_array(img: object, image_size: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    return np.asarray(img.convert("RGB").resize((image_size, image_size)), dtype=np.uint8)


def load_hf_task(data: DataConfig, image_size: int) -> Dataset:
    """Load a Hugging Face dataset by name (hub cache) or local `save_to_disk` folder; labels checked."""
    import datasets

    if Path(data.hf_name).is_dir():
        loaded = datasets.load_from_disk(data.hf_name)
        ds = loaded[data.hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        ds = datasets.load_dataset(data.hf_name, split=data.hf_split)
    mapped = map_hf_columns(ds, data.hf_image_column, data.hf_text_column, data.hf_label_column, image_size)
    labels = np.asarray(mapped["label"])
    if labels.size and (labels.min() < 0 or labels.max() >= data.hf_num_classes):
        raise ValueError(f"labels of {data.hf_name!r} span {labels.min()}..{labels.max()}, outside "
                         f"0..{data.hf_num_classes - 1} (data.hf_num_classes={data.hf_num_classes})")
    return mapped


# Per-process caches: a Ray actor serves many virtual clients and must not regenerate data per message.
_DATASETS: dict[tuple[str, str], Dataset] = {}
_PARTITIONERS: dict[tuple[str, str, int], Partitioner] = {}


def task_dataset(run: RunConfig, task: str) -> Dataset:
    key = (_run_key(run), task)
    if key not in _DATASETS:
        if run.data.source == "hf":
            _DATASETS[key] = load_hf_task(run.data, run.model.image_size)
        else:
            _DATASETS[key] = make_synthetic_task(
                task, run.data.examples_per_task, run.seed, run.model.image_size
            )
    return _DATASETS[key]


# Below this a client's share cannot be split into non-empty train / validation / test sets.
MIN_PARTITION = 10


def make_partitioner(data: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    if data.partitioner == "iid" or num_partitions == 1:
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=data.dirichlet_alpha,
        min_partition_size=MIN_PARTITION,
        self_balancing=True,
        seed=seed,
    )


def _task_partitioner(run: RunConfig, task: str, num_holders: int) -> Partitioner:
    key = (_run_key(run), task, num_holders)
    if key not in _PARTITIONERS:
        partitioner = make_partitioner(run.data, num_holders, run.seed)
        partitioner.dataset = task_dataset(run, task)
        _PARTITIONERS[key] = partitioner
    return _PARTITIONERS[key]


@dataclass
class ClientSplits:
    train: Dataset
    val: Dataset
    test: Dataset


def client_task_splits(run: RunConfig, task: str, holders: list[int], partition_id: int) -> ClientSplits:
    """This client's train / validation / test data for `task`, shared among `holders`."""
    if partition_id not in holders:
        raise ValueError(f"client {partition_id} does not hold task {task!r}")
    partitioner = _task_partitioner(run, task, len(holders))
    part = partitioner.load_partition(holders.index(partition_id))
    if len(part) < 3:
        raise ValueError(f"client {partition_id} got {len(part)} examples of {task!r}: too few to split; "
                         "raise data.examples_per_task or use fewer clients")
    return split_client_data(run, part, partition_id)


def generated_client_splits(run: RunConfig, task: str, partition_id: int) -> ClientSplits:
    """This client's own `data.examples_per_client` examples of a synthetic task, generated from its
    partition id when first asked: nothing task-wide is built, so a federation of any size costs
    nothing until a client is sampled. Labels are iid, or (dirichlet) drawn from the client's own
    Dirichlet(alpha) class mix, the label skew the shared partitioner gives."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"data.examples_per_client generates synthetic tasks only, not {task!r}")
    n, num_classes = run.data.examples_per_client, SYNTHETIC_TASKS[task].num_classes
    rng = np.random.default_rng([run.seed, _task_index(task), partition_id, 0x1A2])
    if run.data.partitioner == "dirichlet":
        labels = rng.choice(num_classes, size=n, p=rng.dirichlet(np.full(num_classes, run.data.dirichlet_alpha)))
    else:
        labels = rng.integers(num_classes, size=n)
    return split_client_data(run, _generate(task, n, rng, run.model.image_size, labels), partition_id)


def local_task_splits(run: RunConfig, task: str, data_path: str, partition_id: int, modalities: tuple[str, ...],
                      num_classes: int) -> ClientSplits:
    """A node's own data for `task` instead of a generated partition: `<data_path>/<task>`, a dataset
    saved with `datasets.Dataset.save_to_disk`, with an `image` column (H x W x 3 uint8) and / or a
    `text` column, as the task reads, and an integer `label` column; split as a partition is."""
    folder = Path(data_path) / task
    where = f"node config data-path={data_path!r}, task {task!r}"
    try:
        part = Dataset.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{where}: no dataset saved in {str(folder)!r} ({err})") from None
    missing = [c for c in (*modalities, "label") if c not in part.column_names]
    if missing:
        raise ValueError(f"{where}: columns {missing} are missing (has {part.column_names})")
    labels = np.asarray(part["label"])
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{where}: labels must be integers in 0..{num_classes - 1}")
    if len(part) < 3:
        raise ValueError(f"{where}: {len(part)} examples are too few to split into train / validation / test")
    return split_client_data(run, part.select_columns([*modalities, "label"]), partition_id)


def split_client_data(run: RunConfig, part: Dataset, partition_id: int) -> ClientSplits:
    """A client's examples of one task -> train / validation / test, by the config's fractions (seeded)."""
    n = len(part)
    n_val = max(1, round(n * run.data.val_fraction))
    n_test = max(1, round(n * run.data.test_fraction))
    order = np.random.default_rng([run.seed, partition_id]).permutation(n)
    train, val, test = np.split(order, [n - n_val - n_test, n - n_test])
    return ClientSplits(train=part.select(train), val=part.select(val), test=part.select(test))


def _run_key(run: RunConfig) -> str:
    import json
    from dataclasses import asdict

    return json.dumps([asdict(run.data), run.seed, run.model.image_size], sort_keys=True)
