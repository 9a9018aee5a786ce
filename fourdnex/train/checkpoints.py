"""Training checkpoints: their layout, writing, resuming from, listing, and exporting an adapter from one.

A run writes ``OUTPUT_DIR/checkpoints/checkpoint-NNNNNN/`` every ``checkpointing_steps`` (the newest
``checkpoints_total_limit`` kept), each written as a hidden ``.checkpoint-NNNNNN.partial`` folder and renamed when
complete, holding:

* ``state/`` (with DeepSpeed's ``latest`` and its merge scripts): the DeepSpeed state (trainable parameters,
  optimizer, per process), what a resumed run loads;
* ``trainer_state.json``: the step, the learning rate, the run's settings, the adapter metadata, the process count;
* ``adapter/fourdnex_adapter.safetensors``: the inference-ready adapter (``inference.py --lora_path``), or, for
  ``--train_mode full``, ``transformer/`` (a diffusers transformer folder, ``inference.py --sft_path``).

Run as a module, this rebuilds that adapter from the ZeRO state instead, with DeepSpeed's own ``zero_to_fp32``
merge of the fp32 master weights (any ZeRO stage, any number of processes), e.g. for a checkpoint whose adapter
file was lost:

    python -m fourdnex.train.checkpoints runs/4dnex/checkpoints/checkpoint-000500 --out runs/4dnex/adapter-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fourdnex.cli import run
from fourdnex.files import write_json
from fourdnex.train.config import TrainingError
from fourdnex.train.engine import DOMAIN_PARAMETER, LORA_ADAPTER_NAME

if TYPE_CHECKING:
    from fourdnex.train.engine import Trainer

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "state"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_checkpoint(value: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest checkpoint of ``output_dir`` (None if there is none); a folder -> itself."""
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise TrainingError(f"{path} is not a checkpoint folder (no {TRAINER_STATE_FILE})")
    return path


def _jsonable(value):
    """Tuples to lists, everything else as is (for json)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save_checkpoint(trainer: Trainer, step: int) -> Path:
    """Write checkpoint ``step`` of ``trainer`` (DeepSpeed state, trainer state, adapter) atomically; keep the newest
    ``checkpoints_total_limit``. Every process must call."""
    accelerator, cfg = trainer.accelerator, trainer.cfg
    root = Path(cfg.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    partial_dir = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    trainer.engine.save_checkpoint(str(partial_dir), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    trainer.save_weights(partial_dir, step)
    if accelerator.is_main_process:
        state = {
            "step": step,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "config": _jsonable(asdict(cfg)),
            "adapter_meta": asdict(trainer.meta),
            "world_size": accelerator.num_processes,
        }
        write_json(partial_dir / TRAINER_STATE_FILE, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial_dir, final)
        for old in list_checkpoints(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(trainer: Trainer, path: Path) -> int:
    """Restore weights, optimizer state and step of ``trainer`` from a checkpoint; returns the step to continue from.

    The learning rate is the schedule of this run's settings at that step (so a resumed run may extend
    ``max_steps``); with unchanged settings the run continues exactly as if never stopped.
    """
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    loaded, _ = trainer.engine.load_checkpoint(
        str(path), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise TrainingError(f"{path}: no DeepSpeed state under tag {DEEPSPEED_TAG!r}")
    trainer.step = int(state["step"])
    trainer.scheduler.last_epoch = trainer.step
    for group, base in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs, strict=True):
        group["lr"] = base * trainer.lr_factor(trainer.step)
    return trainer.step


def fp32_trainable_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The trainable parameters of a checkpoint in fp32, merged from its ZeRO partitions by ``zero_to_fp32``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)


def export_adapter(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the fourdnex adapter (fp32 LoRA + domain embedding + the run's metadata) of ``checkpoint`` to ``out``."""
    from fourdnex.model.adapters import AdapterMeta, save_adapter

    checkpoint = Path(checkpoint)
    state_file = checkpoint / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise TrainingError(f"{checkpoint} is not a fine-tuning checkpoint (no {TRAINER_STATE_FILE})")
    trainer_state = json.loads(state_file.read_text())
    meta = AdapterMeta(**trainer_state["adapter_meta"])
    meta.extra = {**meta.extra, "step": trainer_state["step"], "precision": "fp32 (zero_to_fp32)"}
    state = fp32_trainable_state(checkpoint)
    domain = state.pop(DOMAIN_PARAMETER, None)
    if domain is None:  # model types without a domain embedding do not train it
        inner_dim = next(v.shape[1] for k, v in state.items() if ".lora_A." in k)
        domain = torch.zeros(2, inner_dim)
    lora = {key.replace(f".{LORA_ADAPTER_NAME}.", "."): value for key, value in state.items()}
    return save_adapter(out, lora, domain, meta)


def main(args: argparse.Namespace) -> None:
    """Export ``args.checkpoint``'s adapter to ``args.out``."""
    print(f"adapter: {export_adapter(args.checkpoint, args.out or Path(args.checkpoint) / 'adapter-fp32')}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.train.checkpoints``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.train.checkpoints", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint folder written by finetune.py")
    parser.add_argument(
        "--out", default=None, help="adapter folder or .safetensors file (default: CHECKPOINT/adapter-fp32)"
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
