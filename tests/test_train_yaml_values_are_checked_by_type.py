"""`fastft train --config`'s YAML values are read as their fields' types: a boolean is no number (`grad_accum: true`
would be 1, `lr: yes` 1.0), a number no name (`model: 123`), null only for the optional settings; a lone name is a
one-name module list, not its letters; anchors and merge keys (`<<: *base`) read as YAML defines them; an empty file
is no settings."""
import pytest

from fastft.apps.training.arguments import read_yaml_config
from fastft.apps.training.config import ConfigError


def _read(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return read_yaml_config(path)


@pytest.mark.parametrize("text, message", [
    ("grad_accum: true\n", "key 'grad_accum' must be int, got True"),
    ("lr: yes\n", "key 'lr' must be float, got True"),
    ("model: 123\n", "key 'model' must be str, got 123"),
    ("lr: null\n", "key 'lr' must be float, got None"),
    ("target_modules: [q_proj, 1]\n", "key 'target_modules' must be a list of names, got ['q_proj', 1]"),
])
def test_a_value_of_another_type_is_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r": " + message.replace("[", r"\[").replace("]", r"\]") + "$"):
        _read(tmp_path, text)


def test_values_of_their_type_read_as_given(tmp_path):
    assert _read(tmp_path, "target_modules: q_proj\nquantize: null\nmax_length: null\nlr: 3\ngrad_accum: 2\n") == {
        "target_modules": ("q_proj",), "quantize": None, "max_length": None, "lr": 3.0, "grad_accum": 2}


def test_an_empty_file_is_no_settings(tmp_path):
    assert _read(tmp_path, "") == {}
    assert _read(tmp_path, "# only a comment\n") == {}


def test_anchors_and_merge_keys(tmp_path):
    values = _read(tmp_path, "target_modules: &mods [q_proj, v_proj]\nia3_target_modules: *mods\n")
    assert values == {"target_modules": ("q_proj", "v_proj"), "ia3_target_modules": ("q_proj", "v_proj")}
    # a merge key is no setting of its own, nor a key given twice: the mapping it merges gives the settings, a key
    # given beside it overrides the merged one (YAML's rule)
    assert _read(tmp_path, "<<: {rank: 4, lr: 0.001}\nrank: 8\n") == {"rank": 8, "lr": 0.001}
