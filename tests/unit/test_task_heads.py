"""Splitting by function: a data owner trains a classification head of its own on the shared trunk,
beside the others' next-token objective, exactly as the monolith trains both."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

from fedsplit.data import PAD_ID, DataError, classification_batch, read_labelled
from fedsplit.federation.checkpoint import layout_hash, plan_hash
from fedsplit.federation.verify import verify
from fedsplit.hosting.messages import op_from_proto, op_to_proto
from fedsplit.interop import TASK_HEADS_FILE, CheckpointError, open_checkpoint, save_hf, save_hf_classifier
from fedsplit.interop.adapters import merge_adapters
from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.plan import PlanError, load_plan, resolved_model, write_resolved
from fedsplit.plan.exposure import exposures
from fedsplit.runtime import InProcessFederation, MonolithicTrainer, initial_weights, synthetic_batches
from fedsplit.runtime.batches import batches_for, eval_batches_for
from fedsplit.runtime.calls import CallKey
from fedsplit.runtime.ops import SegmentOp
from fedsplit.runtime.policy import CallPolicy

from ..conftest import PLANS, ROOT
from ..interop_helpers import write_random_base

TASK_HEAD = PLANS / "task-head" / "federation.yaml"
LABELS = ["verse", "code", "arithmetic"]


def write_task_plan(
    tmp_path: Path, orgs: dict[str, dict], weight: float = 0.5, model: dict | None = None, base: Path | None = None
) -> Path:
    """A federation over the tiny model (with ``model``'s changes), or over the model directory
    ``base``, with task ``domain``; ``orgs``: each org file's fields."""
    (tmp_path / "orgs").mkdir(parents=True, exist_ok=True)
    tiny = yaml.safe_load((ROOT / "configs" / "models" / "tiny.yaml").read_text()) | (model or {})
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny))
    for name, spec in orgs.items():
        (tmp_path / "orgs" / f"{name}.yaml").write_text(yaml.safe_dump({"org": name, **spec}))
    document = {
        "name": "tasks",
        "model": str(base) if base else "model.yaml",
        "training": {"batch_size": 4, "seq_len": 32, "micro_batches": 2, "optimizer": {"name": "adamw", "lr": 3e-4}},
        "aggregation": {"replica_sync": "step"},
        "tasks": {"domain": {"labels": LABELS, "weight": weight}},
        "orgs": ["orgs/*.yaml"],
    }
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return tmp_path / "federation.yaml"


TEXT = {"data": {"train": str(ROOT / "data" / "tinyshakespeare.txt")}}
LABELLED = {"data": {"train": str(ROOT / "data" / "domains.jsonl")}, "task": "domain"}
U_SHAPE = {
    "library": {**TEXT, "holds": ["embed", "layers.0", "final_norm", "lm_head"]},
    "classifier": {**LABELLED, "holds": ["embed", "layers.0", "final_norm", "tasks.domain"]},
    "compute": {"holds": ["layers.1-3"]},
}
# No replica: the classifier sends its tokens to the library's embedding and holds its head only.
THROUGH_ANOTHER = {
    "library": {**TEXT, "holds": ["embed", "layers.0-1"]},
    "compute": {"holds": ["layers.2-3", "final_norm", "lm_head"]},
    "classifier": {**LABELLED, "holds": ["tasks.domain"]},
}
# Every partition kind: head groups and experts carved out, the head beside them. (lr 3e-4, as the
# shipped head-group plans: at 1e-3 their reordered partial sums reach 1.7e-5 here.)
MIXED = {
    "library": {**TEXT, "holds": ["embed", "layers.0", "final_norm", "lm_head"]},
    "classifier": {**LABELLED, "holds": ["embed", "layers.0", "final_norm", "tasks.domain"]},
    "compute": {"holds": ["layers.1-3"]},
    "experts": {"holds": ["layers.2-3.experts.4-7", "layers.3.attention.heads.0-3"]},
}


@pytest.mark.parametrize("name, orgs", [("u-shape", U_SHAPE), ("through-another", THROUGH_ANOTHER), ("mixed", MIXED)])
def test_a_task_head_beside_the_lm_objective_trains_split_equal_to_the_monolith(tmp_path, name, orgs):
    plan = load_plan(write_task_plan(tmp_path, orgs))
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_split == pytest.approx(result.loss_mono, abs=1e-5)
    assert result.loss_mono[0] != result.loss_mono[-1]


