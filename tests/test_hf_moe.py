"""A Hugging Face mixture-of-experts model as the text encoder: a tiny Mixtral saved to disk in the
standard format (safetensors weights and a tokenizer) and loaded by path, as a user's model would be."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MixtralConfig, MixtralModel, PreTrainedTokenizerFast

from client_apps.app import make_client_app
from fedmm.training import client
from fedmm.core.components import expert_component, is_expert
from fedmm.core.config import load_config
from fedmm.data.scenes import synthetic_vocabulary
from fedmm.models.model import client_components, component_vectors, load_component_vectors, module_bank
from fedmm.models.moe import routed_tokens
from local_grid import LocalGrid
from server_app.runner import run_federation

EXPERTS = 4


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    words = ["[PAD]", "[UNK]", *sorted(synthetic_vocabulary())]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(words), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0)
    MixtralModel(config).save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def _run(tmp_path, mixtral_dir, *extra):
    return load_config(overrides=[
        f"model.text_encoder={mixtral_dir}", "clients.num=3", "clients.profiles.text=txt_color",
        "data.examples_per_task=240", "model.fusion_dim=16", "rounds=2", "train.local_steps=4",
        "train.batch_size=8", f"out={tmp_path / 'out'}", *extra])


def test_each_mixtral_expert_gets_its_own_lora_component(tmp_path, mixtral_dir):
    run = _run(tmp_path, mixtral_dir)
    components = client_components(["txt_color"], run)
    experts = [c for c in components if is_expert(c)]
    assert experts == [expert_component(layer, e, "encoder.text") for layer in range(2) for e in range(EXPERTS)]
    model = module_bank(run).model(["txt_color"])
    vectors = component_vectors(model, components)
    # Expert 2 of layer 1 is its own slice of peft's packed factors: changing it changes nothing else.
    changed = dict(vectors)
    changed[expert_component(1, 2, "encoder.text")] = vectors[expert_component(1, 2, "encoder.text")] + 1.0
    load_component_vectors(model, changed, components)
    after = component_vectors(model, components)
    for c in components:
        np.testing.assert_array_equal(after[c], changed[c])
    load_component_vectors(model, vectors, components)


def test_mixtral_routing_is_counted_and_only_used_experts_travel(tmp_path, mixtral_dir, monkeypatch):
    run = _run(tmp_path, mixtral_dir)
    me = client.identify(run, {"partition-id": 1})
    model = module_bank(run).model(list(me.tasks))
    gate = model.encoders["text"].backbone.layers[0].mlp.gate

    def never_expert_3(hidden):  # layer 0's router, with expert 3 masked out
        logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
        probs = torch.softmax(logits.float().index_fill(1, torch.tensor([3]), -torch.inf), dim=-1)
        top, index = probs.topk(gate.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    monkeypatch.setattr(gate, "forward", never_expert_3)
    received = component_vectors(model, client_components(list(me.tasks), run))
    sent, _, _, metrics = client.train(run, me, received, 1)
    assert expert_component(0, 3, "encoder.text") not in sent
    assert expert_component(0, 0, "encoder.text") in sent
    counts = routed_tokens(model)  # the personal stage has not run (fedavg): these are the round's counts
    assert not counts[expert_component(0, 3, "encoder.text")]
    routed = {k: v for k, v in metrics.items() if k.startswith("routed.text.encoder.text.expert.0.")}
    assert routed and sum(routed.values()) > 0


def test_a_federation_on_a_mixtral_encoder_aggregates_its_experts(tmp_path, mixtral_dir):
    run = _run(tmp_path, mixtral_dir)
    run_federation(LocalGrid(make_client_app(run), 3), run)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train.clients-accepted" in r]
    assert all(r["train.clients-accepted"] == 3 and r["train.clients-rejected"] == 0 for r in train)
    assert any(k.startswith("train.moe.routed.text.encoder.text.expert.") for k in train[-1])
    before = load_file(str(out / "checkpoints" / "round-0000.safetensors"))
    after = load_file(str(out / "checkpoints" / "round-0002.safetensors"))
    packed = [k for k in after if "experts" in k and "lora_B" in k]
    assert packed and all(not np.array_equal(before[k], after[k]) for k in packed)
