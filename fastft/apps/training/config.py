"""`fastft train`'s settings: one dataclass, its help, and validation that runs
before anything is loaded.

Every field is a flag (`--grad-accum` for `grad_accum`) and a YAML key (`grad_accum: 4`), read by
fastft.apps.training.arguments. `validate` checks values and that the files named exist and parse, so a bad run fails in a
second with one line, not after the model has loaded.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.apps.compiling import COMPILE_BACKENDS, COMPILE_MODES, CUDA_GRAPH_MODES, compile_problem
from fastft.apps.datasets import TASK_NAMES
from fastft.apps.models import SMOLLM2, model_problem, rank_problem as rank_over_hidden
from fastft.apps.optimizers import OPTIMIZERS, eight_bit_problem
from fastft.files import output_dir_problem, output_names_problem
from fastft.integration.methods import ALL_LINEAR, ALL_LINEAR_SHORTHAND, METHODS, MethodOptions
from fastft.ops.bottleneck_adapter import ACTIVATIONS

INSTRUCTIONS = "instructions"  # the built-in instruction set (fastft.apps.training.records)
TASKS = (*TASK_NAMES, INSTRUCTIONS)
OBJECTIVES = ("sft", "dpo", "distill")
SCHEDULES = ("cosine", "linear", "constant")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
ADAPTER_METHODS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "adapter")
LORA_METHODS = ("lora", "qlora", "dora")  # the ones --rank, --alpha, --dropout, --loraplus-lr-ratio... apply to
MERGEABLE_METHODS = ("lora", "qlora", "dora", "ia3")  # their adapters fold into the base weights
PATCH_MODEL = ("auto", "on", "off")
_IA3 = MethodOptions()


class ConfigError(ValueError):
    """A user error in the settings or the files they name: reported as one line, exit status 2."""


def unreadable(path, error: OSError) -> str:
    """Why a file the settings name could not be read (its permissions, a failing disk), for a ConfigError: the
    OSError's traceback told the user nothing more."""
    return f"{path}: cannot read ({error.strerror or error}); check that the file is readable"


@dataclass
class TrainConfig:
    # what to train
    model: str = SMOLLM2
    task: str = "mr"
    data: str | None = None
    eval_data: str | None = None
    objective: str = "sft"
    teacher: str | None = None
    # method and its knobs
    method: str = "lora"
    quantize: str | None = None  # "nf4": alias of --method qlora
    rank: int = 16
    alpha: float = 32.0
    dropout: float | None = None  # None: 0.05, or 0 under --objective dpo (resolved_dropout)
    rslora: bool = False
    target_modules: tuple[str, ...] = ALL_LINEAR
    num_virtual_tokens: int = 32
    ia3_target_modules: tuple[str, ...] = _IA3.ia3_target_modules
    ia3_feedforward_modules: tuple[str, ...] = _IA3.ia3_feedforward_modules
    adapter_size: int = 64
    adapter_placement: str = "pfeiffer"
    adapter_activation: str = "relu"
    adapter_attn_output_modules: tuple[str, ...] = ("o_proj",)
    adapter_mlp_output_modules: tuple[str, ...] = ("down_proj",)
    # optimisation
    steps: int = 40
    epochs: float = 0.0  # > 0: replaces steps (epochs_to_steps)
    batch_size: int = 8
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    loraplus_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.0  # off by default, as before (the README's figures were measured so)
    max_length: int | None = None  # None: 64, or 128 for the built-in instructions (resolved_max_length)
    # objectives' knobs
    dpo_beta: float = 0.1
    kl_weight: float = 1.0
    reverse_kl_weight: float = 0.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    # evaluation and logs
    eval_examples: int = 160
    eval_batch_size: int = 32
    eval_every: int = 0
    seed: int = 0
    output_dir: str = "runs/lora-smollm2-mr"
    save_merged: bool = False
    # precision, memory, distribution
    dtype: str = "auto"  # auto: bf16 on a GPU (full fine-tuning: fp32 under bf16 autocast), fp32 on the CPU
    mixed_precision: str = "auto"  # auto: bf16 for full fine-tuning on a GPU with --dtype auto, else no
    gradient_checkpointing: bool = False
    offload_activations: bool = False
    deterministic: bool = False
    attn_implementation: str = "sdpa"
    patch_model: str = "auto"
    distributed: str = "auto"
    compile: str = "off"
    compile_backend: str = "inductor"
    pad_to_buckets: str = "auto"  # auto: on with CUDA graphs (resolved by validate)
    # checkpoints
    save_every: int = 0
    resume: bool = False