def test_the_shipped_task_head_plan_matches_the_monolith_and_its_head_trains():
    plan = load_plan(TASK_HEAD)
    weights = initial_weights(plan)
    fed = InProcessFederation(plan, weights)
    for step in range(3):
        fed.train_step(step, synthetic_batches(plan, step))
    head = "task_heads.domain.weight"
    assert not torch.equal(fed.reassembled()[head], weights[head])
    assert verify(plan, steps=10).max_abs_diff <= 1e-5


def test_a_task_head_on_a_pretrained_checkpoint_is_drawn_from_the_seed_and_trains_exactly(tmp_path):
    """The base's weights come from its files, read slice by slice; the head, which no base has,
    from the plan's seed, the same on every organisation and in the reference."""
    cfg = ModelConfig.from_yaml(ROOT / "configs" / "models" / "tiny.yaml").model_copy(update={"num_shared_experts": 0})
    base = write_random_base(tmp_path / "base", cfg)
    plan = load_plan(write_task_plan(tmp_path / "plan", MIXED, base=base))
    weights = initial_weights(plan)
    assert torch.equal(
        weights["layers.0.moe.router.weight"], open_checkpoint(base).reader.read_all()["layers.0.moe.router.weight"]
    )
    assert set(plan.checkpoint_slices("classifier")) == {s.key for s in plan.slices_of("classifier")} - {
        "task_heads.domain.weight"
    }
    assert verify(plan, steps=5).max_abs_diff <= 1e-5


def test_the_task_weight_scales_the_classifier_objective_in_the_step(tmp_path):
    plans = {w: load_plan(write_task_plan(tmp_path / str(w), U_SHAPE, weight=w)) for w in (0.5, 2.0)}
    batches = synthetic_batches(plans[0.5], 0)
    trainers = {w: MonolithicTrainer(p, initial_weights(p)) for w, p in plans.items()}
    steps = {w: t.train_step(0, batches) for w, t in trainers.items()}
    assert steps[0.5]["ce/classifier"] == steps[2.0]["ce/classifier"]  # the same loss before the step,
    assert steps[0.5]["ce/library"] == steps[2.0]["ce/library"]
    assert steps[2.0]["loss"] > steps[0.5]["loss"]  # weighted differently in the objective
    a, b = (t.state_dict()["task_heads.domain.weight"] for t in trainers.values())
    assert not torch.equal(a, b)
    assert verify(plans[2.0], steps=5).max_abs_diff <= 1e-5


def test_the_task_loss_is_the_head_s_cross_entropy_at_each_example_s_last_token():
    plan = load_plan(TASK_HEAD)
    model = MoETransformer(plan.model)
    model.load_state_dict(initial_weights(plan), strict=True)
    sequences = [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12]), torch.tensor([13])]
    classes = torch.tensor([2, 0, 1])
    tokens, labels = classification_batch(sequences, classes, seq_len=4)
    assert tokens.tolist() == [[5, 6, 7, PAD_ID], [8, 9, 10, 11], [13, PAD_ID, PAD_ID, PAD_ID]]
    assert labels.tolist() == [[-100, -100, 2, -100], [-100, -100, -100, 0], [1, -100, -100, -100]]
    loss, _ = model.losses(tokens, labels, task="domain")
    # Directly: each example alone (no padding), its last token's hidden state through the head.
    logits = [model.task_heads["domain"](model.hidden(s[:4].unsqueeze(0))[0][0, -1]) for s in sequences]
    expected = F.cross_entropy(torch.stack(logits), classes)
    assert float((loss - expected).abs().detach()) <= 1e-6


def test_labelled_data_with_a_bad_label_is_an_error_naming_file_and_line(tmp_path):
    good = {"text": "to be or not", "label": "verse"}
    cases = {
        "unknown": ({"text": "x = 1", "label": "prose"}, 'label "prose" is not one of the task\'s labels'),
        "missing": ({"text": "x = 1"}, "no 'label'"),
        "out of range": ({"text": "x = 1", "label": 3}, "or their index (0-2)"),
        "boolean": ({"text": "x = 1", "label": True}, "label true is not one"),
        "no text": ({"label": "code"}, "no string field 'text'"),
        "empty text": ({"text": "", "label": "code"}, "'text' is empty"),
    }
    for case, (bad, message) in cases.items():
        path = tmp_path / "data.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError) as e:
            read_labelled("clinic", [path], LABELS)
        assert f"{path}:3" in str(e.value) and message in str(e.value), (case, str(e.value))
    path = tmp_path / "plain.txt"
    path.write_text("some text\n")
    with pytest.raises(DataError, match="is not a .jsonl file"):
        read_labelled("clinic", [path], LABELS)
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"text": "1 + 1 = 2", "label": 2}) + "\n")
    assert read_labelled("clinic", [path], LABELS).classes.tolist() == [0, 2]


