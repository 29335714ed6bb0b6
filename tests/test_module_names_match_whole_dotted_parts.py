"""fastft.integration.module_names as peft matches target_modules: an entry names a module by its whole name or a
whole dotted suffix of it, never a partial part ("proj" is not "o_proj"; "0.o_proj" is not "10.o_proj"), through the
bottleneck adapter's config too; and `name_hint` compares only the last part of a dotted entry, so a long dotted
typo still gets its suggestion."""
from fastft.integration.methods.adapter.config import BottleneckAdapterConfig
from fastft.integration.module_names import name_hint, names_module

NAMES = [f"model.layers.{i}.{part}" for i in (0, 10) for part in ("self_attn.o_proj", "mlp.down_proj", "mlp.up_proj")]


def test_an_entry_matches_whole_dotted_parts_only():
    name = "model.layers.10.self_attn.o_proj"
    for entry in ("o_proj", "self_attn.o_proj", "10.self_attn.o_proj", name):
        assert names_module(entry, name), entry
    for entry in ("proj", "_proj", "n.o_proj", "0.self_attn.o_proj", "attn.o_proj", "model.layers.10.self_attn.o"):
        assert not names_module(entry, name), entry


def test_the_adapter_config_matches_as_peft_does():
    config = BottleneckAdapterConfig(placement="houlsby", attn_output_modules=("0.self_attn.o_proj",),
                                     mlp_output_modules=("proj",))
    assert [n for n in NAMES if config.matches("attn_output_modules", n)] == ["model.layers.0.self_attn.o_proj"]
    assert not any(config.matches("mlp_output_modules", n) for n in NAMES)


def test_a_long_dotted_typo_is_compared_by_its_last_part():
    assert name_hint("model.layers.0.mlp.down_prj", NAMES) == "did you mean 'down_proj'?"
    assert name_hint("mlp.down_prj", NAMES) == "did you mean 'down_proj'?"
    assert name_hint("zzzz", NAMES).startswith("name a module of the model")