HELP = {
    "model": f"built-in '{SMOLLM2}' or a local transformers checkpoint directory",
    "task": f"built-in data when --data is not given: classification tasks ({', '.join(TASK_NAMES)}) train the "
            f"label word; '{INSTRUCTIONS}' is a chat instruction set built from them",
    "data": "local jsonl: {\"text\": ...}, {\"messages\": [...]}, {\"prompt\", \"completion\"} (loss on the "
            "completion), ShareGPT {\"conversations\": [...]} or Alpaca {\"instruction\", \"input\", \"output\"} "
            "lines for sft/distill, {\"prompt\", \"chosen\", \"rejected\"} for dpo (text, or lists of messages)",
    "eval_data": "local jsonl for evaluation; without it the last --eval-examples lines of --data (at most 10%%) "
                 "are held out",
    "objective": "sft: next-token loss on the answer / assistant tokens; dpo: preference pairs against the base "
                 "model with adapters disabled; distill: KL to a teacher's logits (+ CE)",
    "teacher": "distill: the teacher, a built-in name or local checkpoint with the same tokenizer",
    "method": "fine-tuning method (its knobs below)",
    "quantize": "alias of --method qlora (QLoRA on NF4 base weights; lm_head stays dense)",
    "rank": "lora/qlora/dora: adapter rank",
    "alpha": "lora/qlora/dora: scale alpha/rank",
    "dropout": "lora/qlora/dora: dropout on the adapter input, in [0, 1); unset (None): 0.05, or 0 under --objective "
               "dpo (as TRL's DPO disables dropout: the policy's log-probs then compare with the reference's "
               "unperturbed)",
    "rslora": "lora/qlora/dora: scale by alpha/sqrt(rank) instead of alpha/rank",
    "target_modules": "lora/qlora/dora: module names that get adapters, or all-linear (peft's: every linear layer "
                      "but the head)",
    "num_virtual_tokens": "prefix/prompt: number of virtual tokens",
    "adapter_size": "adapter: bottleneck width",
    "adapter_placement": "adapter: pfeiffer (after the MLP) or houlsby (after attention and MLP)",
    "adapter_activation": "adapter: the bottleneck's activation",
    "adapter_attn_output_modules": "adapter (houlsby): attention output modules, names or dotted suffixes "
                                   "(BERT: attention.output.dense)",
    "adapter_mlp_output_modules": "adapter: feed-forward output modules the adapter follows, names or dotted suffixes",
    "ia3_target_modules": "ia3: module names whose activations are scaled",
    "ia3_feedforward_modules": "ia3: those of --ia3-target-modules scaled at their input (feed-forward), not output",
    "steps": "optimizer steps",
    "epochs": "train for this many passes over the training records instead of --steps (fractions too): steps = "
              "epochs × the whole steps an epoch holds (records ÷ records a step: processes × --grad-accum × "
              "--batch-size), at least 1; 0: --steps decides",
    "batch_size": "documents per micro-batch per process (packed into one row without padding); under --objective "
                  "dpo, preference pairs (2 documents each: chosen and rejected)",
    "grad_accum": "micro-batches per optimizer step; the loss is normalised by the step's true target count",
    "optimizer": "adamw: torch's AdamW (fused on a GPU), fp32 state, 8 bytes a trainable parameter; adamw-8bit: "
                 "bitsandbytes' AdamW8bit, 8-bit blockwise state (2 bytes a parameter; embeddings and tensors under "
                 "4,096 elements keep 32-bit state), for full fine-tuning's optimizer memory; paged-adamw-8bit: the "
                 "same in CUDA unified memory, paged to the CPU when the GPU runs short (a GPU only)",
    "lr": "peak learning rate (AdamW)",
    "loraplus_lr_ratio": "LoRA+ (lora/qlora/dora): LoRA's B matrices learn at --lr times this ratio (the paper and "
                         "peft suggest 16); 0: off",
    "weight_decay": "AdamW weight decay (biases, normalization weights, IA3 vectors and DoRA magnitudes get none)",
    "schedule": "learning-rate schedule after warm-up",
    "warmup_ratio": "fraction of --steps spent warming up linearly",
    "max_grad_norm": "clip the global gradient norm to this (0: no clipping; 1.0 is a common choice)",
    "max_length": "tokens per document at most (classification prompts are cut from the left); unset (None): 64, "
                  "or 128 for --task instructions (its chats with the template's system prompt run ~65-85 tokens: "
                  "at 64 half were cut, some to an answer without its question)",
    "dpo_beta": "dpo: beta, the strength of the pull towards the reference",
    "kl_weight": "distill: weight of KL(teacher || student)",
    "reverse_kl_weight": "distill: weight of KL(student || teacher)",
    "ce_weight": "distill: weight of the cross-entropy on the data's labels",
    "temperature": "distill: softmax temperature of both models (the KL terms are scaled by T^2)",
    "eval_examples": "held-out examples evaluated before, during and after training (0: none)",
    "eval_batch_size": "documents per evaluation batch; under --objective dpo, preference pairs (2 documents each)",
    "eval_every": "evaluate every N steps (0: only before and after)",
    "seed": "seed for data order, initialisation and dropout, and for the built-in --task data the held-out split "
            "(runs with different seeds are evaluated on different examples)",
    "output_dir": "where the adapter/model, metrics.json, logs.jsonl, config.yaml and checkpoints go",
    "dtype": "weights' dtype (auto: bf16 on a GPU, but fp32 for --method full, which then trains under bf16 "
             "autocast: AdamW keeps no fp32 copy of bf16 weights, and updates below half a bf16 step would be lost; "
             "fp32 on the CPU; a distill --teacher, being frozen, is bf16 on a GPU whatever the method)",
    "mixed_precision": "autocast the forward (through accelerate); auto: bf16 for --method full on a GPU with --dtype "
                       "auto, otherwise no",
    "gradient_checkpointing": "recompute activations in the backward instead of keeping them",
    "offload_activations": "needs --gradient-checkpointing: keeps the checkpointed layer inputs (what the backward "
                           "saves) in host memory, not on the device",
    "deterministic": "torch.use_deterministic_algorithms(True) for the run (and CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                     "where unset): fastft's kernels keep their first launch config and sum in a fixed order, torch's "
                     "ops take deterministic algorithms (torch stops at one that has none, naming it); slower, and "
                     "what a bit-identical --resume on a GPU needs",
    "attn_implementation": "attention: sdpa/eager get a block-diagonal mask for packed documents; fastft runs "
                           "fastft's varlen flash attention",
    "patch_model": "fastft.patch_model after the method is applied (fused RMSNorm/RoPE/GLU kernels, fastft "
                   "attention): auto: on a GPU when the architecture is supported (else a note, unpatched), off on "
                   "the CPU; on: always (an unsupported architecture is an error); off: never",
    "distributed": "auto: whatever `accelerate launch`/torchrun set up (DDP with several processes); "
                   "ddp; fsdp (FSDP2 through accelerate); none",
    "compile": "torch.compile the training forward and backward (through accelerate's TorchDynamoPlugin): off, or "
               "torch.compile's mode: default; reduce-overhead (CUDA graphs: needs --dropout 0 with "
               "lora/qlora/dora, the fused LoRA ops' dropout seed would be replayed); max-autotune (inductor tries "
               "more kernel configs, and CUDA graphs); max-autotune-no-cudagraphs. The first steps are slower "
               "(compiling); evaluation runs uncompiled",
    "compile_backend": "--compile's backend: inductor (generated kernels; on the CPU it needs a C++ compiler); "
                       "aot_eager (traced forward and backward graphs run by eager torch, no codegen: checks that "
                       "the model compiles, quickly); eager (dynamo tracing only)",
    "pad_to_buckets": "pad each packed training micro-batch (its tokens with filler documents, its target rows "
                      "with ignored ones) up to one of eight lengths per doubling (at most 1/8 more tokens; never "
                      "counted in the loss, targets or tokens/s), so compiled graphs and CUDA graphs are reused "
                      "instead of made for nearly every batch: auto: on under --compile reduce-overhead / "
                      "max-autotune (CUDA graphs), off otherwise; not with --method prefix/prompt, nor for a model "
                      "that runs packed documents one at a time",
    "save_every": "write a resumable checkpoint every N steps (0: none)",
    "save_merged": "also save the trained adapter merged into the base weights, a plain transformers checkpoint in "
                   "OUTPUT_DIR/merged that loads without peft or fastft (AutoModelForCausalLM, vLLM): lora, dora, "
                   "ia3, and qlora (merged into the dequantized NF4 weights, dense, in the dtype the model computes "
                   "in)",
    "resume": "continue from the newest checkpoint in --output-dir (same settings; what is evaluated and saved "
              "(--save-every, --eval-every, --eval-examples, --eval-batch-size, --save-merged), how steps are "
              "computed (--gradient-checkpointing, --offload-activations, --compile, --compile-backend, "
              "--pad-to-buckets, --deterministic), --batch-size/--grad-accum of the same product, and --steps (or "
              "--epochs) under --schedule constant --warmup-ratio 0 may change)",
}

