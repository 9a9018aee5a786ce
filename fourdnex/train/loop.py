"""The fine-tuning run ``finetune.py`` starts: the sample stream, the model, the loop, validation samples.

Randomness is a pure function of (seed, global sample position): which clip, its noise and its ``s`` depend only on
where a sample sits in the run's sample stream, so a resumed run, or the same global batch split over another
number of processes, sees exactly the same samples.

The other pieces: :mod:`fourdnex.train.config` (the settings), :mod:`fourdnex.train.loss` (the objective),
:mod:`fourdnex.train.engine` (the optimizer step under DeepSpeed), :mod:`fourdnex.train.checkpoints` (training
checkpoints), :mod:`fourdnex.train.memory_policy` and :mod:`fourdnex.train.activation_memory` (what gradient
checkpointing keeps).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fourdnex.config import DEFAULT_MODEL_PATH, FLASH_4_BACKEND, MODEL_TYPES
from fourdnex.data.cache import LatentCache, Sample, VaeConditionEncoder
from fourdnex.train.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from fourdnex.train.config import CONDITION_TASKS, TrainConfig, TrainingError
from fourdnex.train.engine import (
    LORA_ADAPTER_NAME,
    Trainer,
    deepspeed_config,
    make_accelerator,
    trainable_parameters,
    zero_stage,
)
from fourdnex.train.loss import Batch, sample_sigmas
from fourdnex.train.memory_policy import RecomputePlan, choose_activation_memory

if TYPE_CHECKING:  # the model and adapter modules import diffusers and peft: loaded when used
    from fourdnex.model.adapters import AdapterMeta

logger = logging.getLogger("fourdnex.train.loop")
#: Threads reading the samples of a batch (files and video frames) at once.
READ_THREADS = 8


# --------------------------------------------------------------------------------------------------------------------
# The sample stream: which clip, noise and noise level each global sample position gets.


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at global position ``position`` of a run seeded with ``seed``."""
    return torch.Generator().manual_seed((seed << 40) + position)


def clip_index(seed: int, position: int, num_clips: int) -> int:
    """Which clip the sample at ``position`` reads: a fresh permutation of the clips every epoch."""
    epoch, offset = divmod(position, num_clips)
    order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed + epoch))
    return int(order[offset])


def draw_given(tasks: dict[str, float], num_frames: int, generator: torch.Generator) -> torch.Tensor:
    """The given RGB pixel frames ``(F,)`` bool of one sample: a task drawn with the shares ``tasks`` (nothing is
    drawn when there is one task), then its frames: ``image`` frame 0; ``first_last`` frames 0 and F-1;
    ``keyframes`` frame 0 and 2-4 other random frames; ``video`` every frame."""
    names = list(tasks)
    task = names[0]
    if len(names) > 1:
        task = names[int(torch.multinomial(torch.tensor(list(tasks.values())), 1, generator=generator))]
    given = torch.zeros(num_frames, dtype=torch.bool)
    given[0] = True
    if task == "first_last":
        given[-1] = True
    elif task == "keyframes":
        count = min(int(torch.randint(2, 5, (), generator=generator)), num_frames - 1)
        given[1 + torch.randperm(num_frames - 1, generator=generator)[:count]] = True
    elif task == "video":
        given[:] = True
    return given


def make_batch(
    cache: LatentCache, cfg: TrainConfig, positions: list[int], encoder: VaeConditionEncoder | None = None
) -> Batch:
    """Read and noise the samples at the given global stream positions: a Batch of ``B = len(positions)``.

    Each sample's given frames come from :func:`draw_given` with ``cfg.condition_tasks``; conditions the cache does
    not hold are encoded by ``encoder``, all of the batch's in one call.
    """
    tasks = CONDITION_TASKS[cfg.condition_tasks]

    def read(position: int) -> tuple[torch.Tensor, Sample, torch.Tensor]:
        generator = sample_generator(cfg.seed, position)
        sigma = sample_sigmas(1, cfg.timestep_sampling, generator, cfg.shift)
        index = clip_index(cfg.seed, position, len(cache))
        sample = cache.sample(index, draw_given(tasks, cfg.num_frames, generator))
        return sigma, sample, torch.randn(sample.x0.shape, generator=generator)

    with ThreadPoolExecutor(min(READ_THREADS, len(positions))) as pool:  # file reads and decoding release the GIL
        sigmas, samples, noises = zip(*pool.map(read, positions), strict=True)
    pending = [s for s in samples if s.cond is None]
    if pending:
        if encoder is None:
            raise TrainingError("these samples' conditions are not in the cache and no VAE encodes them")
        encoded = encoder(torch.stack([s.cond_video for s in pending]))  # (P, 16, T, h, w')
        for sample, cond in zip(pending, encoded, strict=True):
            sample.cond = cond
    return Batch(
        x0=torch.stack([s.x0 for s in samples]),
        condition=torch.stack([torch.cat([s.mask, s.cond]) for s in samples]),
        prompt_embeds=torch.stack([s.prompt_embeds for s in samples]),
        image_embeds=torch.stack([s.image_embeds for s in samples]),
        noise=torch.stack(noises),
        sigmas=torch.cat(sigmas),
    )


