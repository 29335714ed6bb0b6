"""Resumable checkpoints (atomic single files and folders: fastft.files).

A checkpoint holds everything the next step reads: the trained weights, the optimizer and scheduler state,
the step, the data cursor, the logs so far, and every RNG of every process (torch's CPU generator also
seeds fastft's LoRA dropout, see fastft.ops.shared.draw_seed), and fp16's loss-scaler state. It is written into a
temporary folder, each file fsynced, then renamed into place; the previous checkpoint is removed only after that,
so a SIGKILL at any moment leaves at least one complete checkpoint (a previous one a kill left beside it goes when
the run resumes). Only the newest is kept (a full fine-tune's optimizer state is twice its weights: a second copy
would double the disk a run needs); a checkpoint file damaged from outside so that it no longer opens (missing,
truncated, not a checkpoint file) is found before any model loads and named, not fallen back from silently. No
checksums are kept (hashing a full fine-tune's optimizer state at every save costs minutes): a file changed in place
at its full size is not detected.

What a resumed run is compared against: the settings (`comparable_settings`: aliases folded, paths left to the
content checks), and the base models' contents (`model_fingerprints`, besides the data's sha256 the loop checks).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from fastft.apps.models import SMOLLM2, model_fingerprint, resolve_model_path
from fastft.apps.training.config import ConfigError
from fastft.files import finish_folder, fsync_path, write_failures_as_os_errors
from fastft.integration.sharded_state import is_sharded, run_shared

_STEP_DIR = re.compile(r"step-(\d{8})")
_TRAINER_KEYS = ("step", "processes", "plan", "scheduler", "history")


# ----------------------------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- state dicts

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_state_dict(model, trainable_only: bool) -> dict:
    """Every (or every trainable) weight of `model`, whole and on the CPU (gathered under FSDP2: collective).
    Unsharded models are read directly (torch's state-dict helpers walk every module's state and trip over
    fastft's NF4Weight, which is not a tensor)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_sharded(model):
        if trainable_only:
            return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        # one CPU copy per tensor: tied keys (lm_head = embed_tokens) keep sharing it (on a GPU `.cpu()` copies
        # each key apart, and save_pretrained, which drops aliases by storage, would write the weight twice)
        copies: dict[int, torch.Tensor] = {}
        state = {}
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) not in copies:
                copies[id(v)] = v.detach().cpu()
            state[k] = copies[id(v)]
        return state
    state = get_model_state_dict(model, options=_options(ignore_frozen_params=trainable_only))
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    # each key was gathered into its own tensor: keys of one tied parameter (lm_head = embed_tokens) share one
    # again, or transformers' save_pretrained (which drops aliases by storage) writes the weight twice
    first: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name in state:
            state[name] = state[first.setdefault(id(value), name)]
    return state


