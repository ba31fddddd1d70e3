"""Online fine-tuning of a causal LM from feedback (SPEAR and its baselines): pairs, losses, bad input,
and a Hugging Face model written to disk from a tiny config that trains a SPEAR round."""

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from fedmm.core.config import load_config
from fedmm.core.schema import ConfigError, FeedbackConfig, TrainConfig
from fedmm.data import arithmetic
from fedmm.models.causal_lm import (LanguageModel, LoraSettings, add_lm_lora, char_tokenizer, encode_pairs,
                                    load_causal_lm, tiny_lm_config)
from fedmm.training import feedback

P1, P2, P3 = (arithmetic.Problem((37, 48, 19), "+-"), arithmetic.Problem((12, 30, 5), "++"),
              arithmetic.Problem((6, 7, 13), "*+"))


def _tiny(tmp_path, layers=1, width=32) -> LanguageModel:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_lm_config(len(tokenizer), layers=layers, width=width, heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm, loaded = load_causal_lm(str(tmp_path))
    return LanguageModel(add_lm_lora(lm, LoraSettings(r=4, alpha=8)), loaded)


def _scripted(monkeypatch, answers: dict[str, list[str]]):
    """Replace sampling: each prompt's answers in turn, keyed by the problem's question line."""
    calls = []

    def fake_sample(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=64):
        calls.append(list(prompts))
        return [(answers[p.rsplit("Q: ", 1)[1]].pop(0), True) for p in prompts]

    monkeypatch.setattr(feedback, "sample", fake_sample)
    return calls


def test_spear_pairs_a_fixed_revision_with_the_original_prompt_and_weighs_its_lose(monkeypatch, tmp_path):
    model = _tiny(tmp_path)
    key = {p: p.prompt[3:] for p in (P1, P2, P3)}
    calls = _scripted(monkeypatch, {
        key[P1]: ["37+48=85\n85-19=60\nA: 60", "37+48=85\n85-19=66\nA: 66"],  # fixed by the first revision
        key[P2]: ["A: 40", "A: 41", "12+30=42\nA: 43"],  # never fixed
        key[P3]: ["6*7=42\n42+13=55\nA: 55\nextra"],  # right at once
    })
    got = feedback.collect(model, [P1, P2, P3], "spear", FeedbackConfig(), seed=0)
    assert got.wins == [(P3.prompt, "6*7=42\n42+13=55\nA: 55"), (P1.prompt, "37+48=85\n85-19=66\nA: 66")]
    assert got.loses == [(P1.prompt, "37+48=85\n85-19=60\nA: 60", 1.0, "37+48=85\n85-19=66\nA: 66", "37+48=85\n"),
                         (P2.prompt, "A: 40", 0.5, "", "12+30=42\n")]  # and the working the hint shows
    assert (got.counts["first-correct"], got.counts["wrong"], got.counts["revised-correct"]) == (1, 2, 1)
    # Revisions see the previous answer and the feedback; the second revision only the unfixed problem.
    assert len(calls) == 3 and calls[2] == [arithmetic.revision_prompt(P2, "A: 41")]
    assert "Hint: 12+30=42" in calls[1][1] and "43" not in calls[1][1]


def test_rejection_sft_never_revises_and_loses_are_capped_surest_first(monkeypatch, tmp_path):
    model = _tiny(tmp_path)
    calls = _scripted(monkeypatch, {P1.prompt[3:]: ["A: 1"], P2.prompt[3:]: ["A: 2"], P3.prompt[3:]: ["A: 55"]})
    got = feedback.collect(model, [P1, P2, P3], "rejection_sft", FeedbackConfig(), seed=0)
    assert len(calls) == 1 and got.wins == [(P3.prompt, "A: 55")] and got.counts["revised-correct"] == 0
    loses = [("a", "x", 0.5), ("b", "y", 1.0), ("c", "z", 0.5), ("d", "w", 1.0)]
    kept = feedback.capped_loses(loses, wins=1, ratio=2.0, rng=np.random.default_rng(0))
    assert sorted(kept) == [("b", "y", 1.0), ("d", "w", 1.0)]
    assert feedback.capped_loses(loses, wins=0, ratio=2.0, rng=np.random.default_rng(0)) == []


def test_unlikelihood_masks_eos_and_the_answer_marker_keeps_the_last_tokens_and_is_gated(tmp_path):
    model = _tiny(tmp_path)
    pairs = [("Q: 1+2+3=?\n", "1+2=3\nA: 7", 1.0)]
    _, _, labels = encode_pairs(model.tokenizer, [p[:2] for p in pairs])
    mask = feedback._completion_mask(model, pairs, labels, tokens=0)
    kept = model.tokenizer.decode(labels[0][mask[0]].tolist())
    assert kept == "1+2=3"  # the working: not the answer line, whitespace or EOS
    last = feedback._completion_mask(model, pairs, labels, tokens=2)
    assert model.tokenizer.decode(labels[0][last[0]].tolist()) == "=3"
    # divergence: from where the lose departs from the revision that fixed it (the slip), not before
    slips = [("Q: 37+48-19=?\n", "37+48=84\n84-19=65\nA: 65", 1.0, "37+48=85\n85-19=66\nA: 66"),
             ("Q: 37+48-19=?\n", "37+48=84\nA: 84", 0.5, "")]
    _, _, slip_labels = encode_pairs(model.tokenizer, [p[:2] for p in slips])
    at_slip = feedback._completion_mask(model, slips, slip_labels, tokens=2, window="divergence")
    assert model.tokenizer.decode(slip_labels[0][at_slip[0]].tolist()) == "48"  # "84" from its "4" on, then "8"
    assert not at_slip[1].any()  # nothing fixed it: no slip known, no unlikelihood
    # feedback: an unfixed lose's slip located by the working the hint revealed; none if it follows all of it
    revealed = arithmetic.hinted_working(P1)
    hinted = [(*slips[1][:4], revealed), ("Q: 37+48-19=?\n", "37+48=85\n85-19=65\nA: 65", 0.5, "", revealed),
              (*slips[0][:4], revealed)]
    _, _, hint_labels = encode_pairs(model.tokenizer, [p[:2] for p in hinted])
    by_hint = feedback._completion_mask(model, hinted, hint_labels, tokens=2, window="feedback")
    assert [model.tokenizer.decode(hint_labels[i][by_hint[i]].tolist()) for i in range(3)] == ["4", "", "48"]
    # (the first: its slip is the last token of the working; a newline and the answer line follow)
    # a fixing revision outranks the hint (which this lose follows all of); spaces are layout, not a slip
    late = [("Q: 37+48-19=?\n", "37+48=85\n85-19=65\nA: 65", 1.0, "37+48=85\n85-19=66\nA: 66", revealed),
            ("Q: 37+48-19=?\n", "37 + 48 = 85\n85 - 19 = 65\nA: 65", 0.5, "", revealed),
            ("Q: 37+48-19=?\n", "37 + 48 = 84\nA: 84", 0.5, "", revealed)]
    _, _, late_labels = encode_pairs(model.tokenizer, [p[:2] for p in late])
    by_fix = feedback._completion_mask(model, late, late_labels, tokens=2, window="feedback")
    assert [model.tokenizer.decode(late_labels[i][by_fix[i]].tolist()) for i in range(3)] == ["5", "", "4"]
    loose = feedback.unlikelihood_loss(model, pairs, FeedbackConfig(ul_threshold=0.0, ul_tokens=0, ul_window="last"), torch.device("cpu"))
    gated = feedback.unlikelihood_loss(model, pairs, FeedbackConfig(ul_threshold=0.99, ul_tokens=0, ul_window="last"), torch.device("cpu"))
    assert loose > 0 and gated == 0  # an untrained model gives no token 0.99
    half = feedback.unlikelihood_loss(model, [(*pairs[0][:2], 0.5)], FeedbackConfig(ul_threshold=0.0, ul_tokens=0, ul_window="last"),
                                      torch.device("cpu"))
    assert float(half) == pytest.approx(float(loose) / 2)
    # MLE is the token mean over completion and EOS, as the model's own loss computes it
    ids, mask_, labels = encode_pairs(model.tokenizer, [p[:2] for p in pairs])
    ours = feedback.mle_loss(model, [p[:2] for p in pairs], torch.device("cpu"))
    assert float(ours) == pytest.approx(float(model.lm(input_ids=ids, attention_mask=mask_, labels=labels).loss), rel=1e-5)


def _memorised(tmp_path, problems) -> LanguageModel:
    """A tiny GPT-2 saved from a config, then taught a few worked solutions (full fine-tuning), so that
    sampling answers some of them right: real wins for a real SPEAR round."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_lm_config(len(tokenizer), layers=2, width=64, heads=2))
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    ids, mask, labels = encode_pairs(tokenizer, [(p.prompt, p.solution) for p in problems])
    for _ in range(150):
        loss = base(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm, loaded = load_causal_lm(str(tmp_path))
    return LanguageModel(add_lm_lora(lm, LoraSettings(r=4, alpha=8)), loaded)


def test_a_causal_lm_saved_from_a_tiny_config_loads_by_path_and_trains_a_spear_round(tmp_path):
    problems = arithmetic.make_problems(6, seed=1)
    model = _memorised(tmp_path, problems)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg, train = FeedbackConfig(max_new_tokens=24), TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    got, result = feedback.feedback_round(model, problems * 2, "spear", cfg, train, 1e-2, seed=0,
                                          device=torch.device("cpu"))
    assert got.counts["prompts"] == 12 and got.counts["wins"] > 0 and result.steps == 3
    assert set(result.losses) == ({"mle-loss", "ul-loss"} if got.loses else {"mle-loss"})
    assert all(np.isfinite(v) for v in result.losses.values())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    # every win is a verified answer to its own prompt
    by_prompt = {p.prompt: p for p in problems}
    assert all(arithmetic.is_correct(by_prompt[q], a) for q, a in got.wins)


def test_bad_input_is_recorded_and_skipped_never_crashing_the_round(monkeypatch, tmp_path):
    model = _tiny(tmp_path)
    odd = arithmetic.Problem((3, 4, 5), "/+")  # "/" is no character of the tokenizer
    long = arithmetic.Problem(tuple(range(10, 10 + 200)), "+" * 199)  # longer than the model's positions
    calls = _scripted(monkeypatch, {P1.prompt[3:]: ["", "", ""], P3.prompt[3:]: ["A: 55"]})
    got = feedback.collect(model, [odd, long, P1, P3], "spear", FeedbackConfig(), seed=0)
    assert got.counts["unencodable"] == 2 and got.counts["prompts"] == 2 and calls[0] == [P1.prompt, P3.prompt]
    assert got.counts["empty"] == 3 and got.loses == []  # an empty answer has nothing to unlearn
    # over-long: no answer line before max_new_tokens
    _scripted(monkeypatch, {P1.prompt[3:]: ["1+1=2\n2+2=4\n"] * 3})
    monkeypatch.setattr(feedback, "sample", lambda *a, **k: [("37+48=85\n85", False)] * len(a[2]))
    assert feedback.collect(model, [P1], "spear", FeedbackConfig(), seed=0).counts["over-long"] == 3
    # a non-finite loss skips the step and leaves the model as it was
    monkeypatch.setattr(feedback, "mle_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    got = feedback.Collected(wins=[(P3.prompt, "A: 55")])
    result = feedback.train_on_pairs(model, got, FeedbackConfig(), TrainConfig(local_steps=2, batch_size=2),
                                     1e-2, 0, torch.device("cpu"))
    assert (result.steps, result.nonfinite) == (0, 2)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_grpo_trains_on_groups_whose_rewards_differ(monkeypatch, tmp_path):
    model = _tiny(tmp_path)
    _scripted(monkeypatch, {P1.prompt[3:]: ["A: 66", "A: 1"], P3.prompt[3:]: ["A: 2", "A: 3"]})
    cfg = FeedbackConfig(grpo_group=2)
    got, result = feedback.grpo_round(model, [P1, P3], cfg, TrainConfig(local_steps=2, batch_size=4), 1e-2, 0,
                                      torch.device("cpu"))
    assert got.wins == [(P1.prompt, "A: 66")] and result.steps == 2 and result.losses["grpo-kl"] >= 0
    _scripted(monkeypatch, {P3.prompt[3:]: ["A: 2", "A: 3"]})  # no reward anywhere: nothing to learn
    assert feedback.grpo_round(model, [P3], cfg, TrainConfig(local_steps=2), 1e-2, 0, torch.device("cpu"))[1].steps == 0


@pytest.mark.parametrize("overrides, match", [
    (["train.objective=spear"], "do not go together"),
    (["model.language_model=x", "train.objective=spear"], "do not go together"),
    (["model.language_model=x", "train.objective=spear", "data.source=arithmetic", "defense.name=trust"], "trust"),
    (["model.language_model=x", "train.objective=spear", "data.source=arithmetic", "personal.method=tap"], "tap"),
    (["model.language_model=x", "train.objective=grpo", "data.source=arithmetic", "feedback.grpo_group=1"], "grpo"),
    (["model.language_model=x", "train.objective=spear", "data.source=arithmetic", "feedback.top_p=0"], "top_p"),
    (["model.language_model=x", "train.objective=grpo", "data.source=arithmetic", "feedback.temperature=0"],
     "temperature > 0"),
    (["model.language_model=x", "train.objective=spear", "data.source=arithmetic", "train.local_steps=0",
      "train.local_epochs=1"], "local_steps"),
])
def test_language_model_configs_that_cannot_run_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def _reply(content):
    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=metadata, content=content)


def test_a_language_model_client_round_passes_the_servers_reply_check_weighted_by_its_wins(tmp_path):
    from fedmm.core import protocol
    from fedmm.models.model import client_components, initial_global_vectors
    from fedmm.training import client

    run = load_config(None, [f"model.language_model={tmp_path}", "train.objective=spear", "data.source=arithmetic",
                             "clients.num=2", "data.examples_per_task=60", "feedback.prompts_per_round=12",
                             "feedback.max_new_tokens=24", "train.local_steps=2", "train.batch_size=4", "seed=1"])
    _memorised(tmp_path, arithmetic.client_problems(run, 0)[0])
    me = client.identify(run, {"partition-id": 0})
    sent = initial_global_vectors(run)
    assert sorted(sent) == ["lm.block.0", "lm.block.1"]
    vectors, wins, counts, metrics = client.train(run, me, sent, 1)
    components = list(client_components(me.tasks, run))
    update = protocol.validate_train_reply(_reply(protocol.train_reply_content(vectors, wins, counts, metrics)),
                                           {c: sent[c].shape for c in components}, components)
    assert wins == metrics["feedback.wins"] > 0 and update.component_weights == {c: float(wins) for c in components}
    assert any(not np.array_equal(vectors[c], sent[c]) for c in components)
    scores = client.evaluate_model(run, me, vectors)["global"]["arithmetic"]
    assert scores.count == len(arithmetic.client_problems(run, 0)[1]) and np.isfinite(scores.loss)
    # A client with no win trains nothing and sends nothing: accepted, aggregated into no component
    idle = protocol.train_reply_content({}, 0, {}, {"train-steps": 0.0, "feedback.wins": 0.0, "feedback.prompts": 12.0})
    update = protocol.validate_train_reply(_reply(idle), {c: sent[c].shape for c in components}, components)
    assert update.arrays == {} and update.component_weights == {} and update.metrics["feedback.prompts"] == 12


@pytest.mark.parametrize("objective, most", [("spear", 64), ("grpo", 256)])
def test_a_language_models_replies_are_bounded_by_the_samples_it_drew(objective, most):
    from server_app.runner import reply_limits

    run = load_config(None, ["model.language_model=fedmm:arith-lm", f"train.objective={objective}", "data.source=arithmetic",
                             "train.local_steps=2", "train.batch_size=4"])
    assert reply_limits(run).max_examples == most  # wins, not local_steps x batch_size (8)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_and_qwen2_saved_from_tiny_configs_load_by_path_and_train_a_spear_round(family, tmp_path, monkeypatch):
    """The other two families of the model bank: LoRA on all seven projections of each block, a component
    per block, a real SPEAR round (sampling scripted: every other first try right, revisions fixed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmm.models.model import initial_global_vectors
    from fedmm.training import client

    tokenizer = char_tokenizer()
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm, _ = load_causal_lm(str(tmp_path))
    adapted = add_lm_lora(lm, LoraSettings(r=4, alpha=8))
    assert sum(name.endswith("lora_A") for name, _ in adapted.named_modules()) == 7 * 2
    run = load_config(None, [f"model.language_model={tmp_path}", "train.objective=spear", "data.source=arithmetic",
                             "clients.num=2", "data.examples_per_task=60", "feedback.prompts_per_round=12",
                             "feedback.max_new_tokens=24", "train.local_steps=2", "train.batch_size=4", "seed=1"])
    solutions = {p.prompt.removeprefix("Q: "): p.solution for p in arithmetic.client_problems(run, 0)[0]}

    def scripted(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=64):
        return [(solutions[p.rsplit("Q: ", 1)[1]] if i % 2 or "Previous" in p else "A: 0", True)
                for i, p in enumerate(prompts)]

    monkeypatch.setattr(feedback, "sample", scripted)
    sent = initial_global_vectors(run)
    assert sorted(sent) == ["lm.block.0", "lm.block.1"]
    vectors, wins, _, metrics = client.train(run, client.identify(run, {"partition-id": 0}), sent, 1)
    assert wins == 12 and metrics["feedback.revised-correct"] == 6 and metrics["feedback.loses"] == 6
    assert all(not np.array_equal(vectors[c], sent[c]) for c in sent)  # every block's adapters trained