CHOICES = {
    "task": TASKS, "objective": OBJECTIVES, "method": METHODS, "quantize": ("nf4",), "schedule": SCHEDULES,
    "optimizer": OPTIMIZERS,
    "adapter_placement": ("pfeiffer", "houlsby"), "adapter_activation": ACTIVATIONS, "patch_model": PATCH_MODEL,
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"), "attn_implementation": ("sdpa", "eager", "fastft"),
    "distributed": DISTRIBUTED, "compile": COMPILE_MODES, "compile_backend": COMPILE_BACKENDS,
    "pad_to_buckets": ("auto", "on", "off"),
}

HELP_GROUPS = {
    "what to train": ("model", "task", "data", "eval_data", "objective", "teacher"),
    "method (--method " + "|".join(METHODS) + ") and its knobs": (
        "method", "quantize", "rank", "alpha", "dropout", "rslora", "target_modules", "num_virtual_tokens",
        "ia3_target_modules", "ia3_feedforward_modules", "adapter_size", "adapter_placement", "adapter_activation",
        "adapter_attn_output_modules", "adapter_mlp_output_modules"),
    "optimisation": ("steps", "epochs", "batch_size", "grad_accum", "optimizer", "lr", "loraplus_lr_ratio",
                     "weight_decay", "schedule", "warmup_ratio", "max_grad_norm", "max_length"),
    "objectives' knobs": ("dpo_beta", "kl_weight", "reverse_kl_weight", "ce_weight", "temperature"),
    "evaluation and output": ("eval_examples", "eval_batch_size", "eval_every", "seed", "output_dir",
                              "save_merged"),
    "precision, memory, distribution": ("dtype", "mixed_precision", "gradient_checkpointing", "offload_activations",
                                        "deterministic", "attn_implementation", "patch_model", "distributed"),
    "compilation": ("compile", "compile_backend", "pad_to_buckets"),
    "checkpoints": ("save_every", "resume"),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)