class Checkpoints:
    """OUTPUT_DIR/checkpoints/step-NNNNNNNN folders; every process calls save/load (gathers are collective)."""

    def __init__(self, output_dir: str | os.PathLike, accelerator):
        self.root = Path(output_dir) / "checkpoints"
        self.accelerator = accelerator

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        steps = sorted(p for p in self.root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir())
        return steps[-1] if steps else None

    def trainer_state(self, path: Path) -> dict:
        """Checkpoint `path`'s trainer state (step, data cursor, logs, and the settings of the run that wrote it
        under "config", absent in checkpoints written before they were recorded), once every file of the checkpoint
        is there and readable (a ConfigError naming the one that is not); refused unless this run has the same number
        of processes (each restores its own RNG). Cheap: the weights and optimizer files are checked, not read."""
        state = self._read(path, "trainer_state.pt", lambda f: torch.load(f, weights_only=False))
        missing = [k for k in _TRAINER_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise self._damaged(path, "trainer_state.pt", f"it lacks {', '.join(missing)}")
        if state["processes"] != self.accelerator.num_processes:
            n = state["processes"]
            raise ConfigError(f"--resume: {path} was written by {n} process{'es' if n != 1 else ''}, this run has "
                              f"{self.accelerator.num_processes}; resume with the same number")
        self._read(path, "trainable.safetensors", _open_safetensors)
        self._read(path, "optimizer.pt", lambda f: torch.load(f, mmap=True, map_location="cpu", weights_only=False))
        for process in range(state["processes"]):
            self._read(path, f"rng-{process}.pt", lambda f: torch.load(f, weights_only=False))
        return state

    def _read(self, path: Path, name: str, read):
        file = path / name
        if not file.is_file():
            raise self._damaged(path, name, "it is missing")
        try:
            return read(file)
        except Exception as e:  # torch's and safetensors' errors name neither the file nor the cause
            raise self._damaged(path, name, f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}; "
                                            f"{file.stat().st_size} bytes): truncated or corrupt") from None

    def _damaged(self, path: Path, name: str, what: str) -> ConfigError:
        older = sorted(p.name for p in self.root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.name < path.name)
        fallback = f"delete it to resume from the older {older[-1]}" if older else \
            "delete it to start the run over (--resume then starts at step 0; only the newest checkpoint is kept)"
        return ConfigError(f"--resume: checkpoint {path} is damaged: {name}: {what}; {fallback}, or restore the "
                           "file from a backup")

    def save(self, step: int, model, optimizer, trainer_state: dict, save_adapter=None) -> Path:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        acc = self.accelerator
        weights = full_state_dict(model, trainable_only=True)
        sharded = is_sharded(model)
        optim = get_optimizer_state_dict(model, optimizer, options=_options()) if sharded else optimizer.state_dict()
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        main = acc.is_main_process
        # every phase ends in run_shared's outcome, not a barrier: a rank that fails (a full disk) stops every rank
        self._phase(main, lambda: self._start(tmp), tmp)

        def write():
            with write_failures_as_os_errors(tmp):  # a full disk: the run's one-line stop, not a traceback
                torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
                if not main:
                    return
                save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
                torch.save({**trainer_state, "step": step, "processes": acc.num_processes}, tmp / "trainer_state.pt")
                if save_adapter is not None:
                    save_adapter(tmp / "adapter", weights)
        self._phase(True, write, tmp)
        self._phase(main, lambda: self._publish(tmp, final), tmp)
        return final

    def _phase(self, runs_here: bool, work, tmp: Path) -> None:
        """`work()` where it runs here, then every rank learns whether any failed (run_shared); a failure removes the
        unfinished folder (a full disk gets its space back) and raises on every rank."""
        try:
            run_shared(work, runs_here, "checkpoint")
        except BaseException:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _start(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step-*.tmp"):  # a killed save's (the run holds --output-dir: no other's)
            shutil.rmtree(stale)
        tmp.mkdir()

    def _publish(self, tmp: Path, final: Path) -> None:
        finish_folder(tmp)
        if final.exists():  # the same step written again: rename cannot replace a non-empty folder, so the
            shutil.rmtree(final)  # old one goes first; the other steps stay until the new one is in place
        os.replace(tmp, final)
        fsync_path(self.root)
        self.remove_others(final)  # the new one is complete: the previous ones can go

    def remove_others(self, kept: Path) -> None:
        """Remove every checkpoint but `kept` (main process): after `kept` was published, and after a resume from it
        (a run killed between publishing a checkpoint and removing the previous one left that one, whole or half
        removed, which no later save removed when none came)."""
        for older in self.root.iterdir():
            if _STEP_DIR.fullmatch(older.name) and older != kept:
                try:
                    shutil.rmtree(older)
                except OSError as e:  # (a file held open on NFS): the kept checkpoint stands, the run goes on
                    warnings.warn(f"fastft train: the older checkpoint {older} could not be removed ({e}); the new "
                                  f"one, {kept.name}, is complete: delete the older one by hand", stacklevel=3)

    def load(self, path: Path, model, optimizer) -> None:
        """Restore weights, optimizer and this process's RNG (the trainer state: `trainer_state`)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        acc = self.accelerator
        weights = load_file(str(path / "trainable.safetensors"))
        renames = layout_renames(weights, {n for n, p in model.named_parameters() if p.requires_grad})
        weights = {renames.get(k, k): v for k, v in weights.items()}
        self._check_weights(path, weights, model)
        optim = torch.load(path / "optimizer.pt", weights_only=False)
        if renames and is_sharded(model):  # its state is keyed by parameter names there (else by position)
            optim = _renamed_optimizer_state(optim, renames)
        groups, ours = len(optim["param_groups"]), len(optimizer.param_groups)
        if groups != ours:  # e.g. written before weight decay left biases and norms out (a group of their own)
            raise ConfigError(f"--resume: {path} holds optimizer state in {groups} parameter group(s), this "
                              f"version of fastft train makes {ours} for these settings; finish the run with "
                              "the fastft that started it, or start a new run in another --output-dir")
        # torch restores a group's implementation flags with its state: this run's (fused on one GPU, foreach
        # under FSDP or fp16's GradScaler: fastft.apps.optimizers) must hold whatever the writing run had
        flags = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
        if is_sharded(model):
            # strict=False: the frozen weights are not in the file; but each of its tensors must land somewhere
            skipped = set_model_state_dict(model, weights, options=_options(strict=False)).unexpected_keys
            if skipped:
                raise ConfigError(f"--resume: {path}: {len(skipped)} tensor(s) of trainable.safetensors match no "
                                  f"weight of the sharded model ({sorted(skipped)[0]}, ...); they would not load")
            set_optimizer_state_dict(model, optimizer, optim, options=_options())
        else:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(optim)
        for group, kept in zip(optimizer.param_groups, flags):
            group.update(kept)
        set_rng_state(torch.load(path / f"rng-{acc.process_index}.pt", weights_only=False))

    def _check_weights(self, path: Path, weights: dict, model) -> None:
        """The checkpoint holds every trainable parameter, as shaped and typed here, and nothing else: a missing one
        would silently restart from its initial value while its optimizer moments are restored."""
        expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or extra:
            what = (f"it lacks {len(missing)} trainable parameter(s) ({missing[0]}, ...)" if missing else
                    f"it holds {len(extra)} tensor(s) that are no trainable parameter here ({extra[0]}, ...)")
            raise self._damaged(path, "trainable.safetensors", what)
        for name, param in expected.items():
            saved = weights[name]
            if tuple(saved.shape) != tuple(param.shape) or saved.dtype != param.dtype:
                raise self._damaged(path, "trainable.safetensors",
                                    f"{name} is {saved.dtype} {tuple(saved.shape)}, the parameter "
                                    f"{param.dtype} {tuple(param.shape)}")


_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def layout_renames(saved, expected: set[str]) -> dict[str, str]:
    """{old name: new name} for a checkpoint of bottleneck adapters written before BottleneckAdapterModel took peft's
    layout: its tensors were named `base_model.<key>`, now `base_model.model.<key>`. Empty unless the names differ
    and that renaming makes them equal exactly (anything else stays a mismatch, which _check_weights refuses)."""
    if set(saved) == expected:
        return {}
    renames = {k: "base_model.model." + k.removeprefix("base_model.") for k in saved if k.startswith("base_model.")}
    return renames if {renames.get(k, k) for k in saved} == expected else {}


def _renamed_optimizer_state(optim: dict, renames: dict[str, str]) -> dict:
    """A sharded model's full optimizer state (keyed by parameter names) under the renamed parameters."""
    groups = [{**g, "params": [renames.get(n, n) for n in g["params"]]} for g in optim["param_groups"]]
    return {**optim, "state": {renames.get(k, k): v for k, v in optim["state"].items()}, "param_groups": groups}


def _open_safetensors(file: Path) -> list[str]:
    """The tensor names; safetensors checks that the header's offsets fit the file (a truncated one fails)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


# ------------------------------------------------------------------------------------------- fp16 loss scaler

def scaler_state(accelerator) -> dict | None:
    """--mixed-precision fp16's GradScaler state (scale, growth tracker), None without one: a resumed run must
    scale, and skip, as the uninterrupted run would."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else None


def restore_scaler(accelerator, state: dict | None) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if state and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(state)


# ----------------------------------------------------------------------------------- what a resume compares

PATH_SETTINGS = ("model", "teacher", "data", "eval_data")
CONTENT_COMPARED = "<a path: its contents are compared>"


def comparable_settings(values: dict) -> dict:
    """A run's settings (config.to_yaml_dict) as a resumed run compares them: `--quantize nf4` as the `--method
    qlora` it stands for, and each path (of PATH_SETTINGS) as CONTENT_COMPARED: its contents are compared apart (the
    data's sha256, `model_fingerprints`), so a moved project folder, another mount point or a copy resumes, and a
    relative path equals an absolute one. The built-in model's name (not a path) is compared as it is; given or not
    (None) still counts."""
    out = dict(values)
    if out.get("quantize") == "nf4":
        out["method"], out["quantize"] = "qlora", None
    for name in PATH_SETTINGS:
        if out.get(name) is not None and out[name] != SMOLLM2:
            out[name] = CONTENT_COMPARED
    return out


def model_fingerprints(cfg, model_path: str) -> dict:
    """{"model", "teacher"}: fastft.apps.models.model_fingerprint of each (None: no teacher)."""
    teacher = model_fingerprint(resolve_model_path(cfg.teacher)) if cfg.teacher is not None else None
    return {"model": model_fingerprint(model_path), "teacher": teacher}


def check_resumed_models(now: dict, saved: dict | None, checkpoint: Path) -> None:
    """A ConfigError when --model's (or --teacher's) files changed since the checkpoint was written: the same path
    holding another model would continue the adapters on another base."""
    if saved is None:  # written before checkpoints kept the models' fingerprints
        return
    for name, files in now.items():
        before = saved.get(name)
        if before is None or files is None or before == files:
            continue
        changes = [f"{f} removed" for f in sorted(before.keys() - files.keys())] + \
                  [f"{f} added" for f in sorted(files.keys() - before.keys())] + \
                  [f"{f} differs" + (f" ({before[f]['size']} -> {files[f]['size']} bytes)"
                                     if before[f]["size"] != files[f]["size"] else "")
                   for f in sorted(files.keys() & before.keys()) if files[f] != before[f]]
        raise ConfigError(f"--resume: --{name}'s files changed since {checkpoint} was written "
                          f"({'; '.join(changes)}); resume with the model the run started with, or start a new run in "
                          "another --output-dir")
