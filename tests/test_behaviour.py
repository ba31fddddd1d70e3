"""The behaviour check: a planted backdoor is caught on its model, honest label-skewed models are not;
its catches hold a client out through reputation, and survive a restart."""

import numpy as np
import pytest
import torch

from fedmm.core.config import load_config
from fedmm.data.scenes import make_synthetic_task
from fedmm.models.model import component_vectors, load_component_vectors, module_bank
from fedmm.robustness import behaviour
from fedmm.robustness.attacks import columns_of, poison_training_split
from fedmm.core.components import ComponentLayout
from fedmm.robustness.trust import ComponentUpdates, Reputation, decide_round
from fedmm.training.local import encode_split, train_local

from benchmarks.behaviour_shortlist import text_clients

TASKS = ["img_shape", "txt_color"]


@pytest.fixture(scope="module")
def cohort():
    """Models of one shipped-base federation after one local round from the same start: five honest
    clients whose labels are skewed (each mostly one class) and one with a backdoor in half its data."""
    run = load_config(overrides=["clients.profiles.both=img_shape,txt_color", "train.local_steps=40",
                                 "attack.name=backdoor", "attack.fraction=0.5"])
    bank = module_bank(run)
    model = bank.model(TASKS)
    components = list(component_vectors(model))
    start = component_vectors(model)
    rng = np.random.default_rng(0)
    data = {t: columns_of(make_synthetic_task(t, 1200, 11, run.model.image_size)) for t in TASKS}

    def encode(columns, task):
        spec = bank.specs[task]
        return encode_split(columns, spec.modalities, bank.tokenizer() if "text" in spec.modalities else None,
                            bank.image_size() if "image" in spec.modalities else 0)

    def skewed(columns, favourite):
        labels = columns["label"]
        keep = np.flatnonzero((labels == favourite) | (rng.random(len(labels)) < 0.25))[:300]
        return {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]) for k, v in columns.items()}

    models = {}
    for client in range(6):
        load_component_vectors(model, start, components)
        train = {}
        for task in TASKS:
            columns = skewed(data[task], client % 4)
            if client == 5:
                spec = bank.specs[task]
                columns = poison_training_split(columns, "backdoor", run.attack, spec.modalities, spec.num_classes, 5)
            train[task] = encode(columns, task)
        train_local(model, train, run.train, run.train.lr, seed=client, device=torch.device("cpu"))
        models[client] = component_vectors(model)
    load_component_vectors(model, start, components)
    root = {t: encode(columns_of(make_synthetic_task(t, 48, 99, run.model.image_size)), t) for t in TASKS}
    return behaviour.BehaviourCheck(model, root, examples=32), start, models


@pytest.mark.slow
def test_a_planted_backdoor_is_caught_and_label_skewed_honest_models_are_not(cohort):
    check, start, models = cohort
    strength = check.strengths(start, models)
    assert set(strength) == set(models) and set(strength[0]) == {"image", "text"}
    caught = behaviour.behaviour_outliers(strength, margin=0.2)
    assert set(caught) == {5}, (strength, caught)
    assert "trigger" in caught[5]
    # the trigger's own strength on the backdoored model: nearly every root input goes to the target
    assert max(strength[5].values()) >= 0.9


def test_the_check_leaves_the_model_as_it_was_sent(cohort):
    check, start, models = cohort
    check.strengths(start, {5: models[5]})
    after = component_vectors(check.model)
    assert all(np.array_equal(after[c], start[c]) for c in start)
    assert all(p.requires_grad for n, p in check.model.named_parameters() if "lora_" in n)


@pytest.fixture(scope="module")
def text_backdoor():
    """A text-only client of the shipped base trained with a prefix-word backdoor in half its data, one
    trained on the same data clean, the check, and the trigger word's token id."""
    return text_clients([], steps=60)


@pytest.mark.slow
def test_a_large_vocabulary_is_cut_to_a_gradient_shortlist_that_still_holds_the_trigger(text_backdoor, monkeypatch):
    check, start, models, trigger = text_backdoor
    data = check.root["txt_color"]
    assert trigger in check.unseen.tolist() and len(check.unseen) > 64
    try:  # the model is the process-wide bank's: whatever fails, it goes back to the start
        every = {}
        for name, arrays in models.items():
            load_component_vectors(check.model, {**start, **arrays}, list(start))
            every[name] = float(behaviour.search_prefix(check.model, "txt_color", data, check.unseen)[1].max())
        assert every["backdoor"] >= 0.9 and every["clean"] < 0.5
        load_component_vectors(check.model, {**start, **models["backdoor"]}, list(start))
        shortlist = behaviour.prefix_shortlist(check.model, "txt_color", data, check.unseen, per_class=4)
        assert trigger in shortlist.tolist() and len(shortlist) <= 16 and set(shortlist.tolist()) <= set(check.unseen.tolist())
        # Past PREFIX_CANDIDATES the check tries only the shortlist, and finds what trying every token finds.
        monkeypatch.setattr(behaviour, "PREFIX_CANDIDATES", 16)
        cut = check.strengths(start, models)
        assert cut["backdoor"]["text"] == every["backdoor"] and cut["clean"]["text"] <= every["clean"]
        caught = behaviour.behaviour_outliers({0: cut["clean"], 1: cut["clean"], 2: cut["backdoor"]}, margin=0.3)
        assert set(caught) == {2}
        # A cap under the task's classes still tries one token per class (not none).
        monkeypatch.setattr(behaviour, "PREFIX_CANDIDATES", 2)
        assert check.strengths(start, {"backdoor": models["backdoor"]})["backdoor"]["text"] == every["backdoor"]
    finally:
        load_component_vectors(check.model, start, list(start))


