"""Gaps a mutation run over the code of the last session (b1406c9..bcea147: files.py's held temporaries and atomic
saves, LoRA / QLoRA merges and to_dense all or nothing, get_peft_model / patch_model / quantize_model undoing
themselves, prompt learning's generation with caches and its continuous-batching refusals, list flags given once,
the installed package's digest, fmt_gib) found: behaviour the suite did not pin down. Each test passes on the code
and failed on one mutant of it (the report of the run: which)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import fastft
import fastft.files as ff
from tests.test_interrupts import _out, _tiny, _trained_lora, interrupted_at


# --- files.py: a temporary being written is held, so another thread's sweep of the same target leaves it -----------

def test_atomic_write_keeps_its_temporary_through_another_threads_sweep(tmp_path):
    """The sweep another thread's write of the same path runs (remove_stale_temporaries) while this write fills its
    temporary: this process's temporary no write holds is an interrupted one's and goes; one being written stays."""
    target = tmp_path / "model.bin"

    def write(tmp):
        Path(tmp).write_bytes(b"complete")
        ff.remove_stale_temporaries(target)   # what a concurrent atomic_write(target, ...) runs first
    ff.atomic_write(target, write)
    assert target.read_bytes() == b"complete"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_a_folder_save_keeps_its_temporary_through_another_threads_sweep(tmp_path):
    target = tmp_path / "adapter"

    def write(tmp):
        (tmp / "weights.bin").write_bytes(b"new")
        ff.remove_stale_temporaries(target)   # what a concurrent save of the same folder runs first
    ff.replace_folder(target, write)
    assert (target / "weights.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_fastft_temporary_inside_the_folder_is_not_carried_into_the_new_version(tmp_path):
    """merge_into_folder carries the folder's other entries into the new version, but not a temporary of fastft's
    naming there (another writer's write probe, or one an interrupted probe of an earlier fastft left)."""
    target = tmp_path / "adapter"
    ff.merge_into_folder(target, lambda tmp: (tmp / "a.bin").write_bytes(b"1"))
    (target / "notes.txt").write_text("mine")
    host = ff._owner().split("-")[0]
    probe = target / f".fastft-write-test.tmp-{int(host, 16) ^ 1:08x}-1-1-abcd_123"   # another host's, live
    probe.write_bytes(b"")
    ff.merge_into_folder(target, lambda tmp: (tmp / "a.bin").write_bytes(b"2"))
    assert sorted(os.listdir(target)) == ["a.bin", "notes.txt"]


def test_a_process_standing_in_a_subfolder_of_the_saved_folder_stands_in_the_new_version(tmp_path, monkeypatch):
    target = tmp_path / "run"

    def write(version):
        def into(tmp):
            (tmp / "sub").mkdir()
            (tmp / "sub" / "v.txt").write_text(version)
        return into
    ff.replace_folder(target, write("1"))
    monkeypatch.chdir(target / "sub")
    ff.replace_folder(target, write("2"))
    assert Path(os.getcwd()) == (target / "sub").resolve()
    assert Path("v.txt").read_text() == "2"


def test_a_sixteen_byte_extension_is_kept_in_a_long_names_temporary_name():
    ext = "." + "x" * 15   # 16 bytes with its dot: the longest kept
    assert len(os.fsencode(ext)) == 16
    assert ff._short("model" + ext) == "model" + ext
    long = "m" * 200 + ext
    assert ff._short(long).endswith(ext) and len(os.fsencode(ff._short(long))) < 160


def test_a_name_of_160_bytes_is_kept_whole_and_one_of_161_is_cut():
    assert ff._short("n" * 156 + ".bin") == "n" * 156 + ".bin"
    cut = ff._short("n" * 157 + ".bin")
    assert cut != "n" * 157 + ".bin" and cut.endswith(".bin")


# --- modules/lora.py: a merge interrupted after peft changed the bias (lora_bias=True) -------------------------------

class _AppendInterrupted(list):
    def append(self, item):
        if not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt("injected at merged_adapters.append")
        super().append(item)


def _biased_lora(folder):
    """A lora_bias adapter (peft builds it; fastft loads it onto the dense model, where fastft's layer runs peft's
    forward for it)."""
    import peft
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            attention_bias=True)).eval()
    if not (folder / "adapter_config.json").exists():
        torch.manual_seed(5)
        built = peft.get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in built.parameters():
                if p.requires_grad:
                    p.normal_(std=0.05)
        built.save_pretrained(folder)
    return fastft.load_adapter(base(), folder, is_trainable=True).eval()