def test_a_classifier_trains_on_its_examples_and_holds_out_their_tail():
    plan = load_plan(TASK_HEAD)
    tokens, labels = batches_for(plan, "classifier")(0)
    assert tokens.shape[0] == plan.training.batch_size and tokens.shape[1] <= plan.training.seq_len
    assert ((labels != -100).sum(dim=1) == 1).all() and labels.max() < len(LABELS)
    held_out = eval_batches_for(plan, "classifier")
    assert all(int((lab != -100).sum()) == plan.training.batch_size for _, lab in held_out)
    assert batches_for(plan, "classifier")(0)[0].equal(tokens)  # the same batch for the same step


def test_task_plans_refuse_what_cannot_work_by_file_line_and_field(tmp_path):
    cases = [
        ({**U_SHAPE, "classifier": {**U_SHAPE["classifier"], "task": "sentiment"}}, "task 'sentiment' is not declared"),
        (
            {**U_SHAPE, "compute": {"holds": ["layers.1-3"], "task": "domain"}},
            "trains on this organisation's labelled data, and it has none",
        ),
        ({**U_SHAPE, "classifier": {**U_SHAPE["classifier"], "holds": ["tasks.other"]}}, "no task named 'other'"),
        ({**U_SHAPE, "classifier": {**TEXT, "holds": ["embed", "layers.0", "final_norm"]}}, "held by no organisation"),
    ]
    for orgs, message in cases:
        with pytest.raises(PlanError) as e:
            load_plan(write_task_plan(tmp_path, orgs))
        assert message in str(e.value), str(e.value)
        for f in (tmp_path / "orgs").glob("*.yaml"):
            f.unlink()
    untrained = {**U_SHAPE, "classifier": {**TEXT, "holds": ["embed", "layers.0", "final_norm", "tasks.domain"]}}
    with pytest.raises(PlanError) as e:
        load_plan(write_task_plan(tmp_path, untrained))
    problem = e.value.problems[0]
    assert "no organisation trains task 'domain'" in problem.message and problem.field == "tasks.domain"
    assert (tmp_path / "federation.yaml").read_text().splitlines()[problem.line - 1].strip() == "domain:"


def test_plan_check_says_where_a_classifier_s_labels_go():
    plan = load_plan(TASK_HEAD)
    assert not [w for w in plan.warnings if "labels leave" in w.message]
    received = [(x.receiver, x.what) for x in exposures(plan) if x.data_owner == "classifier"]
    assert ("compute", "hidden states after layer 0 (every token)") in received
    assert not any("labels" in what for _, what in received)


def test_a_classifier_whose_head_is_elsewhere_is_warned_that_its_labels_leave(tmp_path):
    plan = load_plan(write_task_plan(tmp_path, THROUGH_ANOTHER))
    warnings = [w.message for w in plan.warnings if w.org == "classifier"]
    assert any("raw tokens leave" in m for m in warnings)
    received = {x.what for x in exposures(plan) if x.data_owner == "classifier" and x.receiver == "compute"}
    assert not any("class" in what for what in received)  # the classifier holds its head itself
    moved = {**THROUGH_ANOTHER, "compute": {"holds": [*THROUGH_ANOTHER["compute"]["holds"], "tasks.domain"]}}
    moved["classifier"] = {**LABELLED, "holds": []}
    (tmp_path / "orgs" / "classifier.yaml").unlink()
    plan = load_plan(write_task_plan(tmp_path, moved))
    assert any("its class labels go to 'compute'" in w.message for w in plan.warnings)
    received = {x.what for x in exposures(plan) if x.data_owner == "classifier" and x.receiver == "compute"}
    assert "labels (the class of every example, task domain)" in received


def test_a_task_segment_crosses_the_wire_and_only_its_own_labels_are_accepted():
    plan = load_plan(TASK_HEAD)
    op = SegmentOp(("final_norm", "task_head"), "domain")
    assert op_from_proto(op_to_proto(op)) == op
    policy = CallPolicy(plan, "classifier")
    policy.check_inputs(op, [torch.zeros(4, 8, 64), torch.full((4, 8), -100).index_fill(1, torch.tensor([7]), 2)])
    with pytest.raises(ValueError, match="labels must be -100 or lie in 0-2"):
        policy.check_inputs(op, [torch.zeros(4, 8, 64), torch.full((4, 8), 3)])
    lm = SegmentOp(("final_norm", "lm_head"))
    with pytest.raises(PermissionError, match="computes no segment"):
        policy.check("classifier", CallKey("classifier", 0, 0), lm)


