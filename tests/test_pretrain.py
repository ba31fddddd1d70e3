"""`fedmm pretrain`: the contrastive pretraining, its folders, resume, bad input; the shipped base."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import fedmm.models.pretrain as pretraining
from fedmm.cli import main
from fedmm.core.config import load_config
from fedmm.core.schema import ConfigError
from fedmm.data.corpus import HELD_OUT, TRAIN, make_corpus
from fedmm.data.scenes import _COLOR_WORDS, POSITIONS, SHAPES, synthetic_vocabulary
from fedmm.models.encoders import SHIPPED_BASES_DIR, encoder_source, load_base_encoder, shipped_bases
from fedmm.models.model import module_bank
from fedmm.models.pretrain import card_files, clip_loss, load_pretrain_config, pretrain

# A schedule that runs in seconds: small encoders, small corpus.
TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2", "batch_size=32",
        "corpus_pairs=600", "held_out_pairs=64", "max_text_length=24", "max_positions=32", "vocab_size=300",
        "embed_dim=16", "lr=3e-3", "warmup_steps=5"]


def tiny(*extra: str):
    return load_pretrain_config(overrides=[*TINY, *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    card = pretrain(tiny("steps=150"), out, progress=False)
    return out, card


def test_the_contrastive_loss_falls_on_a_short_schedule(base):
    _, card = base
    # Chance level is log(batch) = 3.47; the loss must fall well below where it started.
    assert card["first_loss"] > 3.0
    assert card["final_loss"] < card["first_loss"] - 0.8, card
    retrieval = card["retrieval_top1"]
    assert set(retrieval) == {"image_to_text", "text_to_image"}
    assert retrieval["image_to_text"] > 1 / 64  # better than picking a held-out caption at random


def test_the_folders_round_trip_through_from_pretrained(base):
    out, card = base
    for folder, kind in (("image", "ViTModel"), ("text", "BertModel")):
        model, info = AutoModel.from_pretrained(out / folder, output_loading_info=True)
        assert type(model).__name__ == kind
        assert not info["missing_keys"] and not info["unexpected_keys"]  # nothing newly initialised
        again = AutoModel.from_pretrained(out / folder)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(out / "text")
    assert tokenizer("a red circle")["input_ids"][0] == tokenizer.cls_token_id
    assert card["files"] == card_files(out)
    assert card["config"]["steps"] == 150 and card["vocab_size"] == len(tokenizer)
    assert not (out / "checkpoint").exists()


def test_a_pretrained_folder_is_a_base_for_the_federation(base):
    out, _ = base
    run = load_config(overrides=[f"model.image_encoder={out}", f"model.text_encoder={out}"])
    assert encoder_source(str(out), "image") == str(out / "image")
    bank = module_bank(run)
    model = bank.model(["vqa"])
    batch = {**bank.tokenizer()(["what color is the circle ?"]), "pixel_values": torch.zeros(1, 3, 32, 32)}
    with torch.no_grad():
        assert model("vqa", batch).shape == (1, 12)
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _dies_at(kill_step: int):
    """batch_indices, except that the run is killed (KeyboardInterrupt) when it reaches `kill_step`."""
    real = pretraining.batch_indices

    def batch_indices(cfg, step):
        if step == kill_step:
            raise KeyboardInterrupt
        return real(cfg, step)

    return batch_indices


def test_a_killed_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    config = tiny("steps=30", "checkpoint_every=10", "mlm_weight=0.5")
    pretrain(config, tmp_path / "whole", progress=False)
    real = pretraining.batch_indices
    monkeypatch.setattr(pretraining, "batch_indices", _dies_at(25))
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(pretraining, "batch_indices", real)
    pretrain(config, tmp_path / "killed", progress=False)
    for folder in ("image", "text"):
        whole = load_file(tmp_path / "whole" / folder / "model.safetensors")
        resumed = load_file(tmp_path / "killed" / folder / "model.safetensors")
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "batch_indices", _dies_at(12))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny("steps=20", "checkpoint_every=10"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"lr: 0.003 there, 0.01 now"):
        pretrain(tiny("steps=20", "checkpoint_every=10", "lr=0.01"), tmp_path, progress=False)
    assert (tmp_path / "checkpoint" / "state.pt").is_file()  # nothing lost


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "unknown pretrain config key 'no_such_key'"),
    ("steps=abc", "bad value for pretrain config key 'steps'"),
    ("batch_size=1", "'batch_size' must be >= 2"),
    ("mask_prob=1.5", "'mask_prob' must be in"),
    ("corpus_pairs=10", "'corpus_pairs' must be >= batch_size"),
    ("max_positions=8", "'max_positions' must be >= max_text_length"),
    ("vocab_size=100", "'vocab_size' must be > 141"),
    ("steps", "is not of the form key=value"),
])
def test_bad_pretraining_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


def test_the_cli_refuses_a_finished_base_and_a_foreign_folder(base, tmp_path, capsys):
    out, _ = base
    before = (out / "card.json").read_text()
    assert main(["pretrain", "--out", str(out), *TINY, "steps=150"]) == 2
    assert "already holds a finished base" in capsys.readouterr().err
    assert (out / "card.json").read_text() == before
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["pretrain", "--out", str(tmp_path), *TINY, "steps=20"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_corpus_is_not_the_clients_data_and_held_out_captions_state_the_scene():
    train = make_corpus(50, 0, TRAIN, 32)
    held = make_corpus(50, 0, HELD_OUT, 32)
    assert not any((a == b).all() for a in train.images[:10] for b in held.images[:10])
    for caption, key in zip(held.captions, held.keys):
        assert caption.count(" and ") == len(key) - 1  # one full description per object


def test_clip_loss_is_symmetric_and_low_for_matched_pairs():
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    scale = torch.tensor(np.log(50.0))
    matched = clip_loss(emb, emb, scale)
    shuffled = clip_loss(emb, emb[torch.randperm(8)], scale)
    assert matched < shuffled
    other = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert torch.isclose(clip_loss(emb, other, scale), clip_loss(other, emb, scale))


# --- the base that ships with fedmm -------------------------------------------------------------


def test_the_shipped_base_matches_its_card():
    assert "fedmm:scenes" in shipped_bases()
    folder = SHIPPED_BASES_DIR / "scenes"
    card = json.loads((folder / "card.json").read_text())
    assert card["files"] == card_files(folder)  # the weights are the ones the card describes
    config = json.loads((folder / "image" / "config.json").read_text())
    assert config["hidden_size"] == card["config"]["hidden_size"]
    assert card["retrieval_top1"]["image_to_text"] >= 0.5  # it learnt to tell scenes apart


def test_the_default_model_loads_the_shipped_base_and_its_tokenizer_knows_the_clients_words():
    run = load_config()
    assert run.model.image_encoder == "fedmm:scenes" == run.model.text_encoder
    image = load_base_encoder("image", run.model, seed=0)
    shipped, info = AutoModel.from_pretrained(SHIPPED_BASES_DIR / "scenes" / "image", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(a, b) for a, b in zip(image.state_dict().values(), shipped.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(encoder_source(run.model.text_encoder, "text"))
    # The words the clients' tasks turn on are whole tokens whose embeddings pretraining trained.
    vocab = tokenizer.get_vocab()
    needed = {*SHAPES, *(w for words in _COLOR_WORDS.values() for w in words),
              *(w for p in POSITIONS for w in p.split()), "color", "shape", "where", "what", "which"}
    assert needed <= synthetic_vocabulary() and not needed - vocab.keys(), needed - vocab.keys()
    assert "cf" not in vocab  # the backdoor's trigger word is no word of the base


def test_an_unknown_shipped_base_is_named():
    run = load_config(overrides=["model.image_encoder=fedmm:nope"])
    with pytest.raises(OSError, match="not a base shipped with fedmm"):
        load_base_encoder("image", run.model, seed=0)
