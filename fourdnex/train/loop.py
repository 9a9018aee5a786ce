"""The fine-tuning run ``finetune.py`` starts: the model, the loop, validation samples.

The loop keeps the accelerator busy: the samples are drawn per step (:mod:`fourdnex.train.data`: one generator call
for the whole global batch, the noise drawn on the device, the micro-batches gathered on the device where the cache is
held there), and the step's numbers stay on the device until they are logged, which reads them back in one go every
:data:`METRICS_READ_STEPS` steps, at checkpoints and at the end.

The other pieces: :mod:`fourdnex.train.data` (what each step trains on), :mod:`fourdnex.train.config` (the settings),
:mod:`fourdnex.train.loss` (the objective),
:mod:`fourdnex.train.engine` (the optimizer step under DeepSpeed), :mod:`fourdnex.train.checkpoints` (training
checkpoints), :mod:`fourdnex.train.memory_policy` and :mod:`fourdnex.train.block_recompute` (what gradient
checkpointing keeps).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fourdnex.config import DEFAULT_MODEL_PATH, FLASH_4_BACKEND, MODEL_TYPES
from fourdnex.data.cache import LatentCache
from fourdnex.model.loading import check_model_folder
from fourdnex.runtime import device_of, dtype_of
from fourdnex.train.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from fourdnex.train.config import AUTO_ATTENTION_BACKEND, METRICS_READ_STEPS, TrainConfig, TrainingError
from fourdnex.train.data import HeldCache, SampleStream, VaeConditionEncoder, batch_of_samples, read_batch
from fourdnex.train.engine import (
    LORA_ADAPTER_NAME,
    StepMetrics,
    Trainer,
    deepspeed_config,
    make_accelerator,
    trainable_parameters,
    zero_stage,
)
from fourdnex.train.loss import Batch
from fourdnex.train.memory_policy import RecomputePlan, choose_activation_memory

if TYPE_CHECKING:  # the model and adapter modules import diffusers and peft: loaded when used
    from fourdnex.model.adapters import AdapterMeta

logger = logging.getLogger("fourdnex.train.loop")


# --------------------------------------------------------------------------------------------------------------------
# The model.


def check_lora_targets(transformer: nn.Module, targets: tuple[str, ...]) -> None:
    """Raise TrainingError naming a target that matches no linear layer of the transformer blocks."""
    names = [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise TrainingError(
                f"LoRA target {target!r} matches no linear layer of the transformer (e.g. to_q, ffn.net.2)"
            )


def attention_backend(cfg: TrainConfig) -> str | None:
    """The attention backend to set on the transformer for ``cfg`` on this machine (None: diffusers' default, native
    SDPA); ``auto`` says what it picked and why in one line."""
    if cfg.attention_backend != AUTO_ATTENTION_BACKEND:
        return cfg.attention_backend
    from fourdnex.model.attention import choose_backend

    backend, reason = choose_backend(device_of("auto"), fallback="native")
    logger.info("--attention_backend auto: %s (%s)", backend, reason)
    return None if backend == "native" else backend


def build_transformer(
    cfg: TrainConfig,
    model_path: str | None = None,
    transformer: nn.Module | None = None,
    plan: RecomputePlan | None = None,
) -> nn.Module:
    """The 4DNeX transformer ready for training: base frozen, LoRA + domain embedding trainable (``lora``), or
    every weight trainable but the domain embedding of a type without one (``full``).

    Loads ``model_path``'s transformer in the training dtype unless a built ``transformer`` is given (the bench).
    With ``cfg.gradient_checkpointing``, ``plan`` says what each block keeps instead of recomputing (None: diffusers'
    own gradient checkpointing; see :func:`fourdnex.train.memory_policy.choose_activation_memory`).
    """
    from peft import LoraConfig

    from fourdnex.model.loading import load_transformer

    dtype = dtype_of(cfg.mixed_precision)
    if transformer is None:
        transformer = load_transformer(model_path, dtype)
    transformer.set_model_type(MODEL_TYPES[cfg.model_type])
    transformer.set_modalities(cfg.modalities)
    transformer.requires_grad_(cfg.train_mode == "full")
    if cfg.train_mode == "lora":
        check_lora_targets(transformer, cfg.lora_targets)
        config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), init_lora_weights=True
        )
        transformer.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    transformer.domain_embedding.requires_grad_(MODEL_TYPES[cfg.model_type].domain_embedding)
    backend = attention_backend(cfg)
    if backend:
        try:
            transformer.set_attention_backend(backend)
        except (ValueError, RuntimeError) as err:
            raise TrainingError(f"attention backend {backend!r}: {err}") from err
    if cfg.gradient_checkpointing and plan is None:
        transformer.enable_gradient_checkpointing()  # torch.utils.checkpoint, non-reentrant
    elif cfg.gradient_checkpointing:
        from fourdnex.train.block_recompute import enable_block_recompute

        enable_block_recompute(transformer, plan)
    if cfg.compile_blocks:
        transformer.compile_repeated_blocks()
    transformer.train()
    return transformer


# --------------------------------------------------------------------------------------------------------------------
# The run.


def adapter_meta(cfg: TrainConfig, cache: LatentCache, model_path: str) -> AdapterMeta:
    """The metadata every adapter of this run carries."""
    from fourdnex.model.adapters import AdapterMeta

    return AdapterMeta(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        model_type=cfg.model_type,
        xyz_latent_mean=cache.stats.xyz_latent_mean,
        xyz_latent_std=cache.stats.xyz_latent_std,
        base_model=Path(model_path).name,  # the folder's name: no path of the machine that trained it
        extra={
            "height": cfg.height,
            "width": cfg.width,
            "num_frames": cfg.num_frames,
            "timestep_sampling": cfg.timestep_sampling,
            "center": cache.stats.center,
            "condition_tasks": cfg.condition_tasks,
        },
    )


def train(cfg: TrainConfig, plan: RecomputePlan | None = None) -> Path | None:
    """Fine-tune on ``cfg.cache_dir``; returns the final adapter file (or, fully trained, the transformer folder) on
    the main process, None on the others.

    ``plan`` replaces what ``cfg.activation_memory`` chooses for this machine (the tests park on a CPU with it).
    """
    run = Run(cfg, plan)
    run.loop(cfg.max_steps)
    return run.finish()


class Run:
    """A fine-tuning run, ready to step: the model in its engine, the cache (held on the device or read from its
    files), the sample stream, the logs. :meth:`loop` trains, :meth:`finish` writes the trained weights."""

    def __init__(self, cfg: TrainConfig, plan: RecomputePlan | None = None) -> None:
        from tqdm.auto import tqdm

        cfg.validate()
        cfg.validate_data()
        if cfg.attention_backend == FLASH_4_BACKEND:  # a kernel this machine lacks is refused before anything is read
            from fourdnex.model.attention import flash4_problem

            problem = flash4_problem(device_of("auto"))
            if problem is not None:
                raise TrainingError(f"--attention_backend {FLASH_4_BACKEND}: {problem}")
        self.cfg = cfg
        cache = None if cfg.synthetic_clips else LatentCache(
            cfg.cache_dir, cfg.num_latent_frames, cfg.height, cfg.width, cfg.modalities
        )  # fmt: skip
        self.model_path = model_path = cfg.model_path or (cache and cache.stats.model_path) or DEFAULT_MODEL_PATH
        check_model_folder(model_path, ("transformer",), how="pass --model_path, a Wan2.1-I2V diffusers folder")
        if cfg.validation_steps and not Path(cfg.validation_image).is_file():
            raise TrainingError(f"validation image {cfg.validation_image} does not exist")
        stage = zero_stage(deepspeed_config(cfg))  # refuse a bad DeepSpeed json before loading anything
        renderer = None
        if cfg.synthetic_clips:  # its worker processes fork here, before the model loads
            from fourdnex.train.rendered import ClipRenderer

            renderer = ClipRenderer(cfg)
        if plan is None:  # before loading the model, which takes host memory for a while
            plan = RecomputePlan.for_setting(choose_activation_memory(cfg, stage), park=torch.cuda.is_available())
        self.output_dir = Path(cfg.output_dir)
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir) if cfg.resume_from_checkpoint else None
        torch.manual_seed(cfg.seed)
        transformer = build_transformer(cfg, model_path, plan=plan)
        self.accelerator = accelerator = make_accelerator(cfg, self.output_dir / "logs")
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.encoder = None
        if (cache is not None and not cache.cached_condition) or cfg.condition_tasks != "image":
            from fourdnex.model.loading import load_vae

            logger.info("encoding conditions the cache does not hold with the VAE of %s, a batch at a time", model_path)
            self.encoder = VaeConditionEncoder(load_vae(model_path), self.device)
        frames = cfg.condition_tasks != "image"
        self.renderer = None  # while the synthetic clips are still being made
        if renderer is not None:
            cache, self.held = renderer.hold(model_path, self.device, self.encoder)
            self.renderer = None if renderer.done else renderer
        else:
            self.held = HeldCache.read(cache, self.device, frames, self.encoder) if cfg.cache_in_memory else None
        self.cache = cache
        self.trainer = trainer = Trainer(cfg, transformer, accelerator, adapter_meta(cfg, cache, model_path))
        if resume is not None:
            load_checkpoint(trainer, resume)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            held = f" held on {self.held.device} ({self.held.nbytes / 2**30:.2f} GiB)" if self.held else ""
            if self.renderer is not None:
                held += f", the first {renderer.first_clips} and {cfg.synthetic_clips_per_step:g} more a step"
            logger.info(
                "training %d trainable parameters on %d clips%s, %d processes, from step %d",
                sum(p.numel() for p in trainable_parameters(trainer.module).values()),
                len(cache),
                held,
                accelerator.num_processes,
                trainer.step,
            )
        accelerator.init_trackers("finetune", config=_tracker_config(cfg))
        self.stream = SampleStream(
            cfg, len(cache), accelerator.num_processes, renderer.first_clips if renderer is not None else None
        )
        t, h, w = cache.latent_shape
        self.noise_shape = (16, t, h, 2 * w if cfg.modalities == "rgbxyz" else w)  # one sample's x0
        self.bar = tqdm(
            total=cfg.max_steps, initial=trainer.step, desc="finetune", disable=not accelerator.is_main_process
        )
        self.logged = MetricsLog(
            accelerator, self.stream.global_batch, self.bar, temporal=cfg.xyz_temporal_loss_weight > 0
        )
        self.reader = ThreadPoolExecutor(max_workers=1)  # reads step n + 1's files while step n trains
        self.upcoming = None

    def _read(self, step: int) -> list:
        """The files of this process's samples of step ``step``, per micro-step (runs in the reader thread)."""
        draws = self.stream.draws(step)
        micro_steps = range(self.cfg.gradient_accumulation_steps)
        return [read_batch(self.cache, draws.rows(*self.stream.rows(m, self.rank))) for m in micro_steps]

    def micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of step ``step``, on the training device."""
        if self.renderer is not None and self.renderer.advance(self.stream.available(step)):
            self.renderer = None  # every clip is held
        samples = None
        if self.held is None:
            samples = (self.upcoming or self.reader.submit(self._read, step)).result()
            self.upcoming = self.reader.submit(self._read, step + 1) if step + 1 < self.cfg.max_steps else None
        draws = self.stream.draws(step)
        noise = self.stream.noise(step, self.noise_shape, self.device)  # (G, 16, T, h, w'): the global batch's
        batches = []
        for micro in range(self.cfg.gradient_accumulation_steps):
            first, stop = self.stream.rows(micro, self.rank)
            rows = draws.rows(first, stop)
            if self.held is not None:
                batches.append(self.held.batch(rows, noise[first:stop], self.encoder))
            else:
                batches.append(batch_of_samples(samples[micro], rows, noise[first:stop], self.encoder, self.device))
        return batches

    def loop(self, stop: int) -> None:
        """Train until optimizer step ``stop``: log, checkpoint and validate on the way."""
        cfg, trainer = self.cfg, self.trainer
        while trainer.step < stop:
            metrics = trainer.train_step(self.micro_batches(trainer.step))
            self.bar.update()
            step = trainer.step
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                self.logged.add(step, metrics)
            checkpoint = step % cfg.checkpointing_steps == 0 or step == cfg.max_steps
            if checkpoint or step % METRICS_READ_STEPS == 0:
                self.logged.write()
            if checkpoint:
                save_checkpoint(trainer, step)
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                run_validation(
                    trainer, self.model_path, self.cache, self.output_dir / "validation" / f"step-{step:06d}"
                )

    def finish(self) -> Path | None:
        """Write the trained weights (see :meth:`Trainer.save_weights`) and close the logs; every process must call."""
        self.bar.close()
        self.reader.shutdown()
        if self.renderer is not None:  # stopped before every synthetic clip was needed
            self.renderer.close()
        self.logged.write()
        final = self.trainer.save_weights(self.output_dir, self.trainer.step)
        # DeepSpeed's own teardown (ZeRO-3's parameter hooks and their coordinator) while the process group lives:
        # what it holds would otherwise be torn down with the interpreter, after the group
        self.trainer.engine.destroy()
        self.accelerator.end_training()
        return final


class MetricsLog:
    """The logged steps' numbers, kept on the device until :meth:`write` reads them all back (one wait for the queued
    work) and writes them to the trackers; the samples per second are those of the steps since the last write. With
    ``temporal`` (the loss weighs the XYZ error's change from frame to frame) that term's MSE is logged too."""

    def __init__(self, accelerator, global_batch: int, bar, temporal: bool) -> None:
        self.accelerator = accelerator
        self.global_batch = global_batch
        self.bar = bar
        self.temporal = temporal
        self.pending: list[tuple[int, StepMetrics]] = []
        self.since = (bar.n, time.perf_counter())  # (step, time) of the last write

    def add(self, step: int, metrics: StepMetrics) -> None:
        """Keep step ``step``'s numbers until the next write."""
        self.pending.append((step, metrics))

    def write(self) -> None:
        """Read the kept numbers back (averaged over the processes) and log them; every process must call."""
        if not self.pending:
            return
        values = self.accelerator.reduce(torch.stack([m.values for _, m in self.pending]), reduction="mean").tolist()
        now, (last_step, last_time) = time.perf_counter(), self.since
        step = self.pending[-1][0]
        rate = (step - last_step) * self.global_batch / max(now - last_time, 1e-9)
        for (step, metrics), (loss, rgb, xyz, xyz_t, grad_norm) in zip(self.pending, values, strict=True):
            logged = {"loss/total": loss, "loss/rgb": rgb, "loss/xyz": xyz}
            if self.temporal:  # the XYZ error's change from frame to frame, where the loss weighs it
                logged["loss/xyz_t"] = xyz_t
            logged |= {"lr": metrics.lr, "grad_norm": grad_norm, "samples_per_second": rate}
            self.accelerator.log(logged, step=step)
        self.bar.set_postfix(loss=f"{values[-1][0]:.4f}", lr=f"{self.pending[-1][1].lr:.2e}")
        self.pending = []
        self.since = (step, now)


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config as TensorBoard's hparams accept it (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(cfg).items()}


def run_validation(trainer: Trainer, model_path: str, cache: LatentCache, out_dir: Path) -> None:
    """Sample one result with the current weights into ``out_dir``, written as inference.py writes its results
    (:func:`fourdnex.geometry.results.write_sample`: ``00000.npz``/``.json`` and the RGB, XYZ and side-by-side videos).

    Every process runs the sampler (under ZeRO-3 each holds a part of the weights); the main process writes.
    """
    import PIL.Image

    from fourdnex.generate.pipeline import FourDNeXPipeline
    from fourdnex.geometry.results import write_sample
    from fourdnex.model.loading import load_components

    cfg = trainer.cfg
    if trainer.validation_components is None:
        components = load_components(model_path, trainer.dtype, transformer=False)
        trainer.validation_components = {k: v for k, v in components.items() if k != "transformer"}
    components = trainer.validation_components
    pipe = FourDNeXPipeline(transformer=trainer.module, **components)
    device = trainer.accelerator.device
    for name in ("text_encoder", "image_encoder", "vae"):
        getattr(pipe, name).to(device)
    image = PIL.Image.open(cfg.validation_image).convert("RGB")
    was_training = trainer.module.training
    trainer.module.eval()
    with torch.no_grad():
        output = pipe(
            image,
            cfg.validation_prompt,
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.validation_inference_steps,
            generator=torch.Generator(device="cpu").manual_seed(cfg.seed),
            modalities=cfg.modalities,
            xyz_mean=cache.stats.xyz_latent_mean,
            xyz_std=cache.stats.xyz_latent_std,
        )
    trainer.module.train(was_training)
    for name in ("text_encoder", "image_encoder", "vae"):
        getattr(pipe, name).to("cpu")
    if trainer.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"prompt": cfg.validation_prompt, "image": cfg.validation_image, "seed": cfg.seed, "step": trainer.step}
        meta["timings"] = output.timings
        write_sample(out_dir, 0, output.rgb[0].numpy(), output.xyz[0].numpy(), meta)
    trainer.accelerator.wait_for_everyone()
