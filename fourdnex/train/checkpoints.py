"""Export the inference-ready adapter from a fine-tuning checkpoint's DeepSpeed ZeRO state.

Every checkpoint already holds ``adapter/fourdnex_adapter.safetensors`` (the training-precision weights). This
rebuilds it from the ZeRO state instead, with DeepSpeed's own ``zero_to_fp32`` merge of the fp32 master weights
(any ZeRO stage, any number of processes), e.g. for a checkpoint whose adapter file was lost:

    python -m fourdnex.train.checkpoints runs/4dnex/checkpoints/checkpoint-000500 --out runs/4dnex/adapter-fp32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fourdnex.cli import run
from fourdnex.errors import UsageError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "state"
DOMAIN_PARAMETER = "patch_embedding.domain_embedding"
LORA_ADAPTER_NAME = "default"


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
        raise UsageError(f"{path} is not a checkpoint folder (no {TRAINER_STATE_FILE})")
    return path


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
        raise UsageError(f"{checkpoint} is not a fine-tuning checkpoint (no {TRAINER_STATE_FILE})")
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