def test_a_lora_bias_merge_interrupted_before_its_record_adds_the_bias_update_once(tmp_path):
    from fastft.modules.lora import FusedLoraLinear

    reference = _out(fastft.merge_and_unload(_biased_lora(tmp_path)))
    model = _biased_lora(tmp_path)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear) and layer.lora_bias["default"]
    bias = layer.get_base_layer().bias.detach().clone()
    layer.merged_adapters = _AppendInterrupted()
    with pytest.raises(KeyboardInterrupt):
        fastft.merge_and_unload(model)
    assert layer.merged_adapters.fired and not layer.merged
    assert torch.equal(layer.get_base_layer().bias, bias)
    assert torch.allclose(_out(fastft.merge_and_unload(model)), reference, atol=1e-6)


# --- modules/qlora.py: a requantized unmerge interrupted before its record changes ------------------------------------

def _qlora():
    return _trained_lora(fastft.quantize_model(_tiny(), "nf4"))


def test_a_requantized_qlora_unmerge_interrupted_before_its_record_unmerges_once():
    from fastft.modules.qlora import FusedQLoraLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _qlora()
        reference.merge_adapter()
        reference.unmerge_adapter()
        model = _qlora()
        model.merge_adapter()
        with interrupted_at(FusedQLoraLinear.unmerge, "self.merged_adapters = []"):
            model.unmerge_adapter()
        layer = next(m for m in model.modules() if isinstance(m, FusedQLoraLinear))
        assert layer.merged   # the weight as merged, and said so
        model.unmerge_adapter()
    assert not layer.merged
    assert torch.equal(_out(model), _out(reference))


# --- integration/nf4_model.py: a layer registered under two names -----------------------------------------------------

def test_quantize_model_interrupted_between_a_shared_layers_two_names_loses_no_weight():
    from fastft.integration.nf4_model import _quantize_model, layers_to_quantize

    def shared():
        model = _tiny()
        model.model.layers[1].mlp.up_proj = model.model.layers[0].mlp.up_proj
        return model
    reference = _out(fastft.quantize_model(shared(), "nf4"))
    model = shared()
    names = [name for name, _ in layers_to_quantize(model, None, True)[0]]
    second = names.index("model.layers.1.mlp.up_proj")
    assert names.index("model.layers.0.mlp.up_proj") < second
    with interrupted_at(_quantize_model, "set_submodule(model, name, quantized[id(linear)])", occurrence=second + 1):
        fastft.quantize_model(model, "nf4")
    weightless = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is None]
    assert not weightless, f"interrupted quantize_model left {weightless} without a weight"
    fastft.quantize_model(model, "nf4")
    assert torch.equal(_out(model), reference)


# --- integration/methods: continuous batching refused on every entry, however asked -----------------------------------

def _gen():
    from tests import test_generation_features as g
    return g


def test_prompt_learning_init_continuous_batching_is_refused():
    g = _gen()
    model = g.prompt_model()
    g._refused(lambda: model.init_continuous_batching())
    g._refused(lambda: model.continuous_batching_context_manager())
    with pytest.raises(NotImplementedError, match=r"virtual tokens \(PromptTuning\)"):   # names the method
        model.generate_batch([[3, 4, 5]])


def test_a_paged_cache_asked_through_a_generation_config_is_refused():
    from transformers import GenerationConfig
    g = _gen()
    model = g.prompt_model()
    config = GenerationConfig(max_new_tokens=g.N, do_sample=False, pad_token_id=0, cache_implementation="paged")
    g._refused(lambda: model.generate(g.tokens(6, 7), generation_config=config,
                                      continuous_batching_config=g.small_cb_config(), warmup=False))


def test_a_paged_cache_the_base_models_generation_config_asks_for_is_refused():
    g = _gen()
    model = g.prompt_model()
    model.get_base_model().generation_config.cache_implementation = "paged"
    g._refused(lambda: model.generate(g.tokens(6, 7), max_new_tokens=g.N, do_sample=False,
                                      continuous_batching_config=g.small_cb_config(), warmup=False))


