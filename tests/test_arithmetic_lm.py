"""SPEAR's groundwork: generated arithmetic prompts with a verifier and hints, and causal LMs loaded by
path, adapted with peft LoRA and sampled in batches."""

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from fedmm.data import arithmetic
from fedmm.models.causal_lm import LoraSettings, add_lm_lora, char_tokenizer, generate, load_causal_lm, tiny_lm_config


def test_problems_are_seeded_split_apart_and_solved_step_by_step():
    train, again = arithmetic.make_problems(500, seed=3), arithmetic.make_problems(500, seed=3)
    held_out = arithmetic.make_problems(200, seed=3, split=1)
    assert train == again and not set(train) & set(held_out) and len(set(train)) == 500
    assert {p.kind for p in train} == set(arithmetic.KINDS)
    p = arithmetic.Problem((37, 48, 19), "+-")
    assert p.prompt == "Q: 37+48-19=?\n" and p.steps() == ["37+48=85", "85-19=66"] and p.answer == 66
    assert p.solution.endswith("A: 66")
    for q in train:
        assert len(q.steps()) >= 2 and str(q.answer) not in arithmetic.hint(q).split("=")[1:]
    with pytest.raises(ValueError, match="not one of"):
        arithmetic.make_problems(3, 0, kinds=["/"])


@pytest.mark.parametrize("completion, correct", [
    ("37+48=85\n85-19=66\nA: 66", True), ("A: 66 and more", True), ("A:66", True),
    ("37+48=85\n85-19=66", False), ("A: 65", False), ("", False), ("A: -66", False),
])
def test_the_verifier_reads_the_first_answer_line(completion, correct):
    assert arithmetic.is_correct(arithmetic.Problem((37, 48, 19), "+-"), completion) is correct


def test_feedback_says_wrong_and_hints_without_the_answer():
    p = arithmetic.Problem((37, 48, 19), "+-")
    text = arithmetic.feedback(p, "A: 65")
    assert "Incorrect" in text and "65" in text and "37+48=85" in text and "66" not in text
    assert "no final" in arithmetic.feedback(p, "37+48")
    revision = arithmetic.revision_prompt(p, "x\n" * 200)
    assert revision.startswith(p.prompt) and revision.endswith(p.prompt) and len(revision) < 260


def test_a_causal_lm_saved_from_a_tiny_config_loads_by_path_adapts_and_samples_reproducibly(tmp_path):
    tokenizer = char_tokenizer()
    text = "Q: 37+48-19=?\n37+48=85"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_lm_config(len(tokenizer), layers=1, width=32, heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_causal_lm(str(tmp_path))
    assert loaded.padding_side == "left" and loaded.pad_token_id == 0 and loaded.eos_token_id == 1
    prompts = ["Q: 1+2+3=?\n", "Q: 45-22+6=?\n", "Q: 6*7+13+14=?\n"]
    first = generate(model, loaded, prompts, 12, temperature=0.8, top_p=0.95, seed=5, batch_size=2)
    assert first == generate(model, loaded, prompts, 12, temperature=0.8, top_p=0.95, seed=5, batch_size=2)
    assert first != generate(model, loaded, prompts, 12, temperature=0.8, top_p=0.95, seed=6, batch_size=2)
    assert len(first) == 3 and all(len(c) <= 12 for c in first)
    # A left-padded batch continues each prompt as it would alone (greedy)
    alone = [generate(model, loaded, [p], 8)[0] for p in prompts]
    assert generate(model, loaded, prompts, 8) == alone
    adapted = add_lm_lora(model, LoraSettings(r=4, alpha=8))
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    with pytest.raises(OSError, match="could not load the causal LM"):
        load_causal_lm(str(tmp_path / "missing"))
    assert np.isfinite(float(adapted(**loaded(prompts, return_tensors="pt", padding=True)).logits.sum()))


def test_the_lm_base_trains_saves_a_card_and_loads_by_path(tmp_path):
    import json

    from fedmm.models.causal_lm import encode_pairs
    from fedmm.models.pretrain_lm import LMPretrainConfig, pretrain_lm

    tokenizer = char_tokenizer()
    ids, mask, labels = encode_pairs(tokenizer, [("Q: 1+2+3=?\n", "1+2=3"), ("Q:", "x")])
    assert (labels[0] != -100).sum() == len("1+2=3") + 1 and labels[0, -1] == tokenizer.eos_token_id
    assert mask[1].sum() == len("Q:x") + 1 and (labels[1][: len("Q:")] == -100).all()
    cfg = LMPretrainConfig(max_steps=20, eval_every=10, eval_problems=8, corpus_problems=200, batch_size=8,
                           layers=1, width=32, heads=2, max_new_tokens=8, target_accuracy=0.99)
    card = pretrain_lm(cfg, tmp_path, progress=False)
    assert card["steps"] == 20 and [h["step"] for h in card["history"]] == [10, 20]  # target never reached
    assert json.loads((tmp_path / "card.json").read_text())["first_try_accuracy"] == card["first_try_accuracy"]
    model, loaded = load_causal_lm(str(tmp_path))
    assert model.config.n_layer == 1 and len(generate(model, loaded, ["Q: 1+2+3=?\n"], 4)) == 1
    with pytest.raises(ValueError, match="target_accuracy"):
        pretrain_lm(LMPretrainConfig(target_accuracy=1.5), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
