"""`fastft train` checks every token id on the host, as it builds a batch, against the model's fewest token rows
(embeddings, lm_head, the teacher's head): the fused losses then skip their label range check, a device read (a sync
in the middle of every micro-batch's forward on a GPU), and a tokenizer larger than the model is named in one line
instead of an embedding's IndexError (on a GPU: a device-side assert that ends the process)."""
import json

import pytest
import torch

import fastft.ops.linear_losses as linear_losses
import fastft.ops.linear_losses_compiled as linear_losses_compiled
from fastft.apps.cli import main
from fastft.kernels.runtime import HAS_TRITON
from fastft.ops import checked_on_host, lm_head_cross_entropy
from fastft.ops.linear_losses_compiled import host_checked
from tests import train_utils

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures


def _data(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "2",
            "--eval-examples", "2", "--max-length", "24", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("objective,compiled", [("sft", False), ("distill", False), ("sft", True)])
def test_training_losses_skip_the_device_read_of_labels_checked_on_the_host(tiny, tmp_path, monkeypatch, objective,
                                                                            compiled, one_thread):
    """Eager, and compiled (the check then runs in the custom op's body, at run time: the context is entered outside
    the compiled module, as dynamo cannot trace a ContextVar's set)."""
    seen = []
    for module in (linear_losses, linear_losses_compiled):
        def spy(*args, _checked=module.check_label_range, **kwargs):
            seen.append(host_checked())
            return _checked(*args, **kwargs)

        monkeypatch.setattr(module, "check_label_range", spy)
    data = _data(tmp_path / "d.jsonl", [f"record {i}: the quick brown fox jumps over the lazy dog" for i in range(8)])
    extra = ["--objective", "distill", "--teacher", str(tiny)] if objective == "distill" else []
    if compiled:
        extra += ["--compile", "default", "--compile-backend", "aot_eager", "--dropout", "0"]
    assert main(_argv(tiny, data, tmp_path / "run", *extra)) == 0
    assert seen and all(seen), seen  # every loss call (training and evaluation) ran inside checked_on_host
    if compiled:
        record = json.loads((tmp_path / "run" / "metrics.json").read_text())["compile"]
        assert record["graphs"] >= 1 and record["graph_breaks"] == 0, record


def test_a_token_id_past_the_models_rows_is_named_before_any_forward(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny.iterdir():
        (model / f.name).symlink_to(f)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.add_tokens(["<new_token>"])  # a token the model has no row for (not resized)
    tokenizer.save_pretrained(model)
    # in every record: the step that meets it first depends on the seeded record order
    data = _data(tmp_path / "d.jsonl", [f"record {i} with <new_token> in it" for i in range(8)])
    with pytest.raises(SystemExit) as info:
        main(_argv(model, data, tmp_path / "run"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    rows = len(tokenizer) - 1
    assert f"holds token id {rows}, but the model has {rows} token rows" in err, err
    assert "resize the model's embeddings" in err


def test_the_context_skips_the_check_and_resets():
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    head = torch.nn.Linear(8, 10, bias=False)
    head.weight.data.copy_(W)
    bad = torch.tensor([1, 2, 99, -100])
    with pytest.raises(ValueError, match="`labels` holds 99, outside"):
        lm_head_cross_entropy(h, head, bad, backend="torch")
    with checked_on_host():
        assert host_checked()
        with pytest.raises(RuntimeError, match="out of bounds"):  # torch's own gather: ours was skipped
            lm_head_cross_entropy(h, head, bad, backend="torch")
    assert not host_checked()


@pytest.mark.parametrize("compiled", [False, True])
def test_the_context_skips_the_num_items_read_eager_and_traced(compiled):
    """A num_items tensor is read (a sync) to refuse 0: eagerly while validating, in the custom op's body when traced
    (the Triton backend); inside checked_on_host neither reads."""
    backend = "triton" if HAS_TRITON else "torch"
    h, W, y = torch.randn(5, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100, 4])

    def loss(n):
        return linear_losses.linear_cross_entropy(h, W, y, num_items=n, backend=backend)

    run = torch.compile(loss, backend="aot_eager", fullgraph=True) if compiled else loss
    with pytest.raises(ValueError, match="`num_items` must be a positive number"):
        run(torch.tensor(0.0))
    with checked_on_host():
        assert torch.isinf(run(torch.tensor(0.0)))  # trusted: 1/0, not read
    torch._dynamo.reset()