def stream_positions(cfg: TrainConfig, step: int, micro: int, rank: int, world: int) -> list[int]:
    """Global positions of the samples that process ``rank`` uses in micro-step ``micro`` of optimizer step ``step``.

    A global batch of ``train_batch_size * world * gradient_accumulation_steps`` samples covers consecutive
    positions; one process with a larger batch and several with smaller ones cover the same positions.
    """
    per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    first = step * per_step + (micro * world + rank) * cfg.train_batch_size
    return list(range(first, first + cfg.train_batch_size))


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

    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    if transformer is None:
        transformer = load_transformer(model_path, dtype)
    transformer.set_model_type(MODEL_TYPES[cfg.model_type])
    transformer.set_layout(cfg.layout)
    transformer.requires_grad_(cfg.train_mode == "full")
    if cfg.train_mode == "lora":
        check_lora_targets(transformer, cfg.lora_targets)
        config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), init_lora_weights=True
        )
        transformer.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    transformer.domain_embedding.requires_grad_(MODEL_TYPES[cfg.model_type].domain_embedding)
    if cfg.attention_backend:
        try:
            transformer.set_attention_backend(cfg.attention_backend)
        except (ValueError, RuntimeError) as err:
            raise TrainingError(f"attention backend {cfg.attention_backend!r}: {err}") from err
    if cfg.gradient_checkpointing and plan is None:
        transformer.enable_gradient_checkpointing()  # torch.utils.checkpoint, non-reentrant
    elif cfg.gradient_checkpointing:
        from fourdnex.train.activation_memory import enable_block_recompute

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
        base_model=model_path,
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
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.attention_backend == FLASH_4_BACKEND:  # a kernel this machine lacks is refused before anything is read
        from fourdnex.model.attention import flash4_problem

        problem = flash4_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if problem is not None:
            raise TrainingError(f"--attention_backend {FLASH_4_BACKEND}: {problem}")
    cache = LatentCache(cfg.cache_dir, cfg.num_latent_frames, cfg.height, cfg.width, cfg.layout, cfg.cache_in_memory)
    model_path = cfg.model_path or cache.stats.model_path or DEFAULT_MODEL_PATH
    if not (Path(model_path) / "transformer" / "config.json").is_file():
        raise TrainingError(f"model folder {model_path} has no transformer/config.json (pass --model_path)")
    if cfg.validation_steps and not Path(cfg.validation_image).is_file():
        raise TrainingError(f"validation image {cfg.validation_image} does not exist")
    stage = zero_stage(deepspeed_config(cfg))  # refuse a bad DeepSpeed json before loading anything
    if plan is None:  # before loading the model, which takes host memory for a while
        plan = RecomputePlan.for_setting(choose_activation_memory(cfg, stage), park=torch.cuda.is_available())
    output_dir = Path(cfg.output_dir)
    resume = None
    if cfg.resume_from_checkpoint:
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
    torch.manual_seed(cfg.seed)
    transformer = build_transformer(cfg, model_path, plan=plan)
    accelerator = make_accelerator(cfg, output_dir / "logs")
    encoder = None
    if not cache.cached_condition or cfg.condition_tasks != "image":
        from fourdnex.model.loading import load_vae

        logger.info("encoding conditions the cache does not hold with the VAE of %s, a batch at a time", model_path)
        encoder = VaeConditionEncoder(load_vae(model_path), accelerator.device)
    trainer = Trainer(cfg, transformer, accelerator, adapter_meta(cfg, cache, model_path))
    if resume is not None:
        load_checkpoint(trainer, resume)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "training %d trainable parameters on %d clips, %d processes, from step %d",
            sum(p.numel() for p in trainable_parameters(trainer.module).values()),
            len(cache),
            accelerator.num_processes,
            trainer.step,
        )
    accelerator.init_trackers("finetune", config=_tracker_config(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc="finetune", disable=not accelerator.is_main_process)

    def read(step: int) -> list[Batch]:
        return [
            make_batch(cache, cfg, stream_positions(cfg, step, micro, rank, world), encoder)
            for micro in range(cfg.gradient_accumulation_steps)
        ]

    reader = ThreadPoolExecutor(max_workers=1)  # reads step n + 1 while step n trains
    upcoming = reader.submit(read, trainer.step)
    while trainer.step < cfg.max_steps:
        micro_batches = upcoming.result()
        if trainer.step + 1 < cfg.max_steps:
            upcoming = reader.submit(read, trainer.step + 1)
        metrics = trainer.train_step(micro_batches)
        bar.update()
        bar.set_postfix(loss=f"{metrics.loss:.4f}", lr=f"{metrics.lr:.2e}")
        if trainer.step % cfg.logging_steps == 0 or trainer.step == cfg.max_steps:
            accelerator.log(
                {
                    "loss/total": metrics.loss,
                    "loss/rgb": metrics.loss_rgb,
                    "loss/xyz": metrics.loss_xyz,
                    "lr": metrics.lr,
                    "grad_norm": metrics.grad_norm,
                    "samples_per_second": global_batch / metrics.seconds,
                },
                step=trainer.step,
            )
        if trainer.step % cfg.checkpointing_steps == 0 or trainer.step == cfg.max_steps:
            save_checkpoint(trainer, trainer.step)
        if cfg.validation_steps and trainer.step % cfg.validation_steps == 0:
            run_validation(trainer, model_path, cache, output_dir / "validation" / f"step-{trainer.step:06d}")
    bar.close()
    reader.shutdown()
    final = trainer.save_weights(output_dir, trainer.step)
    accelerator.end_training()
    return final


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
            layout=cfg.layout,
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
