"""The run ``inference.py`` makes: check every input, load the model once, sample the lines (one at a time, or
``batch_size`` consecutive lines of one size and given frames at a time), write each line's result files.

Every input is checked before any weight loads (prompt and image lists, sizes, the adapter against the model type,
the output folder), so a bad input costs seconds and writes nothing. Processes:

* one process samples every selected line;
* under torchrun without ``--cp``, the lines are shared out: process ``r`` of ``N`` takes lines ``r, r + N, ...`` on
  GPU ``LOCAL_RANK`` (and batches them within its share), each seeded exactly as a single process seeds it, so every
  line starts from the same noise however many processes run;
* under torchrun with ``--cp``, every process runs every line and the transformer's sequence is split among them
  (:mod:`fourdnex.generate.parallel`); the first process writes the results.

With ``skip_existing`` a line whose result is complete (its ``.json``, written last, exists) is not sampled again,
so an interrupted list resumes where it stopped.

Every line of a batch starts from the noise it gets alone (one generator per line, seeded with ``--seed``), so its
result is its result at batch 1 up to the rounding of batched arithmetic (README.md, "Speed and memory").
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from fourdnex import __version__
from fourdnex.config import FLASH_4_BACKEND, MODEL_TYPES, XYZ_LATENT_MEAN, XYZ_LATENT_STD
from fourdnex.errors import UsageError
from fourdnex.generate.config import (
    DEFAULT_AREA,
    SAMPLE_MODALITIES,
    AccelerationConfig,
    RunConfig,
    SampleConfig,
    settled_size,
    size_for_aspect,
)


@dataclass(frozen=True)
class Job:
    """One line to generate: its index in the lists, its caption, its condition (images, or a video) with the frames
    they are, and the per-modality sample size."""

    index: int
    prompt: str
    images: tuple[Path, ...]  # one per given frame; empty for a video
    video: Path | None
    given_frames: tuple[int, ...]
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        """What the lines of one batch share: the per-modality height and width, and the given frames."""
        return self.height, self.width, self.given_frames

    def condition(self) -> list:
        """The given frames as PIL images, in frame order."""
        if self.video is None:
            return [load_image(path) for path in self.images]
        return [PIL.Image.fromarray(frame) for frame in read_frames(self.video, self.given_frames)]


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """The jobs in order, in batches of at most ``batch_size`` consecutive jobs of one :attr:`Job.shape`: a job of
    another size or other given frames than the one before it starts a new batch."""
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].shape == job.shape:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def read_lines_or_literal(value: str, what: str) -> tuple[list[str], Path | None]:
    """A ``.txt`` file's non-empty lines, or the value itself; returns the list and the file it came from."""
    path = Path(value)
    if path.suffix != ".txt":
        return [value], None
    if not path.is_file():
        raise UsageError(f"{what} list {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{what} list {path} is empty")
    return lines, path


def resolve_image(name: str, list_file: Path | None, what: str = "image") -> Path:
    """An image or video path as written, or relative to the list file that names it."""
    path = Path(name.strip()).expanduser()
    if not path.is_file() and list_file is not None and (list_file.parent / path).is_file():
        path = list_file.parent / path
    if not path.is_file():
        raise UsageError(f"{what} {name} does not exist")
    return path