def test_export_keeps_the_task_heads_beside_the_model_and_as_a_transformers_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    plan = load_plan(write_task_plan(tmp_path, MIXED, model={"num_shared_experts": 0}))  # Mixtral
    fed = InProcessFederation(plan, initial_weights(plan))
    for step in range(2):
        fed.train_step(step, synthetic_batches(plan, step))
    weights = fed.reassembled()
    written = save_hf(plan.model, weights, tmp_path / "lm")
    with safe_open(str(written / TASK_HEADS_FILE), "pt") as f:
        assert json.loads(f.metadata()["labels"]) == {"domain": LABELS}
        assert torch.equal(f.get_tensor("domain.score.weight"), weights["task_heads.domain.weight"])
    transformers.AutoModelForCausalLM.from_pretrained(written)  # the LM loads as it did without tasks

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        save_hf_classifier(plan.model, weights, "domain", tmp_path / "classifier")
    ).eval()
    assert type(hf).__name__ == "MixtralForSequenceClassification" and hf.config.id2label == dict(enumerate(LABELS))
    # The second example ends in token 0, fedsplit's own padding id: transformers must still pool it.
    sequences = [torch.tensor([70, 71, 72, 73, 74]), torch.tensor([80, 81, PAD_ID]), torch.tensor([90, 91])]
    tokens, labels = classification_batch(sequences, torch.tensor([0, 1, 2]), seq_len=16)
    assert hf.config.pad_token_id == plan.model.vocab_size
    padded = torch.where(torch.arange(tokens.shape[1]) < torch.tensor([[5], [3], [2]]), tokens, hf.config.pad_token_id)
    model = MoETransformer(plan.model)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        ours = model.eval().task_heads["domain"](model.hidden(tokens)[0])[labels != -100]
        theirs = hf(padded).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_classifier_export_is_refused_where_transformers_has_no_classifier_for_the_model(tmp_path):
    plan = load_plan(TASK_HEAD)  # ungated shared experts: Granite-MoE-Shared, which has none
    with pytest.raises(CheckpointError, match="no sequence classifier for GraniteMoeSharedForCausalLM"):
        save_hf_classifier(plan.model, initial_weights(plan), "domain", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no task head 'other'"):
        save_hf_classifier(plan.model, initial_weights(plan), "other", tmp_path / "out")


def test_a_run_s_resolved_plan_reads_back_the_tasks_and_the_model_with_their_heads(tmp_path):
    plan = load_plan(TASK_HEAD)
    path = write_resolved(plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert again.model == plan.model and resolved_model(path) == plan.model
    assert dict(again.tasks) == dict(plan.tasks) and again.orgs["classifier"].task == "domain"
    assert again.path("classifier") == plan.path("classifier")
    assert "tasks" not in load_plan(PLANS / "three-orgs" / "federation.yaml").model.model_dump()


def test_a_lora_fine_tune_with_a_task_head_merges_and_keeps_the_head(tmp_path):
    document = yaml.safe_load(write_task_plan(tmp_path, U_SHAPE).read_text())
    document["finetune"] = {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "experts"]}
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(document))
    plan = load_plan(tmp_path / "federation.yaml")
    assert "task_heads.domain.weight" not in plan.frozen  # new, so it trains over the frozen base
    cfg, merged = merge_adapters(plan.model, initial_weights(plan))
    assert cfg.lora is None and [t.name for t in cfg.tasks] == ["domain"]
    written = save_hf(cfg, merged, tmp_path / "merged")
    with safe_open(str(written / TASK_HEADS_FILE), "pt") as f:
        assert torch.equal(f.get_tensor("domain.score.weight"), merged["task_heads.domain.weight"])


def test_resume_notices_a_changed_task_weight_or_a_data_owner_that_trains_another_objective(tmp_path):
    plan = load_plan(write_task_plan(tmp_path / "a", U_SHAPE, weight=0.5))
    reweighted = load_plan(write_task_plan(tmp_path / "b", U_SHAPE, weight=2.0))
    orgs = dict(plan.orgs)
    orgs["library"], orgs["classifier"] = (
        dataclasses.replace(orgs["library"], task="domain"),
        dataclasses.replace(orgs["classifier"], task=None),
    )
    retasked = dataclasses.replace(plan, orgs=orgs)  # the same partitions, each training the other's objective
    for digest in (plan_hash, layout_hash):
        assert len({digest(plan), digest(reweighted), digest(retasked)}) == 3
        assert digest(plan) == digest(load_plan(write_task_plan(tmp_path / "a2", U_SHAPE, weight=0.5)))