def test_prefix_generate_with_a_paged_cache_is_refused():
    import peft
    g = _gen()
    model = fastft.get_peft_model(g.tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    g.perturb(model)
    model.eval()
    model.get_base_model().set_attn_implementation("sdpa")
    g._refused(lambda: model.generate(g.tokens(6, 7), max_new_tokens=g.N, do_sample=False,
                                      cache_implementation="paged", continuous_batching_config=g.small_cb_config(),
                                      warmup=False))


def test_prompt_learning_continues_a_cached_conversation_given_the_new_tokens_positionally():
    g = _gen()
    model = g.prompt_model()
    N = g.N
    with torch.no_grad():
        first = model.generate(input_ids=g.tokens(6, 7), max_new_tokens=N, do_sample=False,
                               return_dict_in_generate=True)
        full = torch.cat([first.sequences, g.tokens(3, 11)], 1)
        want = g.greedy_by_forward(model, full, N)[0, -N:]
        new = full[:, first.sequences.shape[1] - 1:]
        got = model.generate(new, attention_mask=torch.ones_like(full), past_key_values=first.past_key_values,
                             max_new_tokens=N, do_sample=False)
    assert torch.equal(got[0, -N:], want)


# --- apps/provenance.py: the installed package's digest --------------------------------------------------------------

def _package(tmp_path):
    package = tmp_path / "fastft"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "lora.py").write_text("x = 1\n")
    return package


def test_an_installed_package_digest_leaves_out_compiled_files_beside_the_sources(tmp_path):
    from fastft.apps import provenance
    package = _package(tmp_path)
    first = provenance.package_digest(package)
    (package / "ops" / "lora.pyc").write_bytes(b"compiled")   # a legacy (python -B off, PEP 3147 off) cache
    (package / "ops" / "lora.pyo").write_bytes(b"optimized")
    (package / "ops" / "__pycache__").mkdir()
    (package / "ops" / "__pycache__" / "lora.kernel.nbi").write_bytes(b"a cache's index")   # not a .pyc (numba's)
    assert provenance.package_digest(package) == first


def test_an_installed_fastft_is_digested_whole(monkeypatch):
    """Without git, the digest is of the whole fastft package (its kernels and modules too, not only fastft.apps)."""
    from fastft.apps import provenance
    seen = []
    monkeypatch.setattr(provenance, "code_state", lambda root: None)
    monkeypatch.setattr(provenance, "package_digest", lambda package: seen.append(package) or "installed.x")
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "installed.x"
    finally:
        provenance.git_commit.cache_clear()
    assert seen == [Path(fastft.__file__).resolve().parent]


