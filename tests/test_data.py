import numpy as np
import pytest
from datasets import Dataset

from fedmm.training.client import task_holders
from fedmm.data.scenes import (
    COLORS,
    SHAPES,
    _COLOR_WORDS,
    client_task_splits,
    generated_client_splits,
    make_synthetic_task,
    map_hf_columns,
    synthetic_vocabulary,
)
from fedmm.models.encoders import HashingTokenizer


def test_synthetic_tasks_have_the_declared_label_ranges_and_are_deterministic():
    for task, classes in (("img_shape", 4), ("txt_color", 4), ("vqa", 12)):
        a = make_synthetic_task(task, 200, seed=3)
        b = make_synthetic_task(task, 200, seed=3)
        labels = np.asarray(a["label"])
        assert labels.min() >= 0 and labels.max() < classes
        assert len(set(labels.tolist())) == classes
        assert a["text"] == b["text"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert make_synthetic_task("vqa", 50, seed=4)["text"] != make_synthetic_task("vqa", 50, seed=3)["text"]


def test_caption_labels_follow_the_words():
    ds = make_synthetic_task("txt_color", 300, seed=0)
    for text, label in zip(ds["text"], ds["label"]):
        words = set(text.split())
        assert words & set(_COLOR_WORDS[COLORS[label]]), text
        others = {w for c in COLORS if c != COLORS[label] for w in _COLOR_WORDS[c]}
        assert not words & others


def test_vqa_answers_match_the_question_kind():
    ds = make_synthetic_task("vqa", 300, seed=0)
    for text, label in zip(ds["text"], ds["label"]):
        if "shape" in text and "color" not in text:
            assert 4 <= label < 8, text
        if "where" in text or "corner" in text or "placed" in text:
            assert 8 <= label < 12, text


def test_image_classes_differ_in_the_pixels():
    ds = make_synthetic_task("img_shape", 400, seed=0).with_format("numpy")
    images, labels = np.asarray(ds["image"], dtype=np.float32), np.asarray(ds["label"])
    # The bright object covers a different area per shape: mean brightness separates the classes.
    area = [(images[labels == s].max(-1) > 120).mean() for s in range(len(SHAPES))]
    assert max(area) - min(area) > 0.01


def test_tokenizer_has_no_collision_on_the_generated_vocabulary():
    tok = HashingTokenizer(16)
    words = synthetic_vocabulary()
    assert len({tok.token_id(w) for w in words}) == len(words)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_splits_do_not_overlap(small_run, partitioner):
    small_run.data.partitioner = partitioner
    holders = task_holders(small_run, "img_shape")
    assert holders == [0, 2, 3, 5]  # profiles cycle image, text, multimodal
    seen = []
    for p in holders:
        splits = client_task_splits(small_run, "img_shape", holders, p)
        parts = [splits.train, splits.val, splits.test]
        assert all(len(s) > 0 for s in parts)
        fingerprints = [{np.asarray(x).tobytes() for x in s.with_format("numpy")["image"]} for s in parts]
        assert not (fingerprints[0] & fingerprints[1]) and not (fingerprints[0] & fingerprints[2])
        seen.append(sum(len(s) for s in parts))
    assert sum(seen) == small_run.data.examples_per_task


def test_dirichlet_partitions_are_skewed(small_run):
    small_run.data.dirichlet_alpha = 0.1
    holders = task_holders(small_run, "img_shape")
    dists = []
    for p in holders:
        labels = np.asarray(client_task_splits(small_run, "img_shape", holders, p).train["label"])
        dists.append(np.bincount(labels, minlength=4) / len(labels))
    assert max(d.max() for d in dists) > 0.5


@pytest.mark.parametrize("task", ["img_shape", "txt_color", "vqa"])
def test_generated_client_data_is_the_clients_own_and_labels_follow_the_scene(small_run, task):
    small_run.data.examples_per_client = 60
    small_run.data.dirichlet_alpha = 0.1
    a, again = generated_client_splits(small_run, task, 7), generated_client_splits(small_run, task, 7)
    other = generated_client_splits(small_run, task, 8)
    assert sum(len(s) for s in (a.train, a.val, a.test)) == 60
    assert list(a.train["text"]) == list(again.train["text"]) and list(a.train["label"]) == list(again.train["label"])
    assert np.array_equal(np.asarray(a.train.with_format("numpy")["image"]),
                          np.asarray(again.train.with_format("numpy")["image"]))
    assert list(a.train["text"]) != list(other.train["text"]) or list(a.train["label"]) != list(other.train["label"])
    labels = np.concatenate([np.asarray(x["label"]) for x in (a.train, a.val, a.test)])
    assert np.bincount(labels).max() / len(labels) > 0.5  # alpha 0.1: a skewed class mix
    if task == "txt_color":  # the caption names the forced color
        for text, label in zip(a.train["text"], a.train["label"]):
            assert set(text.split()) & set(_COLOR_WORDS[COLORS[label]]), text
    if task == "vqa":  # the question asks what the label answers
        for text, label in zip(a.train["text"], a.train["label"]):
            if "where" in text or "corner" in text or "placed" in text:
                assert 8 <= label < 12, text
            if "color" in text and "shape" not in text:
                assert label < 4, text
    if task == "img_shape":  # the forced shape is drawn: same-label scenes share a footprint
        ds = a.train.with_format("numpy")
        bright = (np.asarray(ds["image"], dtype=np.float32).max(-1) > 120).mean((1, 2))
        assert bright.min() > 0.02


def test_iid_generated_client_data_covers_the_classes(small_run):
    small_run.data.examples_per_client = 200
    small_run.data.partitioner = "iid"
    s = generated_client_splits(small_run, "vqa", 0)
    labels = np.concatenate([np.asarray(x["label"]) for x in (s.train, s.val, s.test)])
    assert len(set(labels)) == 12 and max(np.bincount(labels)) < 0.2 * 200


def test_hf_columns_are_mapped():
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict({
        "img": [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(6)],
        "question": [f"q {i}" for i in range(6)],
        "answer": [i % 3 for i in range(6)],
    })
    mapped = map_hf_columns(ds, "img", "question", "answer", image_size=32)
    assert mapped.column_names == ["image", "text", "label"]
    assert np.asarray(mapped[0]["image"]).shape == (32, 32, 3)
    assert mapped["text"][2] == "q 2" and mapped["label"] == [0, 1, 2, 0, 1, 2]
    text_only = map_hf_columns(ds.remove_columns("img"), "", "question", "answer", image_size=8)
    assert np.asarray(text_only[0]["image"]).sum() == 0


def test_hf_mapping_names_a_missing_column():
    ds = Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(ValueError, match="data.hf_label_column='y'"):
        map_hf_columns(ds, "", "text", "y", image_size=8)


def test_a_saved_hf_dataset_feeds_a_federation(tmp_path):
    """`data.source=hf` with a `save_to_disk` folder: loaded, mapped, partitioned, trained on."""
    from datasets import DatasetDict
    from local_grid import LocalGrid

    from fedmm.core.config import load_config

    rng = np.random.default_rng(0)
    n = 240
    labels = rng.integers(0, 3, n)
    words = np.array(["alpha", "beta", "gamma"])
    ds = Dataset.from_dict({
        "picture": [np.full((16, 16, 3), 80 * int(lab), dtype=np.uint8) for lab in labels],
        "prompt": [f"item {w} here" for w in words[labels]],
        "target": labels.tolist(),
    })
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    run = load_config(overrides=[
        "data.source=hf", f"data.hf_name={tmp_path / 'ds'}", "data.hf_task=toy", "data.hf_image_column=picture",
        "data.hf_text_column=prompt", "data.hf_label_column=target", "data.hf_num_classes=3",
        "clients.num=2", "clients.profiles.all=toy", "rounds=1", "train.local_steps=2", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32",
        "model.intermediate_size=64", "model.fusion_dim=16", f"out={tmp_path / 'out'}"])
    splits = client_task_splits(run, "toy", [0, 1], 1)
    assert len(splits.train) + len(splits.val) + len(splits.test) > 50
    assert np.asarray(splits.train[0]["image"]).shape == (32, 32, 3)

    from client_apps.app import make_client_app
    from server_app.runner import run_federation

    summary = run_federation(LocalGrid(make_client_app(run), 2), run)
    assert "final.global.toy.accuracy" in summary


def test_a_node_can_train_on_its_own_data_from_a_local_path(tmp_path):
    from fedmm.training import client
    from fedmm.core.config import load_config
    from fedmm.data.scenes import make_synthetic_task

    make_synthetic_task("txt_color", 60, seed=5).save_to_disk(str(tmp_path / "txt_color"))
    run = load_config(overrides=["clients.num=3", "data.examples_per_task=300", "train.local_steps=3",
                                 "train.batch_size=8", f"out={tmp_path / 'out'}"])
    me = client.identify(run, {"partition-id": 1, "data-path": str(tmp_path)})  # the text client
    splits = {s: len(client.client_data(run, me, s)["txt_color"]) for s in ("train", "val", "test")}
    assert splits == {"train": 39, "val": 9, "test": 12}  # 60 examples, 15% / 20% held out
    generated = client.identify(run, {"partition-id": 1})
    assert len(client.client_data(run, generated, "train")["txt_color"]) != 39
    vectors = client.module_bank(run).initial_vectors(list(me.tasks))
    _, examples, _, _ = client.train(run, me, vectors, 1)
    assert examples == 3 * 8


def test_a_bad_local_data_path_names_the_node_config_key(tmp_path):
    import pytest

    from fedmm.training import client
    from fedmm.core.config import load_config

    run = load_config(overrides=["clients.num=3", "data.examples_per_task=300"])
    me = client.identify(run, {"partition-id": 0, "data-path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="data-path"):
        client.client_data(run, me, "train")
    from fedmm.data.scenes import make_synthetic_task

    make_synthetic_task("txt_color", 30, seed=1).select_columns(["label"]).save_to_disk(str(tmp_path / "t" / "txt_color"))
    me = client.identify(run, {"partition-id": 1, "data-path": str(tmp_path / "t")})
    with pytest.raises(ValueError, match=r"columns \['text'\] are missing"):
        client.client_data(run, me, "train")
