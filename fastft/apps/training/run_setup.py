"""What a `fastft train` run is built from: the processes (accelerate), the models and tokenizers, the method
applied to the model (with did-you-mean errors for module names), `fastft.patch_model`, FSDP2 sharding, and the
notes a run logs about settings it overrides."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from fastft.apps.training.config import (ConfigError, TrainConfig, flag, resolved_dropout, resolved_mixed_precision,
                                         weights_dtype)
from fastft.apps.training.objectives import ObjectiveModel, causal_lm
from fastft.integration.module_names import name_hint, names_module
from fastft.integration.methods import ALL_LINEAR_SHORTHAND


def precision_notes(cfg: TrainConfig, device: torch.device) -> list[str]:
    """A line when the weights AdamW updates are bf16 (full fine-tuning asked for --dtype bf16)."""
    if cfg.method == "full" and weights_dtype(cfg, device) == torch.bfloat16:
        return ["--method full with --dtype bf16: AdamW updates the bf16 weights in place with no fp32 copy, so an "
                "update below half a bf16 step is lost (at lr 1e-5 most weights near 1.0 never move); --dtype auto "
                "(fp32 weights under bf16 autocast) keeps every update, at twice the weights' memory"]
    return []



def method_options(cfg: TrainConfig):
    from fastft.integration.methods import MethodOptions

    return MethodOptions(rank=cfg.rank, alpha=cfg.alpha, dropout=resolved_dropout(cfg), rslora=cfg.rslora,
                         target_modules=tuple(cfg.target_modules), num_virtual_tokens=cfg.num_virtual_tokens,
                         ia3_target_modules=tuple(cfg.ia3_target_modules),
                         ia3_feedforward_modules=tuple(cfg.ia3_feedforward_modules),
                         adapter_size=cfg.adapter_size, adapter_placement=cfg.adapter_placement,
                         adapter_activation=cfg.adapter_activation,
                         adapter_attn_output_modules=tuple(cfg.adapter_attn_output_modules),
                         adapter_mlp_output_modules=tuple(cfg.adapter_mlp_output_modules))



# the flags naming modules, per method (adapter's attention flag: houlsby only)
_MODULE_FLAGS = {"lora": ("target_modules",), "qlora": ("target_modules",), "dora": ("target_modules",),
                 "ia3": ("ia3_target_modules", "ia3_feedforward_modules"),
                 "adapter": ("adapter_attn_output_modules", "adapter_mlp_output_modules")}



def _module_flags(cfg: TrainConfig) -> tuple[str, ...]:
    flags = _MODULE_FLAGS.get(cfg.method, ())
    return flags[1:] if cfg.method == "adapter" and cfg.adapter_placement != "houlsby" else flags


def _named_modules(cfg: TrainConfig, field: str) -> tuple[str, ...]:
    """The module names a flag gives: none for --target-modules all-linear (peft resolves it)."""
    entries = getattr(cfg, field)
    return () if field == "target_modules" and entries == (ALL_LINEAR_SHORTHAND,) else entries


def _unmatched(cfg: TrainConfig, names: list[str]):
    """(flag field, entry) for each module name of the method's flags that matches none of `names` (peft's list
    rule: the whole name or a dotted suffix of one)."""
    for field in _module_flags(cfg):
        for entry in _named_modules(cfg, field):
            if not any(names_module(entry, n) for n in names):
                yield field, entry


def check_module_choices(model, cfg: TrainConfig) -> None:
    """ConfigError for a module-name flag that names a block of layers (e.g. `mlp`: no weight of its own, which no
    method adapts; the method would refuse it with a traceback once the model is loaded), and for houlsby adapters
    whose two lists name one module."""
    modules = dict(model.named_modules())
    matched = {}
    for field in _module_flags(cfg):
        matched[field] = set()
        for entry in _named_modules(cfg, field):
            hits = [n for n in modules if n and names_module(entry, n)]
            matched[field].update(hits)
            blocks = [n for n in hits if next(modules[n].parameters(recurse=False), None) is None]
            if blocks:
                inner = sorted({c for c, m in modules[blocks[0]].named_children()
                                if next(m.parameters(recurse=False), None) is not None})
                raise ConfigError(f"{flag(field)} {entry}: names {blocks[0]} ({type(modules[blocks[0]]).__name__}), "
                                  f"a block of layers, not a layer; name layers inside it"
                                  + (f" (its own: {', '.join(inner)})" if inner else ""))
    if cfg.method == "adapter" and len(matched) == 2:
        both = sorted(set.intersection(*matched.values()))
        if both:
            raise ConfigError(f"--adapter-attn-output-modules and --adapter-mlp-output-modules both name {both[0]}; "
                              "a module takes one adapter")



def apply_method_or_config_error(model, cfg: TrainConfig, log=None):
    """`apply_method` with the method's options; a module name that matches nothing (a typo, found only once the
    model is loaded) is a ConfigError naming its flag with a did-you-mean, not a traceback. When other names
    matched, peft trains those: a name the user gave (not the default list) that matched nothing is logged."""
    from fastft.integration.methods import apply_method
    from fastft.integration.lora_config import UnmatchedTargetWarning

    names = [name for name, _ in model.named_modules() if name]  # before apply_method changes the model
    kind = type(model).__name__
    check_module_choices(model, cfg)
    try:
        with warnings.catch_warnings():  # said below as a note, for the names the user gave
            warnings.simplefilter("ignore", UnmatchedTargetWarning)
            adapted = apply_method(model, cfg.method, method_options(cfg))
    except ValueError as e:  # peft's NoMatchingPeftModuleError is one too
        for field, entry in _unmatched(cfg, names):
            raise ConfigError(f"{flag(field)} {entry}: matches no module of {kind} (module names or dotted suffixes "
                              f"of them); {name_hint(entry, names)}") from e
        raise
    if log is not None and cfg.method in ("lora", "qlora", "dora", "ia3"):  # adapters' entries may be regexes
        defaults = TrainConfig.__dataclass_fields__
        for field, entry in _unmatched(cfg, names):
            if tuple(getattr(cfg, field)) != tuple(defaults[field].default):
                log(f"note: {flag(field)} {entry}: matches no module of {kind}, so it gets nothing (the other names "
                    f"did); {name_hint(entry, names)}")
    return adapted



def maybe_patch(model, cfg: TrainConfig, device, log) -> bool:
    """--patch-model: fastft.patch_model on the model `apply_method` returned. auto patches on a GPU when the
    architecture is supported (otherwise one line says why not and training goes on unpatched); on patches
    or stops with a ConfigError; off leaves the model alone. Returns whether it patched."""
    import fastft

    if cfg.patch_model == "off":
        return False
    if cfg.patch_model == "auto" and device.type != "cuda":
        log(f"not patched: --patch-model auto patches on a GPU only (device {device.type}; --patch-model on "
            "patches anyway)")
        return False
    try:
        fastft.patch_model(model)
    except ValueError as e:
        if cfg.patch_model == "on":
            raise ConfigError(f"--patch-model on: {e}") from None
        log(f"not patched: {e}; training goes on unpatched (--patch-model off silences this)")
        return False
    summary = causal_lm(model)._fastft_patch.summary  # on the transformers model, inside any adapter wrapper
    log(f"patched by fastft.patch_model: {summary['model_type']}: {summary['rms_norm']} RMSNorm, "
        f"{summary['glu_mlp']} GLU MLP, {summary['rope_attention']} RoPE attention, attention "
        f"{summary['attention']}")
    return True



def make_accelerator(cfg: TrainConfig):
    """accelerate sets up the processes (torchrun / `accelerate launch`); --distributed fsdp asks for FSDP2.

    accelerate runs FSDP only on accelerators (on the CPU it picks plain multi-CPU data parallelism), so on a
    machine without a GPU `--distributed fsdp` applies torch's `fully_shard` itself (`shard_model`), which is
    what accelerate's FSDP2 plugin does on a GPU: every decoder layer, then the root."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second run in one process may change the precision; keeps process groups
    kwargs = {"cpu": not torch.cuda.is_available(),  # cpu=True: gloo for torchrun on machines without a GPU
              # "no" too: None would let accelerate read ACCELERATE_MIXED_PRECISION (`accelerate launch`)
              "mixed_precision": resolved_mixed_precision(cfg),
              "dynamo_plugin": dynamo_plugin(cfg)}
    if cfg.distributed == "fsdp" and torch.cuda.is_available():
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    accelerator = Accelerator(**kwargs)
    if cfg.distributed == "none" and accelerator.num_processes > 1:
        raise ConfigError(f"--distributed none, but {accelerator.num_processes} processes were launched")
    if cfg.distributed in ("ddp", "fsdp") and accelerator.num_processes == 1:  # asked for, silently one process
        raise ConfigError(f"--distributed {cfg.distributed} needs several processes, but this is one; launch with "
                          "torchrun --nproc_per_node N -m fastft.apps.cli train ..., or leave --distributed auto")
    return accelerator