def test_an_installed_package_digest_passes_over_an_unreadable_file(tmp_path, monkeypatch):
    from fastft.apps import provenance
    package = _package(tmp_path)
    locked = package / "ops" / "secret.py"
    locked.write_text("y = 1\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self == locked:   # (root reads a chmod 000 file: the permission error is simulated)
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert provenance.package_digest(package).startswith("installed.")


def test_an_installed_package_digest_counts_files_not_folders(tmp_path):
    from fastft.apps import provenance
    package = _package(tmp_path)
    first = provenance.package_digest(package)
    (package / "empty").mkdir()
    assert provenance.package_digest(package) == first


# --- apps/bench: memory cells ----------------------------------------------------------------------------------------

def test_a_tiny_negative_memory_cell_keeps_its_digits():
    from fastft.apps.bench.harness import fmt_gib
    assert fmt_gib(-0.0043) == "-0.0043"   # CPU RSS deltas may fall below what the row started with


def test_the_bench_progress_line_shows_a_tiny_rows_memory(monkeypatch, capsys):
    from fastft.apps.bench import methods as methods_module
    from fastft.apps.bench.config import BenchConfig
    from fastft.apps.bench.methods import planned_row

    def run_one(cfg, method, implementation, device, compile="off"):
        return planned_row(method, implementation, compile) | {"status": "ok", "tokens_per_s": 2.0, "step_ms": 1.0,
                                                               "peak_gib": 0.0031}
    monkeypatch.setattr(methods_module, "run_one", run_one)
    monkeypatch.setattr(methods_module.peers, "preload", lambda: None)
    methods_module.bench_methods(BenchConfig(shape="tiny", methods=("lora",), peers=(), warmup=1),
                                 torch.device("cpu"), progress=False)
    out = capsys.readouterr()
    assert "peak 0.0031 GiB" in out.out + out.err


# --- integration/peft_lora.py: get_peft_model interrupted after peft froze the base ----------------------------------

def test_get_peft_model_interrupted_after_freezing_the_base_gives_back_its_requires_grad(monkeypatch):
    """peft freezes every base parameter once the layers are wrapped (_mark_only_adapters_as_trainable): a Ctrl-C
    after that must give the model back trainable as it was, not frozen."""
    from peft.tuners.lora.model import LoraModel

    from tests.test_interrupts import _lora_config
    model = _tiny()
    model.model.embed_tokens.weight.requires_grad_(False)   # the caller's own choice, kept as well
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    real = LoraModel._mark_only_adapters_as_trainable

    def interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise KeyboardInterrupt("injected after peft froze the base")
    monkeypatch.setattr(LoraModel, "_mark_only_adapters_as_trainable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fastft.get_peft_model(model, _lora_config())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any("lora" in n for n, _ in model.named_modules())


def test_quantize_model_drops_each_dense_weight_it_replaced():
    """One layer at a time, its dense weight dropped: memory falls as the walk proceeds (quantize_model's doc), also
    where the caller holds the nn.Linear itself."""
    model = _tiny()
    held = [model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj]
    fastft.quantize_model(model, "nf4")
    assert all(linear.weight is None for linear in held)


# --- integration/patching/patch.py: interrupted once attention is switched -------------------------------------------

def test_patch_model_interrupted_after_switching_attention_puts_the_attention_back():
    from fastft.integration.patching.patch import original_class, patch_model

    model = _tiny()
    with interrupted_at(patch_model, "base._fastft_patch = record"):
        fastft.patch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(original_class(m) is type(m) for m in model.modules())
    assert not hasattr(model, "_fastft_patch")
    fastft.patch_model(model)   # and patches again from scratch
    fastft.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("asked", ["assistant", "generation_config"])
def test_prompt_tuning_without_a_cache_names_why_assisted_decoding_cannot_run_however_asked(asked):
    """An assistant model, or prompt lookup asked through a GenerationConfig, on the no-cache path: refused saying why
    (transformers said 'Assisted decoding requires a cache', naming neither the cache asked for nor the default)."""
    from transformers import GenerationConfig
    g = _gen()
    model = g.prompt_model()
    if asked == "assistant":
        options = {"assistant_model": g.tiny_llama(seed=1)}
    else:
        options = {"generation_config": GenerationConfig(max_new_tokens=g.N, do_sample=False, pad_token_id=0,
                                                         prompt_lookup_num_tokens=2)}
    with torch.no_grad(), pytest.raises(ValueError, match="prompt / P-tuning with a static or passed cache"):
        model.generate(g.tokens(6, 7), max_new_tokens=g.N, do_sample=False, use_cache=False, **options)


def test_an_installed_package_digest_tells_a_files_name_from_its_contents(tmp_path):
    from fastft.apps import provenance
    one, two = tmp_path / "one" / "fastft", tmp_path / "two" / "fastft"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    (one / "x.py").write_text("1\n")
    (two / "x.py1").write_text("\n")   # the same bytes, name and contents run together
    assert provenance.package_digest(one) != provenance.package_digest(two)


# --- modules/lora.py: merge passes safe_merge on --------------------------------------------------------------------

def test_a_safe_merge_of_a_broken_adapter_is_refused_and_changes_nothing():
    model = _trained_lora(_tiny())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        fastft.merge_and_unload(model, safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged


# --- integration/methods/prompt.py: a cache passed as `cache=` (transformers 5's name) -------------------------------

def test_prompt_tuning_leaves_out_an_earlier_calls_cache_passed_as_cache():
    g = _gen()
    model = g.prompt_model()
    ids = g.tokens(6, 7)
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        first = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = first.past_key_values
        length = cache.get_seq_length()
        again = model.generate(input_ids=first.sequences, max_new_tokens=3, do_sample=False, cache=cache)
    assert torch.equal(again, want)
    assert cache.get_seq_length() == length   # left untouched


# --- bug: another host's temporary was taken for this process's abandoned one ----------------------------------------

def test_another_hosts_temporary_with_this_processs_pid_and_start_time_is_kept(tmp_path):
    """Two containers on a shared volume may both run fastft as PID 1, started in the same clock tick: a sweep took the
    other host's live temporary for one of its own interrupted ones (the host was not compared) and removed it."""
    host, pid, start = ff._owner().split("-")
    live = tmp_path / f".adapter.tmp-{int(host, 16) ^ 1:08x}-{pid}-{start}-abcd_123"
    live.mkdir()
    assert ff.remove_stale_temporaries(tmp_path / "adapter") == []
    assert live.is_dir()
