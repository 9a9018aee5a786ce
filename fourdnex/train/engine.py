"""The optimizer step under accelerate and DeepSpeed ZeRO: the process setup, the DeepSpeed config, the learning-rate
schedule and the :class:`Trainer`, which also assembles the trained adapter (from its partitions under ZeRO-3).

Training checkpoints (writing, resuming, exporting) are in :mod:`fourdnex.train.checkpoints`.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fourdnex.runtime import dtype_of
from fourdnex.train.config import LrSchedule, TrainConfig, TrainingError
from fourdnex.train.loss import Batch, LossWeights, batch_loss

if TYPE_CHECKING:  # accelerate, and peft under the adapter module: loaded when used
    from accelerate import Accelerator

    from fourdnex.model.adapters import AdapterMeta

#: The DeepSpeed json used unless --deepspeed_config or an accelerate config names another.
DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "deepspeed_zero2.json"
#: The names of the trained tensors inside the transformer: the domain embedding and the PEFT adapter.
DOMAIN_PARAMETER = "patch_embedding.domain_embedding"
LORA_ADAPTER_NAME = "default"
#: Where a run (and each of its checkpoints) puts what it trained: the adapter, or the fully trained transformer.
ADAPTER_DIR = "adapter"
TRANSFORMER_DIR = "transformer"


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: LrSchedule, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine decay to
    ``min_ratio`` at ``max_steps``, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates (LoRA A/B and the domain embedding), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def ensure_distributed_env() -> None:
    """Let a plain ``python finetune.py`` run as a one-process job: set RANK/WORLD_SIZE/... unless a launcher did."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config: the json file with the trainer's batch, accumulation, clipping and precision filled in.

    The json must leave optimizer and scheduler to the trainer, so that the AdamW and learning-rate schedule built
    here are the ones applied; a json that names either is refused.
    """
    path = Path(cfg.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or DEFAULT_DEEPSPEED_CONFIG)
    if not path.is_file():
        raise TrainingError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"DeepSpeed config {path}: not JSON ({err})") from err
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise TrainingError(f"DeepSpeed config {path}: remove {key!r}; the trainer builds the {key} (see --help)")
    if "zero_optimization" not in config:
        raise TrainingError(f"DeepSpeed config {path}: no zero_optimization section")
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    config["gradient_clipping"] = cfg.max_grad_norm
    config["bf16"] = {"enabled": cfg.mixed_precision == "bfloat16"}
    config["fp16"] = {"enabled": False}
    config["zero_allow_untested_optimizer"] = True
    return config


def zero_stage(config: dict) -> int:
    """The ZeRO stage of a :func:`deepspeed_config` (0 where it names none)."""
    return int(config["zero_optimization"].get("stage", 0))


def make_accelerator(cfg: TrainConfig, log_dir: Path | None = None) -> Accelerator:
    """An Accelerator running DeepSpeed with :func:`deepspeed_config` (gloo on a CPU-only machine)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    ensure_distributed_env()
    ds_config = deepspeed_config(cfg)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
        mixed_precision="bf16" if cfg.mixed_precision == "bfloat16" else "no",  # accelerate's spellings
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard" if log_dir else None,
        project_dir=str(log_dir) if log_dir else None,
        kwargs_handlers=handlers,
    )


@dataclass
class StepMetrics:
    """What one optimizer step reports, left on the device so that the step does not wait for it."""

    values: torch.Tensor  # (5,) float32: loss, RGB, XYZ and XYZ frame-to-frame MSEs (micro-batch means), grad norm
    lr: float