TUPLE_FIELDS = [name for name, t in FIELD_TYPES.items() if typing.get_origin(t) is tuple]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def to_yaml_dict(cfg: TrainConfig) -> dict:
    out = dataclasses.asdict(cfg)
    for name in TUPLE_FIELDS:
        out[name] = list(getattr(cfg, name))
    return out


def resolved_pad_to_buckets(cfg: TrainConfig) -> str:
    """--pad-to-buckets auto: on where CUDA graphs are captured (a graph per batch shape), off elsewhere and for the
    prompt-learning methods (each document runs alone)."""
    if cfg.pad_to_buckets != "auto":
        return cfg.pad_to_buckets
    return "on" if cfg.compile in CUDA_GRAPH_MODES and cfg.method not in ("prefix", "prompt") else "off"


def _compile_problem(cfg: TrainConfig) -> str | None:
    import torch

    return compile_problem(cfg.compile, cfg.compile_backend, cuda=torch.cuda.is_available(),
                           dropout=resolved_dropout(cfg), methods=(cfg.method,))


# Settings only some methods / objectives read. One under another is not refused (one YAML file may hold several
# methods' knobs): a value other than its default is named in a note, rather than ignored unannounced.
_UNMERGEABLE = {"prefix": "its virtual tokens are attention inputs", "prompt": "its virtual tokens are inputs",
                "adapter": "its bottleneck modules sit beside the layers, with a nonlinearity",
                "full": "the trained model is saved whole in OUTPUT_DIR/model already"}

