"""A hand-written accelerate loop around fastft's Python API, from a review: accelerate's save_state/load_state of
a model with NF4 weights, and saves from several processes at once (peft's is_main_process, or every process
saving the same folder)."""
import threading

import torch
from accelerate import Accelerator
from peft import LoraConfig
from torch import nn

import fastft
from fastft.files import merge_into_folder, replace_folder
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def test_accelerate_save_state_then_load_state_restores_nf4_weights(tmp_path):
    """The double-quantized absmax of a weight whose blocks do not fill the last 256-block was a view into the
    padding, which safetensors' load_model (accelerate's load_state) refused: 'None is covering the entire storage'."""
    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 64)), NF4Linear.from_linear(nn.Linear(64, 48)))
    state = model.state_dict()
    for key, value in state.items():
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    accelerator.save_state(tmp_path / "state")
    with torch.no_grad():  # overwritten, so that the load must bring the bytes back
        for layer in prepared:
            layer.weight.packed.zero_()
    accelerator.load_state(tmp_path / "state")
    for key, value in prepared.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_save_adapter_writes_nothing_where_is_main_process_is_false(tmp_path):
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert fastft.save_adapter(model, tmp_path / "rank1", is_main_process=False) == tmp_path / "rank1"
    assert not (tmp_path / "rank1").exists()
    fastft.save_adapter(model, tmp_path / "rank0", is_main_process=True)
    assert (tmp_path / "rank0" / "adapter_model.safetensors").is_file()


def test_writers_saving_one_folder_at_once_never_fail(tmp_path):
    """Every process saving the same folder (no is_main_process): each writer moved the previous version to the one
    name `.NAME.old`, so about 2 saves in 3 raised 'Directory not empty' or FileNotFoundError, and of first saves
    racing to make the folder all but one did. The last save wins."""
    target, errors = tmp_path / "adapter", []
    first = threading.Barrier(3)  # the three first saves reach their swap together: none finds the folder there

    def first_save(k: int):
        def write(tmp):
            (tmp / "adapter_config.json").write_text(f"{k}-first")
            (tmp / "adapter_model.safetensors").write_text(f"{k}-first")
            first.wait()
        try:
            merge_into_folder(target, write)
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(repr(e))

    threads = [threading.Thread(target=first_save, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    def writer(k: int, save):
        for i in range(15):
            def write(tmp, i=i):
                (tmp / "adapter_config.json").write_text(f"{k}-{i}")
                (tmp / "adapter_model.safetensors").write_text(f"{k}-{i}")
            try:
                save(target, write)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))

    for save in (merge_into_folder, replace_folder):
        threads = [threading.Thread(target=writer, args=(k, save)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        config, weights = ((target / name).read_text() for name in ("adapter_config.json", "adapter_model.safetensors"))
        assert config == weights and config.endswith("-14")  # one save's files, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no previous versions, no temporaries