def distribution_layout(cfg: TrainConfig, accelerator) -> str:
    """How the run's state is laid out over its processes: "fsdp" (parameters and optimizer state sharded: fastft's
    shard_model or accelerate's FSDP2 plugin, also from an `accelerate launch` config under --distributed auto),
    "ddp" (whole on every process) or "none" (one process). --distributed auto and ddp under torchrun give the same
    layout, as auto and none do in one process."""
    from accelerate.utils import DistributedType

    if cfg.distributed == "fsdp" or accelerator.distributed_type == DistributedType.FSDP:  # (fsdp: several, checked)
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def launcher_notes(cfg: TrainConfig) -> list[str]:
    """One line per `accelerate launch` setting (its environment variables) that fastft train's flags override."""
    notes = []
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if cfg.compile == "off" and backend not in ("no", ""):
        notes.append(f"not compiled: accelerate's dynamo backend {backend} (ACCELERATE_DYNAMO_BACKEND, set by "
                     "`accelerate launch`) is not used; fastft train compiles with --compile MODE [--compile-backend "
                     "NAME]")
    precision, ours = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(), resolved_mixed_precision(cfg)
    if precision not in ("no", "", ours):  # "no": the launcher's default, not a request
        notes.append(f"mixed precision: --mixed-precision {ours}, not accelerate's {precision} "
                     "(ACCELERATE_MIXED_PRECISION, set by `accelerate launch`); fastft train autocasts with "
                     "--mixed-precision")
    return notes



