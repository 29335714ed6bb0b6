"""The bottleneck adapter's config: fastft's own dataclass (peft has no bottleneck adapters)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from fastft.integration.module_names import names_module
from fastft.ops.bottleneck_adapter import ACTIVATIONS

PEFT_TYPE = "FASTFT_BOTTLENECK_ADAPTER"  # written to adapter_config.json so loaders can tell it from peft's
PLACEMENTS = ("pfeiffer", "houlsby")
# the fresh heads peft's task models train as modules_to_save (PeftModelForSequenceClassification & co.)
TASK_HEADS = {"CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": (), "SEQ_CLS": ("classifier", "score"),
              "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class BottleneckAdapterConfig:
    """Bottleneck adapters h + up(act(down(h))) on sublayer outputs, before the residual add.

    placement: "pfeiffer" — after the MLP only (Pfeiffer et al., 2020); "houlsby" — after attention and after the
    MLP (Houlsby et al., 2019). The adapter wraps the sublayer's output projection: `attn_output_modules` (Llama:
    o_proj) and `mlp_output_modules` (Llama: down_proj), matched as peft matches target_modules: a tuple of names
    or dotted suffixes of module names, or one string, a regex the whole module name must match (BERT names both
    outputs `...output.dense`: attn ("attention.output.dense",), mlp r".*[.]layer[.][0-9]+[.]output[.]dense").
    Initialised near identity: the down-projection ~ N(0, init_std²), the up-projection and both biases zero, so the
    model starts unchanged.
    modules_to_save: modules trained whole beside the adapters and saved with them (peft's field: names or dotted
    suffixes); task_type as peft's: "SEQ_CLS" / "TOKEN_CLS" add the fresh head ("classifier", "score"), "QUESTION_ANS"
    its "qa_outputs", whichever the model has — else a new head would stay at its random initialisation, frozen.
    """
    # what transformers' Trainer and peft read of a PeftModel's config (class attributes, not fields: not saved)
    peft_type = PEFT_TYPE
    is_prompt_learning = False

    size: int = 64
    placement: str = "pfeiffer"
    activation: str = "relu"
    init_std: float = 0.01
    attn_output_modules: tuple[str, ...] | str = ("o_proj",)
    mlp_output_modules: tuple[str, ...] | str = ("down_proj",)
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        for field in ("attn_output_modules", "mlp_output_modules"):
            if not isinstance(getattr(self, field), str):
                setattr(self, field, tuple(getattr(self, field)))
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, str):
            self.modules_to_save = tuple(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        def bad(field, why):
            return ValueError(f"BottleneckAdapterConfig.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise bad("size", "expected a positive integer bottleneck width")
        if self.placement not in PLACEMENTS:
            raise bad("placement", f"expected one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"expected one of {ACTIVATIONS}")
        # 0 would leave both projections at zero for good (each one's gradient is the other's weight)
        if not isinstance(self.init_std, (int, float)) or not 0.0 < self.init_std < 1.0:
            raise bad("init_std", "expected a standard deviation in (0, 1)")
        for field in ("attn_output_modules", "mlp_output_modules"):
            names = getattr(self, field)
            if isinstance(names, str):
                try:
                    re.compile(names)
                except re.error as e:
                    raise bad(field, f"a string is a regex the whole module name must match: {e}") from None
            elif not names or not all(isinstance(n, str) and n for n in names):
                raise bad(field, "expected a non-empty tuple of module names (or one regex string)")
        saved = self.modules_to_save
        if saved is not None and (isinstance(saved, str) or not all(isinstance(n, str) and n for n in saved)):
            raise bad("modules_to_save", "expected a tuple of module names or dotted suffixes, e.g. ('classifier',)")
        if self.task_type is not None and self.task_type not in TASK_HEADS:
            raise bad("task_type", f"expected None or one of {sorted(TASK_HEADS)}")

    def heads_to_save(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(entries that must each name a module: modules_to_save; the task's head names, of which a model has
        one or none, as peft adds them)."""
        return tuple(self.modules_to_save or ()), TASK_HEADS.get(self.task_type, ())

    def target_fields(self) -> tuple[str, ...]:
        """The fields whose modules get adapters under this placement."""
        return ("attn_output_modules", "mlp_output_modules") if self.placement == "houlsby" else ("mlp_output_modules",)

    def matches(self, field: str, name: str) -> bool:
        """Whether module `name` is one `field` names: a regex string matches the whole name; tuple entries match
        the name or a dotted suffix of it (peft's target_modules rules)."""
        wanted = getattr(self, field)
        if isinstance(wanted, str):
            return re.fullmatch(wanted, name) is not None
        return any(names_module(entry, name) for entry in wanted)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("inference_mode")
        for field in ("attn_output_modules", "mlp_output_modules"):
            value = getattr(self, field)
            d[field] = value if isinstance(value, str) else list(value)
        if self.modules_to_save is not None:
            d["modules_to_save"] = list(self.modules_to_save)
        return {"peft_type": PEFT_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> BottleneckAdapterConfig:
        d = dict(d)
        kind = d.pop("peft_type", None)
        if kind != PEFT_TYPE:
            raise ValueError(f"not a fastft bottleneck adapter config (peft_type={kind!r}, expected {PEFT_TYPE!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BottleneckAdapterConfig: unknown fields {unknown} in the saved config")
        return cls(**d)