_READ_BY = {
    **{name: ("method", LORA_METHODS) for name in ("rank", "alpha", "dropout", "rslora", "target_modules",
                                                   "loraplus_lr_ratio")},
    "num_virtual_tokens": ("method", ("prefix", "prompt")),
    **{name: ("method", ("ia3",)) for name in ("ia3_target_modules", "ia3_feedforward_modules")},
    **{name: ("method", ("adapter",)) for name in ("adapter_size", "adapter_placement", "adapter_activation",
                                                   "adapter_attn_output_modules", "adapter_mlp_output_modules")},
    "dpo_beta": ("objective", ("dpo",)),
    **{name: ("objective", ("distill",)) for name in ("kl_weight", "reverse_kl_weight", "ce_weight", "temperature")},
}


def reads_setting(settings: typing.Mapping, name: str) -> bool:
    """Whether a run with these settings (TrainConfig's fields by name: vars(cfg), metrics.json's config) reads the
    setting `name`: one of _READ_BY only under its methods / objectives, any other always."""
    kind, users = _READ_BY.get(name, (None, ()))
    return kind is None or settings.get(kind) in users


def unused_settings(cfg: TrainConfig, eval_records: int | None = None) -> str | None:
    """A one-line note naming the settings changed from their defaults that this run does not read, or None.
    eval_records: the number of held-out records, once known (a --data too small to hold 10% out has none)."""
    default = TrainConfig()
    default = dataclasses.replace(default, dropout=resolved_dropout(dataclasses.replace(cfg, dropout=None)))

    def changed(name: str) -> bool:
        return getattr(cfg, name) not in (None, getattr(default, name))

    unused = [f"{flag(name)} (read by --{kind} {'/'.join(users)})" for name, (kind, users) in _READ_BY.items()
              if not reads_setting(vars(cfg), name) and changed(name)]
    if cfg.data is not None and cfg.task != default.task:
        unused.append("--task (built-in data: --data replaces it)")
    if cfg.method == "adapter" and cfg.adapter_placement != "houlsby" and changed("adapter_attn_output_modules"):
        unused.append(f"{flag('adapter_attn_output_modules')} (read by --adapter-placement houlsby)")
    if cfg.compile == "off" and changed("compile_backend"):
        unused.append("--compile-backend (read by --compile, which is off)")
    if cfg.eval_examples == 0 or eval_records == 0:
        why = ("--eval-examples 0" if cfg.eval_examples == 0 else
               "--data holds under 10 records, too few to hold 10% out, and no --eval-data is given")
        unused += [f"{flag(name)} (nothing is evaluated: {why})" for name in ("eval_every", "eval_batch_size")
                   if changed(name)]
    if not unused:
        return None
    return f"note: not used by --method {cfg.method} --objective {cfg.objective}: {', '.join(unused)}"


MAX_LR = 1e6  # --lr (times --loraplus-lr-ratio) refused above this