def dynamo_plugin(cfg: TrainConfig):
    """--compile as accelerate's TorchDynamoPlugin: `prepare` then torch.compiles the wrapped model (after DDP /
    FSDP2 wrapping, as torch recommends). Always given, so that `accelerate launch --dynamo_backend ...` (an
    environment variable) cannot compile a run whose --compile is off: the setting recorded is the one that ran."""
    from accelerate.utils import TorchDynamoPlugin

    if cfg.compile == "off":
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=cfg.compile_backend, mode=cfg.compile, fullgraph=False,
                             use_regional_compilation=False)



def inductor_takes_torch_random(cfg: TrainConfig):
    """While an inductor-compiled run lasts (its compilations happen within it), inductor draws dropout's random
    numbers from torch's generator: with its own, a compiled run's masks (torch's F.dropout: LoRA/QLoRA on the torch
    path, DoRA with dropout, the model's own) differed from eager's, and a run resumed compiled <-> eager did not give
    the same losses (0.56% at step 2). The process's setting is restored after (it was left set for good)."""
    if cfg.compile == "off" or cfg.compile_backend != "inductor":
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(fallback_random=True)


def shard_model(objective: ObjectiveModel, cfg: TrainConfig, accelerator) -> bool:
    """FSDP2 without accelerate's plugin: `fastft.shard_model` (fully_shard each decoder layer, then the root;
    NF4 weights shard their packed bytes). Returns whether it sharded (then accelerate must not wrap the model
    in DDP as well). Used on CPU/gloo, where accelerate runs no FSDP, and for QLoRA everywhere (accelerate's
    plugin knows nothing of NF4 storage). For DDP, the frozen NF4 weights are left out of DDP's broadcast."""
    from fastft.integration.nf4_sharding import ignore_nf4_in_ddp, shard_model as shard

    if cfg.distributed != "fsdp" or accelerator.num_processes == 1:
        if cfg.method == "qlora" and accelerator.num_processes > 1:
            ignore_nf4_in_ddp(objective)
        return False
    if torch.cuda.is_available() and cfg.method != "qlora":
        return False  # accelerate's FSDP2 plugin shards it in prepare
    shard(objective, layer_classes=set(objective._no_split_modules or ()) or None)
    return True