class Trainer:
    """The DeepSpeed engine around a prepared transformer, its AdamW and its learning-rate schedule.

    ``meta`` is what every adapter of the run carries (None where no adapter is written).
    """

    def __init__(
        self, cfg: TrainConfig, transformer: nn.Module, accelerator: Accelerator, meta: AdapterMeta | None
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.meta = meta
        self.dtype = dtype_of(cfg.mixed_precision)
        self.weights = LossWeights(
            cfg.rgb_loss_weight,
            cfg.xyz_loss_weight,
            cfg.rgb_first_frame_loss,
            fused=cfg.modalities == "rgbxyz",
            xyz_temporal=cfg.xyz_temporal_loss_weight,
        )
        params = list(trainable_parameters(transformer).values())
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        # The schedule is a function of the step, stepped here once per optimizer step; it is not handed to
        # accelerate (whose wrapper would step it once per process) nor to DeepSpeed.
        self.lr_factor = partial(
            lr_factor,
            warmup_steps=cfg.lr_warmup_steps,
            max_steps=cfg.max_steps,
            schedule=cfg.lr_schedule,
            min_ratio=cfg.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        self.optimizer = optimizer
        self.engine, _ = accelerator.prepare(transformer, optimizer)
        self.step = 0
        self.validation_components: dict | None = None  # loaded at the first validation

    @property
    def module(self) -> nn.Module:
        """The transformer inside the DeepSpeed engine."""
        return self.engine.module

    def train_step(self, micro_batches: list[Batch]) -> StepMetrics:
        """One optimizer step: forward and backward on each micro-batch, then clip, AdamW, schedule. Nothing here
        waits for the device."""
        device = self.accelerator.device
        lr = self.optimizer.param_groups[0]["lr"]
        totals = torch.zeros(4, device=device)  # loss, rgb, xyz, xyz_t
        for i, batch in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss, parts = batch_loss(self.engine, batch.to(device), self.weights, self.dtype)
            self.engine.backward(loss)
            self.engine.step()  # the optimizer steps on the accumulation boundary only
            totals += torch.stack([loss.detach(), parts["rgb"], parts["xyz"], parts["xyz_t"]]) / len(micro_batches)
        self.scheduler.step()
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()  # a device tensor, or a float where DeepSpeed has one
        if not isinstance(grad_norm, torch.Tensor):  # a fill on the device: no copy from the host
            grad_norm = torch.full((), float("nan") if grad_norm is None else grad_norm, device=device)
        return StepMetrics(torch.cat([totals, grad_norm.detach().float().reshape(1).to(device)]), lr)

    def full_fp32_state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter in fp32 on the CPU, from the optimizer's master weights (assembled from their
        partitions under any ZeRO stage); every process must call."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in trainable_parameters(self.module).items():
            value = safe_get_full_fp32_param(param)
            if value is None:  # no low-precision copy: the parameter is its own master weight
                value = param.detach()
            state[name] = value.float().cpu()
        return state

    def save_weights(self, folder: str | Path, step: int) -> Path | None:
        """Write what the run trains, ready for inference, into ``folder``: the adapter (``adapter/``, LoRA
        training, ``inference.py --lora_path``) or the transformer (``transformer/``, full training, a diffusers
        folder for ``inference.py --sft_path``). Every process must call; returns the path on the main process."""
        if self.cfg.train_mode == "lora":
            return self.save_adapter(Path(folder) / ADAPTER_DIR, step)
        return self.save_transformer(Path(folder) / TRANSFORMER_DIR, step)

    def save_transformer(self, folder: Path, step: int) -> Path | None:
        """Write the fully trained transformer as a diffusers folder (config + fp32 safetensors, whose metadata says
        what it was trained as: :func:`fourdnex.model.adapters.transformer_metadata`); every process must call
        (ZeRO-3 partitions the weights); returns the folder on the main process."""
        from fourdnex.files import write_safetensors
        from fourdnex.model.adapters import transformer_metadata
        from fourdnex.model.loading import WEIGHTS_FILE

        trained = self.full_fp32_state()
        if not self.accelerator.is_main_process:
            return None
        state = {name: value.detach().float().cpu() for name, value in self.module.state_dict().items()}
        state.update(trained)
        folder.mkdir(parents=True, exist_ok=True)
        self.module.save_config(folder)
        write_safetensors(folder / WEIGHTS_FILE, state, transformer_metadata(self.meta_at(step)))
        return folder

    def adapter_tensors(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The trained LoRA tensors and domain embedding (2, inner_dim) in fp32 on the CPU (main process; None
        elsewhere).

        They are read from the optimizer's fp32 master weights, which DeepSpeed assembles from their partitions
        under any ZeRO stage (under ZeRO-3 the parameters themselves are partitioned): every process must call.
        """
        from peft.utils import get_peft_model_state_dict

        state = self.full_fp32_state()
        if not self.accelerator.is_main_process:
            return None
        domain = state.pop(DOMAIN_PARAMETER, None)
        if domain is None:  # model types without a domain embedding keep it at zero
            param = self.module.domain_embedding
            domain = torch.zeros(tuple(getattr(param, "ds_shape", param.shape)))  # ZeRO-3 keeps the full shape there
        lora = get_peft_model_state_dict(self.module, state_dict=state, adapter_name=LORA_ADAPTER_NAME)
        return lora, domain

    def save_adapter(self, path: str | Path, step: int) -> Path | None:
        """Write the inference-ready adapter (fourdnex format) to ``path``; every process must call. Returns the file
        on the main process, None elsewhere."""
        from fourdnex.model.adapters import save_adapter

        tensors = self.adapter_tensors()
        if tensors is None:
            return None
        return save_adapter(path, tensors[0], tensors[1], self.meta_at(step))

    def meta_at(self, step: int) -> AdapterMeta:
        """The run's metadata with the step its weights were saved at."""
        from fourdnex.model.adapters import AdapterMeta

        return AdapterMeta(**{**asdict(self.meta), "extra": {**self.meta.extra, "step": step}})