def load_image(path: Path):
    """Open an image as RGB (a PIL image), or raise UsageError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"image {path} cannot be read ({err})") from err


def read_frames(path: Path, indices: tuple[int, ...]):
    """Frames ``indices`` of a video, ``(N, H, W, 3)`` uint8, or UsageError naming the video and what it lacks."""
    import av

    from fourdnex.files import read_video

    try:
        return read_video(path, list(indices))
    except av.FFmpegError as err:
        raise UsageError(f"video {path} cannot be read ({err})") from err
    except ValueError as err:  # the video ends before a wanted frame
        raise UsageError(f"{err}: the condition needs frames {list(indices)}") from err


def check_frames(frames: tuple[int, ...], num_frames: int) -> None:
    """Raise UsageError unless ``frames`` are distinct frame numbers in increasing order below ``num_frames``."""
    if not frames:
        raise UsageError("--frames lists no frame")
    if list(frames) != sorted(frames):
        raise UsageError(f"--frames must be in increasing order, got {','.join(map(str, frames))}")
    if len(set(frames)) != len(frames):
        raise UsageError(f"--frames lists a frame twice: {','.join(map(str, frames))}")
    if frames[0] < 0 or frames[-1] >= num_frames:
        raise UsageError(f"--frames must lie in 0..{num_frames - 1} (--num_frames {num_frames}), got {frames[-1]}")


def select_jobs(config: RunConfig, area: int = DEFAULT_AREA) -> list[Job]:
    """Every line to generate, each condition opened once to check it and size the sample (``config.sample``'s
    height and width, else the condition's aspect ratio at ``area`` pixels; its frame count settled:
    :func:`fourdnex.generate.config.settled_size`)."""
    num_frames = config.sample.num_frames
    if (config.image is None) == (config.video is None):
        raise UsageError("give --image (images) or --video (a video), one of them")
    if config.frames is not None:
        check_frames(config.frames, num_frames)
    prompts, _ = read_lines_or_literal(config.prompt, "prompt")
    what = "image" if config.video is None else "video"
    sources, source_list = read_lines_or_literal(config.image or config.video, what)
    if len(prompts) != len(sources):
        raise UsageError(f"{len(prompts)} prompts but {len(sources)} {what}s: give one {what} per prompt line")
    if config.idx >= len(prompts):
        raise UsageError(f"--idx {config.idx} is out of range: there are {len(prompts)} lines")
    jobs = []
    for i in range(len(prompts)) if config.idx < 0 else [config.idx]:
        if config.video is None:
            names = sources[i].split(",")
            frames = config.frames or (0,)
            if len(names) != len(frames):
                raise UsageError(
                    f"line {i} names {len(names)} images for the {len(frames)} frames {list(frames)}: give one image "
                    "per frame of --frames, separated by commas"
                )
            images, video = tuple(resolve_image(name, source_list) for name in names), None
            opened = [load_image(path) for path in images]  # every one readable, before any weight loads
            first = opened[0]
        else:
            video = resolve_image(sources[i], source_list, "video")
            frames = config.frames or tuple(range(num_frames))
            images, first = (), PIL.Image.fromarray(read_frames(video, frames)[0])
        if config.sample.height:
            height, width = config.sample.height, config.sample.width
        else:
            height, width = size_for_aspect(first.height, first.width, area)
            if min(height, width) < 16:
                raise UsageError(
                    f"line {i}: a {first.width} x {first.height} {what} is too narrow to size at {area} pixels: give "
                    "--height and --width"
                )
        jobs.append(Job(i, prompts[i], images, video, tuple(frames), height, width))
    return jobs


def prepare_out(out: Path) -> None:
    """Create the output folder and prove it is writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out} ({err.strerror or err})") from err


def check_config(config: RunConfig) -> None:
    """Raise UsageError naming the first setting that cannot run, before anything is loaded."""
    sample = config.sample
    if (sample.height is None) != (sample.width is None):
        raise UsageError("give both --height and --width, or neither (then the image's aspect ratio decides)")
    sample.validate()
    config.speed.validate()
    if config.lora_rank is not None and config.lora_rank < 1:
        raise UsageError(f"--lora_rank must be positive, got {config.lora_rank}")
    if config.model_type is not None and config.model_type not in MODEL_TYPES:
        raise UsageError(f"--type must be one of {sorted(MODEL_TYPES)}, got {config.model_type!r}")
    if config.modalities not in SAMPLE_MODALITIES:
        raise UsageError(f"--modalities must be one of {', '.join(SAMPLE_MODALITIES)}, got {config.modalities!r}")
    if config.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {config.batch_size}")


def resolve_device_dtype(device: str, dtype: str):
    """``--device`` and ``--dtype`` (``auto``: CUDA when there is one, bfloat16 there, float32 on a CPU) as torch
    objects."""
    from fourdnex.runtime import device_of, dtype_of

    resolved = device_of(device)
    return resolved, dtype_of(dtype, resolved)