def patch_problem(cfg: TrainConfig, model_config) -> str | None:
    """Why --patch-model on would stop, told from --model's config before any weight loads (patch_model itself runs
    once the model has loaded, its method is applied and the evaluation before training has run), or None."""
    if cfg.patch_model != "on":
        return None
    from fastft.integration.patching.patch import unsupported_config

    reason = unsupported_config(model_config)
    return None if reason is None else (f"--patch-model on: fastft.patch_model: {reason} (--patch-model auto trains "
                                        "such a model unpatched)")


def nf4_fsdp_problem(cfg: TrainConfig, model_config, world: int) -> str | None:
    """Why --method qlora --distributed fsdp cannot shard --model's NF4 weights over `world` processes (FSDP2 cuts
    their rows into ceil(rows/world)-row shards, uneven ones included, but a shard must hold whole quantization
    blocks: rare, as a layer's columns are a multiple of 64 on real models), or None. Checked on a meta-device
    skeleton of the model, before any weight loads (the weights would otherwise
    load and quantize, then fail in shard_model with a traceback on every process)."""
    if cfg.method != "qlora" or cfg.distributed != "fsdp" or world < 2:
        return None
    from transformers import AutoModelForCausalLM

    from fastft.integration.nf4_sharding import unshardable_nf4_layer

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(model_config)
    problem = unshardable_nf4_layer(skeleton, world)
    if problem is None:
        return None
    fits = [n for n in range(2, 17) if unshardable_nf4_layer(skeleton, n) is None]
    counts = f"of 2 to 16: {', '.join(map(str, fits))}" if fits else "none of 2 to 16 does"
    return (f"--method qlora --distributed fsdp with {world} processes: {problem}. FSDP2 shards --model {cfg.model}'s "
            f"NF4 weights by whole quantization blocks only: launch a process count whose shards hold whole blocks "
            f"({counts}), or use --distributed ddp (each process then holds the whole 4-bit base)")



def load_models(cfg: TrainConfig, device, accelerator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.apps.models import resolve_model_path

    if cfg.attn_implementation == "fastft":
        import fastft.integration.attention  # noqa: F401 - registers attn_implementation="fastft"

    def load(name):
        path = resolve_model_path(name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return path, tokenizer

    def from_pretrained(p, dtype):
        try:
            return AutoModelForCausalLM.from_pretrained(p, dtype=dtype, attn_implementation=cfg.attn_implementation)
        except KeyError as e:  # Falcon and GPT-Neo index a table of their own attention classes by the name
            if e.args != (cfg.attn_implementation,):
                raise
            raise ConfigError(f"--attn-implementation {cfg.attn_implementation}: the model at {p} picks its attention "
                              "from its own table of classes, which has no such entry; use --attn-implementation "
                              "sdpa") from None

    path, tokenizer = load(cfg.model)
    return path, tokenizer, from_pretrained, load