def test_the_shortlist_falls_back_to_every_token_where_the_embeddings_get_no_gradient(monkeypatch):
    run = load_config(overrides=["model.image_encoder=", "model.text_encoder=", "model.hidden_size=32",
                                 "model.intermediate_size=64", "model.fusion_dim=16"])
    bank = module_bank(run)
    model, spec = bank.model(["txt_color"]), bank.specs["txt_color"]
    data = encode_split(columns_of(make_synthetic_task("txt_color", 16, 3, run.model.image_size)), spec.modalities,
                        bank.tokenizer(), 0)
    candidates = torch.arange(3, 600)
    picked = behaviour.prefix_shortlist(model, "txt_color", data, candidates, per_class=8)
    assert 8 <= len(picked) <= 32 and set(picked.tolist()) <= set(candidates.tolist())
    # an encoder whose forward pass reads another table than the one it names: nothing to rank by
    monkeypatch.setattr(model.encoders["text"].backbone, "get_input_embeddings", lambda: torch.nn.Embedding(8192, 32))
    assert torch.equal(behaviour.prefix_shortlist(model, "txt_color", data, candidates, per_class=8), candidates)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_a_vocabulary_the_clean_texts_use_in_full_leaves_nothing_to_search(cohort):
    check, start, models = cohort
    _, flips = behaviour.search_prefix(check.model, "txt_color", check.root["txt_color"],
                                       torch.zeros(0, dtype=torch.long))
    assert flips.shape == (4,) and not flips.any()


def test_the_judge_sees_only_the_clients_past_the_input_screen():
    rng = np.random.default_rng(0)
    deltas = rng.standard_normal((5, 40)).astype(np.float32) * 0.01
    deltas[3] = np.nan
    layout = ComponentLayout(names=("w",), shapes=((40,),), offsets=(0,), size=40)
    seen = []

    def judge(clients):
        seen.extend(clients)
        return {1: "behaviour: planted"}

    decision = decide_round({"c": ComponentUpdates(list(range(5)), deltas)}, {"c": np.ones(40, np.float32)},
                            {"c": layout}, Reputation(), 1, rng, behaviour=judge)
    assert seen == [0, 1, 2, 4]
    assert decision.dropped[1] == "behaviour: planted" and 1 not in decision.aggregated
    assert decision.dropped[3].startswith("non-finite")


def test_the_search_reads_each_modality_through_its_narrowest_task():
    specs = module_bank(load_config()).specs
    assert behaviour.search_tasks(["vqa", "img_shape", "txt_color"], specs) == {"image": "img_shape", "text": "txt_color"}
    assert behaviour.search_tasks(["vqa"], specs) == {"image": "vqa", "text": "vqa"}
    assert behaviour.tasks_of(["encoder.image", "head.vqa", "head.img_shape", "fusion.shared"]) == ["img_shape", "vqa"]


def test_outliers_need_both_the_margin_and_the_floor():
    cohort = {c: {"image": 0.3 + 0.02 * c} for c in range(8)}
    assert behaviour.behaviour_outliers(cohort, 0.2) == {}
    assert set(behaviour.behaviour_outliers({**cohort, 9: {"image": 0.95}}, 0.2)) == {9}
    low = {c: {"text": 0.05} for c in range(8)}
    assert behaviour.behaviour_outliers({**low, 9: {"text": 0.45}}, 0.2) == {}  # under the floor: no backdoor


def test_catches_hold_a_client_out_and_age_out_of_the_window():
    rep = Reputation()
    for _ in range(2):
        rep.participate(3, earned=0, caught=True)
    assert rep.times_caught(3) == 2
    for _ in range(Reputation.WINDOW - 1):
        rep.participate(3, earned=1)
    assert rep.times_caught(3) == 1
    restored = Reputation.from_json(rep.to_json())
    assert restored.times_caught(3) == 1 and restored.caught == rep.caught
    with pytest.raises(ValueError, match="caught"):
        Reputation.from_json({"caught": {"3": [1] * (Reputation.WINDOW + 1)}})


def test_a_hold_for_catches_leaves_the_points_window_as_it_was():
    """An honest client caught twice early, held out until the catches age out, then judged honest:
    its rate reads the rounds it was judged in (the held ones are no evidence either way), so one
    honest round already lifts it to 1/3, where a window of held zeros would read 1/10."""
    rep = Reputation()
    for _ in range(2):
        rep.participate(5, earned=0, caught=True)
    for _ in range(Reputation.WINDOW - 1):
        rep.participate(5, earned=None)
    assert rep.times_caught(5) == 1 and rep.recent[5] == [0, 0]
    rep.participate(5, earned=1)
    assert rep.rate(5) == pytest.approx(1 / 3) and rep.participations[5] == Reputation.WINDOW + 2
    assert Reputation.from_json(rep.to_json()).rate(5) == pytest.approx(1 / 3)