def with_own_transformer(config: RunConfig) -> RunConfig:
    """``config``, sampling the model folder's own transformer as what it was trained as where it is a fully
    fine-tuned one (its weights carry what finetune.py trained it as: a whole 4DNeX model in one folder, such as
    ``example/demo/model``) and no adapter or other transformer is given: ``sft_path`` set to it."""
    from fourdnex.model.adapters import read_transformer_meta
    from fourdnex.model.loading import is_model_folder, transformer_folder

    if config.lora_path or config.sft_path is not None or not is_model_folder(config.model_path):
        return config
    own = transformer_folder(config.model_path)
    return dataclasses.replace(config, sft_path=str(own)) if read_transformer_meta(own) is not None else config


def trained_size(meta) -> tuple[int, int, int] | None:
    """The (frames, height, width) that weights with metadata ``meta`` (:func:`fourdnex.model.adapters.trained_meta`)
    were trained at, where it records them (finetune.py writes them); None for weights that say nothing of it."""
    size = tuple(meta.extra.get(name) for name in ("num_frames", "height", "width")) if meta is not None else ()
    return size if len(size) == 3 and all(isinstance(value, int) for value in size) else None


def transformer_heads(config: RunConfig) -> int:
    """Attention heads of the transformer that will be loaded, read from its config."""
    from fourdnex.model.loading import read_config, transformer_folder

    folder = transformer_folder(config.model_path, config.sft_path)
    heads = read_config(folder).get("num_attention_heads")
    if not isinstance(heads, int):
        raise UsageError(f"the transformer config in {folder} gives no attention head count (num_attention_heads)")
    return heads


