"""TAP: the replacement rule, the distillation loss, the client state store and the stage end to end."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from local_grid import LocalGrid

from client_apps.app import make_client_app
from fedmm.training import client
from fedmm.core.config import load_config
from fedmm.core.schema import ConfigError
from fedmm.models.model import client_components, component_vectors, module_bank
from fedmm.personalization.tap import kd_loss, parse_margins, replace_paths, tasks_to_replace
from fedmm.core.state_store import ClientStateStore
from server_app.runner import run_federation

FAST = ["clients.num=3", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=2", "train.local_steps=3", "train.batch_size=8",
        "personal.teacher_steps=2", "personal.distill_steps=3"]


def test_nothing_is_replaced_on_first_participation():
    assert tasks_to_replace({"vqa": 0.1}, None, {"vqa": 0.0}) == []


def test_replacement_needs_the_teacher_to_beat_the_personal_loss_by_the_margin():
    teacher = {"vqa": 1.0, "img_shape": 1.0, "txt_color": 0.5}
    personal = {"vqa": 1.02, "img_shape": 1.005, "txt_color": 0.5}
    margins = {"vqa": 0.01, "img_shape": 0.01, "txt_color": 0.0}
    assert tasks_to_replace(teacher, personal, margins) == ["vqa"]


def test_replacement_copies_exactly_the_tasks_forward_path():
    components = ["encoder.image", "encoder.text", "fusion.shared", "head.vqa", "head.img_shape", "head.txt_color"]
    personal = {c: np.zeros(3, np.float32) for c in components}
    global_copy = {c: np.ones(3, np.float32) for c in components}
    paths = {"img_shape": ["encoder.image", "fusion.shared", "head.img_shape"],
             "vqa": ["encoder.image", "encoder.text", "fusion.shared", "head.vqa"]}
    out = replace_paths(personal, global_copy, ["img_shape"], paths)
    assert {c for c in components if out[c][0] == 1} == {"encoder.image", "fusion.shared", "head.img_shape"}
    out = replace_paths(personal, global_copy, ["vqa"], paths)
    assert {c for c in components if out[c][0] == 1} == {"encoder.image", "encoder.text", "fusion.shared", "head.vqa"}
    assert all(personal[c][0] == 0 for c in components)  # the input is left alone
    out["head.vqa"][0] = 7
    assert global_copy["head.vqa"][0] == 1  # copies, not views


def test_kd_loss_matches_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    labels = torch.tensor([1, 2])
    t, w = 2.0, 0.5

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    ce = np.mean([-math.log(softmax(s.numpy())[y]) for s, y in zip(student, labels)])
    kl = np.mean([(softmax(tz.numpy() / t) * (np.log(softmax(tz.numpy() / t)) - np.log(softmax(sz.numpy() / t)))).sum()
                  for sz, tz in zip(student, teacher)])
    expected = ce + w * t * t * kl
    assert float(kd_loss(student, teacher, labels, t, w)) == pytest.approx(expected, rel=1e-5)
    assert float(kd_loss(student, student, labels, t, w)) == pytest.approx(ce, rel=1e-5)


def test_margins_parse_per_task():
    assert parse_margins("vqa=0.02", ["vqa", "img_shape"], 0.01) == {"vqa": 0.02, "img_shape": 0.01}
    with pytest.raises(ValueError, match="bad item"):
        parse_margins("vqa", ["vqa"], 0.01)
    with pytest.raises(ValueError, match=">= 0"):
        parse_margins("vqa=-1", ["vqa"], 0.01)
    with pytest.raises(ConfigError, match="personal.task_margins"):
        load_config(overrides=["personal.task_margins=nosuch=0.1"])


def test_personal_state_survives_a_process_restart(tmp_path):
    store = ClientStateStore(tmp_path, "client-3")
    store.save_tensors("personal", {"head.vqa": np.arange(4, dtype=np.float32)})
    store.save_meta({"personal_loss": {"vqa": 0.7}, "participations": 2})
    code = ("import json,sys; from fedmm.core.state_store import ClientStateStore as S; s=S(sys.argv[1],'client-3');"
            "print(json.dumps([s.load_tensors('personal')['head.vqa'].tolist(), s.load_meta()]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    tensors, meta = json.loads(out.stdout)
    assert tensors == [0, 1, 2, 3] and meta == {"personal_loss": {"vqa": 0.7}, "participations": 2}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".."])
def test_client_ids_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises(ValueError):
        ClientStateStore(tmp_path, bad)


def test_tap_client_keeps_its_personal_model_and_history_on_disk(tmp_path):
    run = load_config(overrides=[*FAST, "personal.method=tap", f"out={tmp_path}"])
    me = client.identify(run, {"partition-id": 2})
    model = module_bank(run).model(list(me.tasks))
    received = component_vectors(model, client_components(list(me.tasks), run))
    _, _, _, metrics = client.train(run, me, received, server_round=1)
    store = client.state_store(run, me)
    meta = store.load_meta()
    assert meta["replaced"] == {"1": []} and meta["participations"] == 1
    assert set(meta["personal_loss"]) == set(me.tasks)
    assert all(metrics[f"replaced.{t}"] == 0.0 for t in me.tasks)
    # A personal model far worse than any teacher: every task's path is replaced next time.
    store.save_meta({**meta, "personal_loss": {t: 1e9 for t in me.tasks}})
    _, _, _, metrics = client.train(run, me, received, server_round=2)
    assert sorted(store.load_meta()["replaced"]["2"]) == sorted(me.tasks)
    assert all(metrics[f"replaced.{t}"] == 1.0 for t in me.tasks)


def test_local_only_starts_from_the_untrained_model(tmp_path):
    run = load_config(overrides=[*FAST, "personal.method=local", f"out={tmp_path}"])
    me = client.identify(run, {"partition-id": 0})
    initial = module_bank(run).initial_vectors(list(me.tasks))
    trained_global = {c: v + 1.0 for c, v in initial.items()}
    assert all(np.array_equal(client.personal_vectors(run, me, trained_global)[c], initial[c]) for c in initial)


@pytest.mark.parametrize("method", ["fedavg", "fedavg_ft", "local", "tap_no_distill", "tap"])
def test_every_method_reports_global_and_personal_accuracy(tmp_path, method):
    run = load_config(overrides=[*FAST, f"personal.method={method}", f"out={tmp_path / 'out'}"])
    summary = run_federation(LocalGrid(make_client_app(run), 3), run)
    per_client = summary["final.per_client"]
    for task in ("img_shape", "txt_color", "vqa"):
        # The personal figure is the mean over the clients holding the task of each one's own score.
        holders = [scores[f"personal.{task}"] for scores in per_client.values() if f"personal.{task}" in scores]
        assert summary[f"final.personal.{task}.accuracy"] == pytest.approx(np.mean(holders))
        assert len(holders) == (1 if task == "vqa" else 2)
    assert set(per_client) == {"0", "1", "2"}
    assert "personal.vqa" in summary["final.per_client"]["2"]
    if method == "fedavg":
        assert summary["final.personal.vqa.accuracy"] == summary["final.global.vqa.client_mean_accuracy"]
    stored = sorted(p.name for p in (tmp_path / "out" / "client_state").glob("client-*"))
    assert stored == ([] if method == "fedavg" else ["client-0", "client-1", "client-2"])


def test_a_fresh_run_starts_without_an_earlier_runs_personal_models(tmp_path):
    from fedmm.core.results import RunResults

    run = load_config(overrides=[*FAST, "personal.method=tap", f"out={tmp_path}"])
    me = client.identify(run, {"partition-id": 0})
    client.state_store(run, me).save_tensors("personal", {"head.img_shape": np.zeros(2, np.float32)})
    RunResults(run.out, run)
    assert client.state_store(run, me).load_tensors("personal") is None


@pytest.mark.parametrize("gate", [True, False])
def test_the_distillation_gate_skips_tasks_whose_teacher_is_no_better(tmp_path, gate):
    # No teacher fine-tuning and no stored personal model: teacher and student are the same model,
    # so the teacher is never strictly better and the gate distills nothing.
    run = load_config(overrides=[*FAST, "personal.method=tap", "personal.teacher_steps=0",
                                 f"personal.distill_gate={gate}", f"out={tmp_path}"])
    me = client.identify(run, {"partition-id": 2})
    model = module_bank(run).model(list(me.tasks))
    received = component_vectors(model, client_components(list(me.tasks), run))
    metrics = client.distill(run, me, received)
    stored = client.state_store(run, me).load_tensors("personal")
    unchanged = all(np.array_equal(stored[c], received[c]) for c in received)
    assert all(metrics[f"distilled.{t}"] == float(not gate) for t in me.tasks)
    assert unchanged == gate


def test_a_distilled_student_that_is_worse_on_validation_is_discarded(tmp_path, monkeypatch):
    # The personal model is the untrained one; the teacher is trained, so every task is distilled.
    # The "distillation" here wrecks the student, and the gate must keep the personal model as it was.
    run = load_config(overrides=[*FAST, "personal.method=tap", "personal.teacher_steps=20", f"out={tmp_path}"])
    me = client.identify(run, {"partition-id": 2})
    initial = module_bank(run).initial_vectors(list(me.tasks))
    client.state_store(run, me).save_tensors("personal", initial)
    real_train_local = client.train_local

    def wrecking_distillation(model, data, cfg, lr, seed, device, distill=None, grpo=None, proximal_mu=0.0):
        if distill is None:  # the teacher's fine-tuning runs for real
            return real_train_local(model, data, cfg, lr, seed, device)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 50)
        return real_train_local(model, data, client._steps(cfg, 0), lr, seed, device)

    monkeypatch.setattr(client, "train_local", wrecking_distillation)
    metrics = client.distill(run, me, initial)
    assert any(metrics[f"distilled.{t}"] for t in me.tasks)
    assert metrics["distill-kept"] == 0.0
    stored = client.state_store(run, me).load_tensors("personal")
    assert all(np.array_equal(stored[c], initial[c]) for c in initial)
