"""token_rows, the bound every label id must stay below, is the smallest of the student's embedding and head rows and
the teacher's head rows: an id past any of them has no row there. Mutation run 18: taking the largest passed every
test. A teacher with fewer head rows than the student: its head is the bound."""
from fastft.apps.training.objectives import token_rows
from tests.utils import tiny_llama


def test_a_smaller_teacher_head_bounds_the_ids():
    student, teacher = tiny_llama(vocab_size=128), tiny_llama(vocab_size=96)
    rows = (student.get_input_embeddings().num_embeddings, student.get_output_embeddings().out_features,
            teacher.get_output_embeddings().out_features)
    assert token_rows(student, teacher) == min(rows) < max(rows)
