"""`fastft train --resume --save-merged` on a finished run without checkpoints (--save-every 0): the merged model
made from the run's saved adapter, as the run would have merged it at its end — the base loaded as the run loaded it
(quantized to NF4 for QLoRA: the adapter merges into the dequantized weights it trained on), the adapter loaded and
merged — then metrics.json names it. Nothing is trained or evaluated again."""
from __future__ import annotations

import json
from pathlib import Path

from fastft.apps.training.config import TrainConfig, weights_dtype
from fastft.apps.training.run_setup import method_options
from fastft.files import atomic_write, replace_folder, write_failures_as_os_errors
from fastft.integration.sharded_state import run_shared


def merge_finished_run(cfg: TrainConfig, out: Path, metrics: dict, loaded, device, accelerator, log) -> dict:
    """`loaded`: load_models' (model path, tokenizer, model loader, tokenizer loader). Returns the new metrics."""
    import fastft
    # not at the top: `python -m fastft.apps.training.report` imports this package first (loop.py says why)
    from fastft.apps.training.report import write_report

    model_path, tokenizer, load_model, _ = loaded

    def merge():
        base = load_model(model_path, weights_dtype(cfg, device)).to(device)
        if cfg.method == "qlora":
            fastft.quantize_model(base, method_options(cfg).quant_type)  # as apply_method quantized it
        merged = fastft.merge_and_unload(fastft.load_adapter(base, out / "adapter"))
        with write_failures_as_os_errors(out):
            replace_folder(out / "merged", lambda tmp: (merged.save_pretrained(str(tmp)),
                                                        tokenizer.save_pretrained(str(tmp))))
            done = {**metrics, "merged_model": str(out / "merged")}
            write_report(out, done)
            atomic_write(out / "metrics.json", json.dumps(done, indent=2))
        return done

    done = run_shared(merge, accelerator.is_main_process, "the merge")  # one process merges the whole model
    log(f"--resume --save-merged: {cfg.output_dir} holds this run finished without checkpoints; its adapter "
        f"({out / 'adapter'}) merged into the base weights in {out / 'merged'}")
    return done if done is not None else {**metrics, "merged_model": str(out / "merged")}
