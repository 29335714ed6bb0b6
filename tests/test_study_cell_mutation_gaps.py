"""Study behaviours a mutation run found no test pinning: a cell's head trains at --head-lr, its learning rate
follows the schedule step by step, its batch order follows its seed, a dev evaluation hands the model back in
training mode, peft's frozen copy of the head stays frozen, the majority floor is the training split's most common
class, and the headline names fastft's rows and only methods within 2 points."""
import pytest
import torch
from torch import nn

from fastft.apps.study import cell as cell_module
from fastft.apps.study.cell import CellSettings, CellSpec, _build, evaluate, run_cell
from fastft.apps.study.models import unfreeze_head
from fastft.apps.study.report import aggregate, headline
from fastft.apps.study.tasks import StudyTask, majority_baseline
from tests.test_study_mutation_gaps import _cell
from tests.test_study_review_fixes import _toy_task, stand_in_prepared, use_stand_in

SPEC = CellSpec("minilm", "subj", "full", "lora", "fastft", 0)
SETTINGS = CellSettings(steps=10, batch_size=4, max_length=8, lr=0.1, head_lr=0.3, evals=2, max_dev=None,
                        max_test=None)
INFO = {"subj": {"metric": "accuracy", "majority": {"accuracy": 0.5, "macro_f1": 1 / 3}}}


@pytest.fixture
def stand_in(monkeypatch):
    use_stand_in(monkeypatch)


def test_the_head_trains_at_head_lr(stand_in, monkeypatch):
    monkeypatch.setattr(cell_module, "prepare_model", lambda *a: stand_in_prepared(head_names=("bias",)))
    _, _, _, _, named, optimizer, _ = _build(SPEC, SETTINGS, _toy_task(), torch.device("cpu"))
    names = {id(p): n for n, p in named}
    assert [([names[id(p)] for p in g["params"]], g["initial_lr"]) for g in optimizer.param_groups] == \
        [(["weight"], 0.1), (["bias"], 0.3)]


def test_the_learning_rate_follows_the_schedule_step_by_step(stand_in, monkeypatch):
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    assert run_cell(SPEC, SETTINGS, torch.device("cpu"))["status"] == "done"
    factor = cell_module._schedule(SETTINGS.steps)
    assert seen == pytest.approx([SETTINGS.lr * factor(s) for s in range(SETTINGS.steps)])


def test_the_batch_order_follows_the_cells_seed(stand_in, monkeypatch):
    rows = [(str(i), i % 2) for i in range(16)]
    monkeypatch.setattr(cell_module, "training_rows", lambda task, regime, seed: rows)  # every seed: the same rows
    seen = []
    prepared = stand_in_prepared()
    collate = prepared.collate
    prepared.collate = lambda batch: (seen.append([t for t, _ in batch]), collate(batch))[1]
    monkeypatch.setattr(cell_module, "prepare_model", lambda *a: prepared)
    firsts = {}
    for seed in (0, 1):
        seen.clear()
        settings = CellSettings(steps=1, batch_size=4, max_length=8, lr=0.1, head_lr=0.1, evals=1, max_dev=None,
                                max_test=None)
        assert run_cell(CellSpec("minilm", "subj", "full", "lora", "fastft", seed), settings,
                        torch.device("cpu"))["status"] == "done"
        firsts[seed] = seen[0]
        order = torch.randperm(16, generator=torch.Generator().manual_seed(seed)).tolist()
        assert firsts[seed] == [rows[i][0] for i in order[:4]]
    assert firsts[0] != firsts[1]


def test_an_evaluation_hands_the_model_back_in_training_mode():
    prepared = stand_in_prepared()
    model = nn.Sequential(prepared.model, nn.Dropout(0.5)).train()
    prepared.class_logits = lambda m, batch: m(batch["x"])
    result = evaluate(prepared, model, [("1", 1), ("0", 0)], 2, torch.device("cpu"), lambda: torch.no_grad())
    assert result["examples"] == 2 and model.training and model[1].training


def test_peft_frozen_head_copy_stays_frozen():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2))
    model = get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2))
    for p in model.parameters():
        p.requires_grad_(False)
    unfreeze_head(model, ("classifier",))
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained and all("modules_to_save" in n for n in trained), trained
    assert any("original_module" in n for n, _ in model.named_parameters())


def test_the_majority_floor_is_the_training_splits_most_common_class():
    train = [("t", 0)] * 6 + [("t", 1)] * 4
    test = [("t", 0)] * 2 + [("t", 1)] * 6  # the test rows' own majority is the other class
    task = StudyTask("toy", "toy", "{text}", (" no", " yes"), train=train, dev=test, test=test)
    floor = majority_baseline(task)
    assert floor["label"] == "no" and floor["accuracy"] == pytest.approx(0.25)


def test_the_headline_names_fastft_rows_and_only_methods_within_two_points():
    cells = [_cell("lora", "fastft", 0, 0.90, 700_000), _cell("lora", "peft", 0, 0.95, 700_000),
             _cell("ia3", "fastft", 0, 0.85, 50_000)]
    text = headline(aggregate(cells), INFO)
    assert "lora scores best on average (90.0" in text, text  # peft's anchor row is no candidate
    assert "comes within 2 points" not in text, text          # ia3 is 5 points below
