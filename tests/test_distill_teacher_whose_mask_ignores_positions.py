"""Distillation from a teacher whose attention mask ignores position_ids (OPT, as BioGPT, XGLM, BLOOM, MPT): packed
documents would see each other in the teacher's forward, and the logits the student is distilled towards would be
silently wrong. fastft train checks the teacher as it checks the student: its documents run one at a time, said in
the log. Checked as an invariance: the distillation loss does not depend on how many documents share a row."""
import json

import pytest
import torch

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # runs training jobs


def _opt_teacher(path, tokenizer_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    torch.manual_seed(1)
    # init_std 0.2 (OPT's default: 0.02): logits far from uniform, so the distillation loss shows a leak (0.6%)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=512, word_embed_proj_dim=32,
                             init_std=0.2, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_an_opt_teacher_runs_packed_documents_alone(tmp_path, capsys):
    student = save_tiny_checkpoint(tmp_path / "student")
    teacher = _opt_teacher(tmp_path / "teacher", student)
    before = {}
    for eval_batch in (1, 4):  # one document a row, then four packed in a row
        out = tmp_path / f"eval{eval_batch}"
        assert main(["train", "--model", str(student), "--objective", "distill", "--teacher", str(teacher),
                     "--steps", "1", "--batch-size", "4", "--eval-examples", "4", "--eval-batch-size",
                     str(eval_batch), "--max-length", "32", "--dropout", "0", "--output-dir", str(out)]) == 0
        before[eval_batch] = json.loads((out / "metrics.json").read_text())["eval_before"]
        logged = capsys.readouterr()
        assert f"note: --teacher {teacher} (OPTForCausalLM, attention sdpa) would let the documents packed in a " \
               "row attend to each other" in logged.out + logged.err
    assert before[4]["examples"] == before[1]["examples"] == 4
    assert before[4]["loss"] == pytest.approx(before[1]["loss"], rel=1e-5)