def versions(attention_backend: str = "native") -> dict[str, str]:
    """The versions of the libraries a result depends on (FlashAttention-4's where it is the attention backend)."""
    import diffusers
    import peft
    import torch
    import transformers

    from fourdnex.model.attention import flash4_version

    found = {
        "fourdnex": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if attention_backend == FLASH_4_BACKEND:
        found["flash-attn-4"] = flash4_version()
    return found


def result_done(out: Path, index: int) -> bool:
    """Whether line ``index`` has a complete result in ``out`` (the ``.json`` is written last)."""
    return (out / f"{index:05d}.json").is_file() and (out / f"{index:05d}.npz").is_file()


@dataclass
class LoadedModel:
    """A pipeline loaded once and set up on its device (:func:`load_model`), ready to sample jobs one at a time
    (:func:`sample_job`) or in batches (:func:`sample_batch`): what inference.py loads before its first line and what
    app.py serves."""

    pipe: object  # a fourdnex.generate.pipeline.FourDNeXPipeline
    adapter: object | None  # a fourdnex.model.adapters.Adapter
    model_type: str
    modalities: str  # what the latent holds: config.modalities
    lora_scale: float | None
    xyz_mean: float
    xyz_std: float
    device: object  # torch.device
    dtype: object  # torch.dtype
    speed: AccelerationConfig  # resolved for the device
    load_seconds: float
    random_weights: bool  # the tiny test model's marker: its outputs are noise
    # The given frames the weights (an adapter, or a fully fine-tuned transformer) were trained for: "image" (frame
    # 0), or "any" (first and last frames, keyframes, a whole video; fourdnex.train.config.CONDITION_TASKS). A
    # released adapter records none.
    condition_tasks: str = "image"


def load_model(
    config: RunConfig,
    tokens: int,
    pixels: int,
    device=None,
    dtype=None,
    adapter=None,
    model_type: str | None = None,
    world_size: int = 1,
    batch: int = 1,
) -> LoadedModel:
    """Load ``config``'s model, adapter and acceleration once, on ``device`` (default: ``config.device``).

    ``tokens`` and ``pixels`` are the largest job's transformer sequence and video size, ``batch`` the most jobs
    sampled together: ``--memory auto`` picks the fastest offload that fits them. ``adapter`` and ``model_type`` are
    read from ``config`` unless given (already read and checked); ``world_size > 1`` splits the transformer's
    sequence over a context-parallel group. A model folder whose own transformer was fully fine-tuned samples as it
    (:func:`with_own_transformer`).
    """
    from fourdnex.generate import parallel
    from fourdnex.generate.acceleration import apply_acceleration, check_machine, resolve
    from fourdnex.generate.pipeline import load_pipeline
    from fourdnex.model.adapters import apply_adapter, load_adapter, resolve_model_type, trained_meta
    from fourdnex.model.loading import has_random_weights

    config = with_own_transformer(config)
    if device is None or dtype is None:
        device, dtype = resolve_device_dtype(config.device, config.dtype)
    speed = config.speed
    check_machine(speed, device)
    if adapter is None and config.lora_path:
        adapter = load_adapter(config.lora_path)
    if model_type is None:
        model_type = resolve_model_type(adapter, config.model_type, config.zero_domain_embedding, config.sft_path)
    tic = time.perf_counter()
    pipe = load_pipeline(config.model_path, dtype=dtype, transformer_path=config.sft_path)
    pipe.transformer.set_model_type(MODEL_TYPES[model_type])
    lora_scale, xyz_mean, xyz_std = None, XYZ_LATENT_MEAN, XYZ_LATENT_STD
    if adapter is not None:
        lora_scale = apply_adapter(pipe.transformer, adapter, scale=config.lora_scale, lora_rank=config.lora_rank)
    meta = trained_meta(adapter, config.sft_path)  # the XYZ statistics of the data the weights were trained on
    if meta is not None and meta.xyz_latent_mean is not None:
        xyz_mean, xyz_std = meta.xyz_latent_mean, meta.xyz_latent_std
    if speed.cp != "none":
        parallel.enable_context_parallel(pipe.transformer, speed.cp, world_size)
        pipe.enable_split_decoding()
    speed = resolve(speed, device, pipe, tokens=tokens, pixels=pixels, batch=batch)
    apply_acceleration(pipe, speed, device)
    load_seconds = time.perf_counter() - tic
    random_weights = has_random_weights(config.model_path)
    condition_tasks = meta.extra.get("condition_tasks", "image") if meta is not None else "image"
    return LoadedModel(
        pipe, adapter, model_type, config.modalities, lora_scale, xyz_mean, xyz_std, device, dtype, speed,
        load_seconds, random_weights, condition_tasks,
    )  # fmt: skip


def sample_job(model: LoadedModel, job: Job, sample: SampleConfig, callback_on_step_end=None):
    """Sample one job with ``model`` (a :class:`~fourdnex.generate.pipeline.FourDNeXOutput`); running out of GPU
    memory is a UsageError naming what to change. ``callback_on_step_end(pipe, step, timestep, kwargs)`` is called
    after every denoising step (diffusers' convention; see the pipeline)."""
    return sample_batch(model, [job], sample, callback_on_step_end)


def sample_batch(
    model: LoadedModel,
    jobs: list[Job],
    sample: SampleConfig,
    callback_on_step_end=None,
    rows_per_call: int | None = None,
):
    """Sample jobs of one :attr:`Job.shape` (a :class:`~fourdnex.generate.pipeline.FourDNeXOutput` with one row per
    job, in order), each from the noise its own generator seeded with ``sample.seed`` draws, as at batch 1; running
    out of GPU memory is a UsageError naming what to change.

    With ``sample.ensemble`` K above 1 every job is sampled K times, member ``m`` from seed ``sample.seed + m``: the
    XYZ video is the mean of the K members' (pixel by pixel, in the shared normalized space of the first camera), the
    RGB video and the latents are the first member's (the result of K = 1). The ``len(jobs) * K`` samples go through
    the pipeline ``rows_per_call`` at a time (default and least: ``len(jobs)``, so the first call holds every job's
    first member); the timings are the sum of the calls'."""
    import torch

    first = jobs[0]
    if any(job.shape != first.shape for job in jobs):
        raise ValueError(f"one batch needs one size and one set of given frames, got {[job.shape for job in jobs]}")
    size = rows_per_call or len(jobs)
    if size < len(jobs):
        raise ValueError(f"{size} samples per call cannot hold the batch's {len(jobs)} jobs")
    rows = [(index, member) for member in range(sample.ensemble) for index in range(len(jobs))]
    calls = [rows[start : start + size] for start in range(0, len(rows), size)]
    result, xyz_sum, timings = None, None, {}
    for call in calls:
        seeds = [sample.seed + member for _, member in call]
        out = _sample_once(model, [jobs[index] for index, _ in call], seeds, sample, callback_on_step_end)
        result = out if result is None else result
        for stage, seconds in out.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if out.xyz is not None and sample.ensemble > 1:
            xyz_sum = torch.zeros((len(jobs), *out.xyz.shape[1:]), dtype=torch.float64) if xyz_sum is None else xyz_sum
            xyz_sum.index_add_(0, torch.tensor([index for index, _ in call]), out.xyz.double())
    if sample.ensemble == 1:  # one call, whose rows are the jobs'
        return result
    count = len(jobs)  # the first call's first rows: every job's first member
    rgb = None if result.rgb is None else result.rgb[:count]
    xyz = None if xyz_sum is None else (xyz_sum / sample.ensemble).to(result.xyz.dtype)
    return dataclasses.replace(result, rgb=rgb, xyz=xyz, latents=result.latents[:count], timings=timings)


def _sample_once(model: LoadedModel, jobs: list[Job], seeds: list[int], sample: SampleConfig, callback_on_step_end):
    """One pipeline call for ``jobs``, job ``i``'s generator seeded with ``seeds[i]``."""
    import torch

    first = jobs[0]
    try:
        return model.pipe(
            [job.condition() for job in jobs],
            [job.prompt for job in jobs],
            negative_prompt=sample.negative_prompt,
            height=first.height,
            width=first.width,
            num_frames=sample.num_frames,
            num_inference_steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
            modalities=model.modalities,
            xyz_mean=model.xyz_mean,
            xyz_std=model.xyz_std,
            given_frames=first.given_frames,
            callback_on_step_end=callback_on_step_end,
        )
    except torch.OutOfMemoryError as err:
        smaller_batch = "a smaller --batch_size, " if len(jobs) > 1 else ""
        raise UsageError(
            f"out of GPU memory: try {smaller_batch}--dtype bfloat16, --memory model or group (or sequential), --fp8, "
            "fewer --num_frames, a smaller --height/--width, or run on a GPU with more memory"
        ) from err


def job_meta(
    model: LoadedModel,
    config: RunConfig,
    job: Job,
    sample: SampleConfig,
    timings: dict,
    processes: int = 1,
    batch_size: int = 1,
) -> dict:
    """The ``.json`` record of one sampled job (README.md, "Output files"): ``timings`` are the job's seconds per
    stage (its share of its batch's), ``batch_size`` the jobs sampled together with it, itself included."""
    adapter = model.adapter
    return {
        "prompt": job.prompt,
        "image": ",".join(map(str, job.images)) or None,
        "video": str(job.video) if job.video else None,
        "given_frames": list(job.given_frames),
        "index": job.index,
        **dataclasses.asdict(sample),
        "height": job.height,
        "width": job.width,
        "modalities": config.modalities,
        "type": model.model_type,
        "model_path": str(config.model_path),
        "sft_path": config.sft_path,
        "random_weights": model.random_weights,
        "lora_path": config.lora_path,
        "adapter_format": adapter.format if adapter else None,
        "lora_scale": model.lora_scale,
        "center": adapter.meta.extra.get("center") if adapter else None,
        "xyz_latent_mean": model.xyz_mean,
        "xyz_latent_std": model.xyz_std,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "acceleration": dataclasses.asdict(model.speed),
        "processes": processes,
        "batch_size": batch_size,
        "versions": versions(model.speed.attention_backend),
        "timings": {"load": model.load_seconds, **timings},
    }


def generate(config: RunConfig) -> list[Path]:
    """Run inference as :class:`RunConfig` says; returns the result files this process wrote."""
    from tqdm.auto import tqdm

    from fourdnex.generate import parallel
    from fourdnex.generate.acceleration import check_machine
    from fourdnex.geometry.results import write_sample
    from fourdnex.model.adapters import load_adapter, resolve_model_type, trained_meta

    check_config(config)
    config = with_own_transformer(config)
    adapter = load_adapter(config.lora_path) if config.lora_path else None
    trained = trained_size(trained_meta(adapter, config.sft_path))
    given = config.sample.num_frames is not None or config.sample.height is not None  # a size asked for by name
    sample, area = settled_size(config.sample, trained)
    config = dataclasses.replace(config, sample=sample)
    speed = config.speed
    jobs = select_jobs(config, area)
    out = Path(config.out)
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    check_machine(speed, device)
    model_type = resolve_model_type(adapter, config.model_type, config.zero_domain_embedding, config.sft_path)
    fused = config.modalities == "rgbxyz"
    tokens = [parallel.tokens_of(sample.num_frames, job.height, job.width, fused=fused) for job in jobs]

    # Processes: context parallel (every process, every line), lines shared out, or one process.
    launch = parallel.launch_of_this_process()
    world_size, writes = 1, True
    if speed.cp != "none":
        process = parallel.init_processes(speed.cp, device.type)
        device, world_size, writes = process.device, process.world_size, process.is_main
        heads = transformer_heads(config)
        for count in tokens:
            parallel.check_split(speed.cp, world_size, count, heads)
    elif launch.world_size > 1:
        jobs = jobs[launch.rank :: launch.world_size]
        device = parallel.device_of_local_rank(device, launch.local_rank)
    if config.skip_existing:
        jobs = [job for job in jobs if not result_done(out, job.index)]
    if writes:
        prepare_out(out)
    if not jobs:
        return []

    # --batch_size counts samples: a line of an ensemble of K is K of them (a batch of N holds N // K lines, or one
    # line whose members go through the pipeline N at a time).
    groups = batches(jobs, max(1, config.batch_size // sample.ensemble))
    largest = max(jobs, key=lambda job: job.height * job.width)
    pixels = sample.num_frames * largest.height * largest.width
    batch = min(config.batch_size, max(len(group) for group in groups) * sample.ensemble)
    model = load_model(config, max(tokens), pixels, device, dtype, adapter, model_type, world_size, batch)
    model.pipe.set_progress_bar_config(disable=not writes)
    if model.random_weights and writes:
        print(f"note: {config.model_path} is the tiny test model with random weights: its outputs are noise")
    if adapter is None and config.sft_path is None and writes:
        print("note: no --lora_path given: sampling the base Wan2.1 model, which was not trained for pointmaps")
    if model.condition_tasks != "any" and any(job.given_frames != (0,) for job in jobs) and writes:
        print(
            "note: these weights were trained given frame 0 only: given other frames too, expect worse results than "
            "from the image (weights trained with finetune.py --condition_tasks any read them; the demo model's: "
            "--lora_path example/demo/any-frame)"
        )
    # a size the weights never saw costs them their geometry (BENCHMARKS.md, "The demo model at twice its size")
    other = sorted({(sample.num_frames, job.height, job.width) for job in jobs} - {trained})
    if trained is not None and given and other and writes:
        f, h, w = other[0]
        print(
            f"note: these weights were trained at {trained[0]} frames of {trained[1]} x {trained[2]}; at {f} frames "
            f"of {h} x {w} expect far worse geometry (without --num_frames, --height and --width they sample their "
            "own size)"
        )

    written = []
    with tqdm(total=len(jobs), desc="samples", unit="sample", disable=len(jobs) == 1 or not writes) as progress:
        for group in groups:
            result = sample_batch(model, group, sample, rows_per_call=config.batch_size)
            progress.update(len(group))
            if not writes:
                continue
            share = {stage: seconds / len(group) for stage, seconds in result.timings.items()}  # per line
            for row, job in enumerate(group):
                meta = job_meta(model, config, job, sample, share, world_size, len(group))
                written.append(write_sample(out, job.index, result.rgb[row].numpy(), result.xyz[row].numpy(), meta))
                print(f"wrote {out / f'{job.index:05d}'}.{{mp4,npz,json}} ({sum(share.values()):.1f} s)")
    return written