def epochs_to_steps(cfg: TrainConfig, records: int, per_step: int) -> TrainConfig:
    """The config with --epochs turned into --steps: an epoch holds records // per_step whole steps (BatchPlan
    skips a shorter tail), so E epochs are floor(E × that), at least 1. Unchanged without --epochs."""
    if not cfg.epochs:
        return cfg
    # rounded first: 0.29 × 100 is 28.999999999999996 in binary floating point, 29 steps meant
    return dataclasses.replace(cfg, steps=max(1, math.floor(round(cfg.epochs * (records // per_step), 9))))


def rank_problem(cfg: TrainConfig, model_config) -> str | None:
    """Why --rank does not fit the model (a transformers config, known once --model resolves), or None."""
    if cfg.method not in LORA_METHODS:
        return None
    hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    return rank_over_hidden(cfg.rank, hidden, f"--model {cfg.model}", f"--method {cfg.method}")


_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
_ROTARY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_pct", "rotary_dim", "rotary_emb_base")
# rotary models that look sin/cos up in a table of limit rows built once (transformers' GPT-J, CodeGen):
# no row past it, as learned positions
_ROTARY_TABLE_TYPES = ("gptj", "codegen")


def length_problem(cfg: TrainConfig, model_config) -> tuple[str | None, str | None]:
    """(error, warning) when a document of --max-length tokens (after prefix/prompt tuning's virtual tokens) runs
    past the model's position limit: learned position embeddings have no row for it (an IndexError at the first such
    batch, hours in), refused; rotary ones extrapolate past what the model was trained on, a warning."""
    text = model_config.get_text_config()
    limit = next((getattr(text, key) for key in _POSITION_LIMITS if isinstance(getattr(text, key, None), int)), None)
    virtual = cfg.num_virtual_tokens if cfg.method in ("prefix", "prompt") else 0
    if limit is None or cfg.max_length + virtual <= limit:
        return None, None
    length = f"--max-length {cfg.max_length}" + (f" + --num-virtual-tokens {virtual}" if virtual else "")
    table = getattr(text, "model_type", None) in _ROTARY_TABLE_TYPES
    if any(getattr(text, key, None) is not None for key in _ROTARY_KEYS) and not table:
        return None, (f"warning: {length} is more than --model {cfg.model}'s {limit} positions: it was not trained "
                      "on such lengths (rotary positions extrapolate); a smaller --max-length stays inside them")
    kind = "its rotary table has" if table else "learned position embeddings:"
    return (f"{length} is more than --model {cfg.model}'s {limit} positions ({kind} no row for position "
            f"{limit}); give --max-length {limit - virtual} or less"), None


def weights_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """--dtype: auto is bf16 on a GPU, except for full fine-tuning, whose weights are what AdamW updates: in bf16
    (and with bf16 optimizer state) an update below half a bf16 step rounds away (lr 1e-5 moves no weight near
    1.0, RMSNorm's), so they stay fp32 and the forward runs under bf16 autocast (resolved_mixed_precision)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and cfg.method != "full" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def teacher_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The distillation teacher's weights: as the student's, except that --dtype auto on a GPU is always bf16 —
    the teacher is frozen, so full fine-tuning's reason for fp32 weights (AdamW's small updates) does not apply,
    and fp32 would double its memory (16 GB more for an 8B teacher) for logits autocast computes in bf16 anyway."""
    if cfg.dtype == "auto" and device.type == "cuda":
        return torch.bfloat16
    return weights_dtype(cfg, device)


def resolved_max_length(cfg: TrainConfig) -> int:
    """--max-length as given, else 64, or 128 for the built-in instruction chats (--task instructions)."""
    if cfg.max_length is not None:
        return cfg.max_length
    return 128 if cfg.data is None and cfg.task == "instructions" else 64


def resolved_dropout(cfg: TrainConfig) -> float:
    """--dropout as given, else 0.05, or 0 for dpo: TRL's DPOTrainer disables dropout (disable_dropout=True), so
    the policy's log-probs and the reference's differ by the adapters alone, not by a random mask."""
    if cfg.dropout is not None:
        return cfg.dropout
    return 0.0 if cfg.objective == "dpo" else 0.05


def resolved_mixed_precision(cfg: TrainConfig) -> str:
    """--mixed-precision auto: bf16 for full fine-tuning on a GPU with --dtype auto, whose weights are then fp32
    (weights_dtype), else no. An adapter method's trainable weights are fp32 whatever the base's dtype."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if cfg.method == "full" and cfg.dtype == "auto" and torch.cuda.is_available() else "no"


PATH_SETTINGS = ("model", "data", "eval_data", "teacher", "output_dir")
# what a run writes into --output-dir (besides its folders: checkpoints, adapter or model, merged)
OUTPUT_FILES = ("metrics.json", "report.md", "losses.png", "logs.jsonl", "config.yaml")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every setting and the files it names; returns the config with aliases resolved.
    Raises ConfigError (one line, naming the flag) on the first problem."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    # '~' as a shell expands it on the command line (a YAML file's paths are not shell-expanded; transformers'
    # TrainingArguments expands its output_dir so too)
    cfg = dataclasses.replace(cfg, **{name: os.path.expanduser(getattr(cfg, name)) for name in PATH_SETTINGS
                                      if isinstance(getattr(cfg, name), str)})
    for name in ("steps", "batch_size", "grad_accum", "rank", "eval_batch_size", "num_virtual_tokens",
                 "adapter_size"):
        need(getattr(cfg, name) >= 1, f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("epochs", "eval_examples", "eval_every", "save_every", "weight_decay", "max_grad_norm",
                 "loraplus_lr_ratio", "kl_weight", "reverse_kl_weight", "ce_weight"):
        need(getattr(cfg, name) >= 0, f"{flag(name)} must be at least 0, got {getattr(cfg, name)}")
    for name in ("epochs", "weight_decay", "max_grad_norm", "loraplus_lr_ratio", "kl_weight", "reverse_kl_weight",
                 "ce_weight", "alpha", "dpo_beta", "temperature"):  # inf passed the range checks, then lost the run
        need(math.isfinite(getattr(cfg, name)), f"{flag(name)} must be a finite number, got {getattr(cfg, name)}")
    cfg = dataclasses.replace(cfg, max_length=resolved_max_length(cfg))
    need(cfg.max_length >= 8, f"--max-length must be at least 8, got {cfg.max_length}")
    need(0 <= cfg.seed < 2**32, f"--seed must be in [0, 2**32 - 1] (numpy's and accelerate's range), got {cfg.seed}")
    need(cfg.lr > 0 and cfg.lr == cfg.lr and cfg.lr != float("inf"), f"--lr must be a positive number, got {cfg.lr}")
    # AdamW's step (lr over its bias correction, times LoRA+'s ratio) overflows fp32 near 1e37: a traceback mid-step
    need(cfg.lr * max(1.0, cfg.loraplus_lr_ratio) <= MAX_LR,
         f"--lr {cfg.lr:g}{f' times --loraplus-lr-ratio {cfg.loraplus_lr_ratio:g}' if cfg.loraplus_lr_ratio > 1 else ''}"
         f" is above {MAX_LR:g}, far past any learning rate that trains (AdamW's are ~1e-5 to 1e-2)")
    cfg = dataclasses.replace(cfg, dropout=resolved_dropout(cfg))
    need(0.0 <= cfg.dropout < 1.0, f"--dropout must be a probability in [0, 1), got {cfg.dropout}")
    need(0.0 <= cfg.warmup_ratio <= 1.0, f"--warmup-ratio must be in [0, 1], got {cfg.warmup_ratio}")
    need(cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}")
    need(cfg.dpo_beta > 0, f"--dpo-beta must be positive, got {cfg.dpo_beta}")
    need(cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}")
    for name in TUPLE_FIELDS:
        need(bool(getattr(cfg, name)) and all(getattr(cfg, name)), f"{flag(name)} needs at least one module name")
        joined = next((n for n in getattr(cfg, name) if "," in n), None)  # peft's users often write q_proj,v_proj
        need(joined is None, f"{flag(name)} {joined!r}: module names are separated by spaces, not commas: "
                             f"{flag(name)} {' '.join(p for p in joined.split(',') if p) if joined else ''}")
    need(ALL_LINEAR_SHORTHAND not in cfg.target_modules or cfg.target_modules == (ALL_LINEAR_SHORTHAND,),
         f"--target-modules {' '.join(cfg.target_modules)}: {ALL_LINEAR_SHORTHAND} (every linear layer but the head) "
         "stands alone")
    extra = sorted(set(cfg.ia3_feedforward_modules) - set(cfg.ia3_target_modules)) if cfg.method == "ia3" else []
    need(not extra, f"--ia3-feedforward-modules {' '.join(extra)}: not among --ia3-target-modules "
                    f"{' '.join(cfg.ia3_target_modules)}")
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        need(value is None or value in choices, f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")
    if cfg.quantize == "nf4":
        need(cfg.method in ("lora", "qlora"), f"--quantize nf4 is QLoRA: it cannot be combined with --method "
                                               f"{cfg.method}")
        cfg = dataclasses.replace(cfg, method="qlora")
    cfg = dataclasses.replace(cfg, mixed_precision=resolved_mixed_precision(cfg))
    need(not cfg.offload_activations or cfg.gradient_checkpointing,
         "--offload-activations needs --gradient-checkpointing (it offloads the checkpointed layer inputs)")
    # AdamW on fp16 weights: its state is fp16 too, eps (1e-8) rounds to 0 and small squared gradients underflow,
    # so 0/0 turns weights into NaN whatever the learning rate (adapters are kept in fp32 by peft: unaffected)
    need(not (cfg.method == "full" and cfg.dtype == "fp16"),
         "--method full with --dtype fp16 trains fp16 weights with fp16 optimizer state, which turns them into NaN; "
         "use --dtype auto (fp32 weights under bf16 autocast on a GPU), or --dtype fp32 with --mixed-precision "
         "fp16")
    need(cfg.mixed_precision != "fp16" or torch.cuda.is_available(),
         "--mixed-precision fp16 needs a CUDA GPU (accelerate autocasts fp16 only there: on the CPU it would train "
         "in fp32 unannounced); on the CPU use --mixed-precision bf16")
    if cfg.save_merged:
        if cfg.method not in MERGEABLE_METHODS:
            raise ConfigError(f"--save-merged: --method {cfg.method} has no base weights to merge into "
                              f"({_UNMERGEABLE[cfg.method]}); it applies to {', '.join(MERGEABLE_METHODS)}")
        need(cfg.distributed != "fsdp", "--save-merged merges the whole model in one process, not FSDP's shards; "
                                        "merge the saved adapter afterwards (README: fastft train --save-merged)")
    error = eight_bit_problem(cfg.optimizer, torch.cuda.is_available(), cfg.distributed)
    need(error is None, error or "")
    if cfg.objective == "dpo":
        need(cfg.method in ADAPTER_METHODS, "--objective dpo uses the base model with adapters disabled as its "
                                            "reference: it needs an adapter method, not --method full")
        need(cfg.data is not None or cfg.task in TASK_NAMES,
             f"--objective dpo needs --data (prompt/chosen/rejected jsonl) or a classification --task "
             f"({', '.join(TASK_NAMES)})")
    if cfg.objective == "distill":
        need(cfg.teacher is not None, "--objective distill needs --teacher (a built-in name or local checkpoint)")
        need(cfg.kl_weight + cfg.reverse_kl_weight + cfg.ce_weight > 0,
             "--objective distill: --kl-weight, --reverse-kl-weight and --ce-weight are all 0")
    else:
        need(cfg.teacher is None, f"--teacher is only used by --objective distill (got --objective {cfg.objective})")
    error = _compile_problem(cfg)
    need(error is None, error or "")
    need(not (cfg.pad_to_buckets == "on" and cfg.method in ("prefix", "prompt")),
         f"--pad-to-buckets on: --method {cfg.method} runs each packed document on its own (its virtual tokens), "
         "one forward per document length whatever the row's: padding the row gains nothing; use --pad-to-buckets "
         "off")
    cfg = dataclasses.replace(cfg, pad_to_buckets=resolved_pad_to_buckets(cfg))
    error = model_problem(cfg.model, "--model")
    need(error is None, error or "")
    if cfg.teacher is not None:
        error = model_problem(cfg.teacher, "--teacher")
        need(error is None, error or "")
    for name in ("data", "eval_data"):
        path = getattr(cfg, name)
        if path is not None:
            need(bool(str(path).strip()), f"{flag(name)} is an empty path; give a jsonl file")
            try:  # is_dir/is_file raise where a folder on the way may not be searched
                need(not Path(path).is_dir(), f"{flag(name)} {path}: is a directory; give a jsonl file")
                need(Path(path).is_file(), f"{flag(name)} {path}: file not found")
            except OSError as e:
                raise ConfigError(f"{flag(name)} {unreadable(path, e)}") from None
    need(cfg.eval_data is None or cfg.data is not None, "--eval-data needs --data")
    problem = output_dir_problem(cfg.output_dir) or output_names_problem(cfg.output_dir, OUTPUT_FILES, (
        "checkpoints", "adapter" if cfg.method != "full" else "model", *(("merged",) if cfg.save_merged else ())))
    need(problem is None, problem or "")  # (a name of the other kind failed the run only once it had trained)
    if cfg.resume:
        need(Path(cfg.output_dir).is_dir(), f"--resume: the output directory {cfg.output_dir} does not exist "
                                            "(nothing to resume; drop --resume to start a run)")
    return cfg
