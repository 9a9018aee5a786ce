"""The evaluation that evaluate.py runs.

1. Check every input before any work: the result files (shapes read from their headers), which clip each result
   shows and that the clip exists.
2. With ground truth: prepare each result's clip once (the slow part of a run), keep it in a temporary folder under
   the output folder (raw ``.npy`` files, memory-mapped when scored), and collect the mean depth map and focal length
   of the set.
3. Register the floors that are the same for every sample of a size (plane, mean depth), once per size.
4. For every result: read its registration (compute and save it beside the result when missing, as
   pm_registration.py does with its defaults); score the model and the floors of the sample. A result that cannot be
   registered is reported as not scored, with the reason.
5. Average over the scored samples; the caller writes the report.

Steps 2 and 4 run one sample per task on a pool of threads, one per CPU this process may use and at most one per
sample, with torch on one thread each (the work is numpy, scipy and torch calls on whole arrays, which release the
GIL). Results come back in sample order and are the same numbers as in one thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from fourdnex.config import RegistrationConfig
from fourdnex.evaluation.floors import FLOORS, MeanDepth, camera_matrix, first_frame_xyz, plane_xyz
from fourdnex.evaluation.scoring import Prediction, Reference, Score, register_frame, score
from fourdnex.evaluation.truth import EvaluationError, Truth, clip_of, clip_sources, load_truth, read_mapping
from fourdnex.geometry.registration import RegistrationError, register_result, single_thread
from fourdnex.geometry.results import (
    ResultError,
    find_results,
    load_registration,
    load_result,
    load_rgb,
    registration_path,
    result_shape,
    save_registration,
)

if TYPE_CHECKING:
    from fourdnex.data.sources import ClipSource

@dataclass
class Sample:
    """One result and what the evaluation found for it."""

    path: Path
    frames: int
    size: tuple[int, int]
    clip_id: str | None = None
    status: str = "scored"  # or "not scored: <reason>"
    registration: str = ""  # "read" or "computed"
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Score] = field(default_factory=dict)  # by predictor: "model" and the floors

    @property
    def name(self) -> str:
        """The result's number, ``NNNNN``."""
        return self.path.stem


@dataclass
class Evaluation:
    """Everything a report shows."""

    results: Path
    ground_truth: Path | None
    samples: list[Sample]
    predictors: list[str]  # "model" then the floors that apply
    truth_paths: dict[str, np.ndarray] = field(default_factory=dict)  # true camera centres by sample name

    @property
    def scored(self) -> list[Sample]:
        """The samples that were scored."""
        return [s for s in self.samples if s.status == "scored"]


def check_inputs(results: Path, gt: Path | None, mapping: Path | None) -> list[Sample]:
    """The samples of a results folder (or file), every input checked; EvaluationError names the first bad one."""
    samples = []
    for path in find_results(results):
        frames, height, width = result_shape(path)
        samples.append(Sample(path, frames, (height, width)))
    if mapping is not None and gt is None:
        raise EvaluationError("--mapping names clips of a ground truth: give --gt too")
    if gt is None:
        return samples
    clips = clip_sources(gt)
    names = read_mapping(mapping) if mapping is not None else {}
    for sample in samples:
        meta_path = sample.path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except ValueError as err:
            raise EvaluationError(f"{meta_path}: not a JSON file ({err})") from err
        sample.clip_id = clip_of(sample.path, meta, names, mapping, clips)
    return samples


def _registration(sample: Sample, config: RegistrationConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The result's RGB video and its registration: read (the registration without its points, which scoring does
    not need), or registered on the CPU and saved beside the result."""
    path = registration_path(sample.path)
    if not path.is_file():
        result = load_result(sample.path)
        reg, info = register_result(result.xyz, np.arange(sample.frames), config, torch.device("cpu"))
        frames = {"start": 0, "end": None, "gap": 1, "count": sample.frames}
        save_registration(path, reg, {"source": str(sample.path), "frames": frames, **info})
        sample.registration = "computed"
        return result.rgb, reg
    reg = load_registration(path, ("K", "cam2world", "depth", "residual", "frame_index"))
    if reg["depth"].shape != (sample.frames, *sample.size) or not np.array_equal(
        reg["frame_index"], np.arange(sample.frames)
    ):
        raise EvaluationError(
            f"{path}: registers frames {reg['frame_index'].tolist()} at {list(reg['depth'].shape[1:])}, not all "
            f"{sample.frames} frames of {sample.path.name} at {list(sample.size)}: delete it or run "
            "pm_registration.py without frame selection"
        )
    sample.registration = "read"
    return load_rgb(sample.path), reg


def evaluate(
    results: str | Path,
    out: str | Path,
    gt: str | Path | None = None,
    mapping: str | Path | None = None,
    config: RegistrationConfig | None = None,
    workers: int | None = None,
) -> Evaluation:
    """Score every result in ``results`` (with ground truth from the 4DNeX-10M tree ``gt`` when given) beside its
    floors; ``out`` holds the temporary ground-truth cache while this runs. ``workers`` threads share the samples
    (default: the CPUs this process may use, at most one per sample; 1: all in the calling thread)."""
    results, out = Path(results), Path(out)
    gt, mapping = (Path(gt) if gt is not None else None), (Path(mapping) if mapping is not None else None)
    config = config or RegistrationConfig()
    samples = check_inputs(results, gt, mapping)
    out.mkdir(parents=True, exist_ok=True)
    predictors = ["model", *(FLOORS if gt is not None else ["plane"])]
    evaluation = Evaluation(results, gt, samples, predictors)
    sizes = sorted({s.size for s in samples})
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, len(samples))
    with tempfile.TemporaryDirectory(dir=out, prefix=".truth-") as cache, _pool(workers) as pool:
        cache = Path(cache)
        mean = MeanDepth()
        if gt is not None:
            sources = clip_sources(gt)
            tasks = [(sample, sources[sample.clip_id]) for sample in samples]
            prepare = functools.partial(_prepare_truth, gt=gt, cache=cache)
            for sample, (depth, path, seconds) in zip(samples, _map(pool, prepare, tasks, "ground truth"), strict=True):
                mean.merge(depth)
                evaluation.truth_paths[sample.name] = path
                sample.seconds["truth"] = seconds
        held = {size: {"plane": register_frame(plane_xyz(*size), config)} for size in sizes}
        focals = {}
        if gt is not None:
            for size in sizes:
                held[size]["mean_depth"] = register_frame(mean.xyz(size), config)
                focals[size] = mean.focal(size)
        tasks = [(sample, held[sample.size], focals.get(sample.size)) for sample in samples]
        job = functools.partial(_score_cached, cache=cache if gt is not None else None, config=config)
        samples[:] = _map(pool, job, tasks, "scoring")
    return evaluation


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """``workers`` threads, torch on one thread meanwhile (None for fewer than 2: the work stays in the calling
    thread); on leaving, the tasks not yet started are dropped (an error ends the run without waiting for them)."""
    if workers < 2:
        yield None
        return
    pool, threads = ThreadPoolExecutor(workers), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def _map(pool: ThreadPoolExecutor | None, job: Callable, tasks: Iterable[tuple], desc: str) -> Iterator:
    """``job(*task)`` for every task, in order, on the pool or here, counted by a progress bar."""
    tasks = list(tasks)
    done = pool.map(job, *zip(*tasks, strict=True)) if pool is not None else (job(*task) for task in tasks)
    return tqdm(done, desc=desc, total=len(tasks), unit="sample", leave=False)


def _prepare_truth(sample: Sample, source: ClipSource, gt: Path, cache: Path) -> tuple[MeanDepth, np.ndarray, float]:
    """Prepare one sample's truth and save it in ``cache``; its share of the set's mean depth, its true camera centres
    and the seconds it took."""
    start = time.perf_counter()
    truth = load_truth(gt, source, sample.frames, *sample.size)
    truth.save(cache / sample.name)
    depth = MeanDepth()
    depth.add(truth)
    return depth, truth.cam2world[:, :3, 3], time.perf_counter() - start


def _score_cached(
    sample: Sample, held: dict[str, Prediction], focal: float | None, cache: Path | None, config: RegistrationConfig
) -> Sample:
    """Score one sample against its truth saved in ``cache`` (None: without ground truth); the sample, filled in."""
    truth = Truth.load(cache / sample.name) if cache is not None else None
    _score_sample(sample, truth, held, focal, config)
    return sample


def _score_sample(
    sample: Sample, truth: Truth | None, held: dict[str, Prediction], focal: float | None, config: RegistrationConfig
) -> None:
    """Register (or read the registration of) one result and score it and its floors into ``sample``; ``focal`` is
    the set's median focal length at its size (with ground truth)."""
    start = time.perf_counter()
    try:
        rgb, reg = _registration(sample, config)
    except (ResultError, RegistrationError, torch.linalg.LinAlgError) as err:  # the file's shape was checked
        stage = "registration failed: " if not isinstance(err, ResultError) else ""
        sample.status = f"not scored: {stage}{str(err).splitlines()[0]}"
        return
    sample.seconds["registration"] = time.perf_counter() - start
    if not all(np.isfinite(reg[k]).all() for k in ("K", "cam2world", "depth")):
        sample.status = "not scored: the registration holds NaN or infinite cameras or depths"
        return
    start = time.perf_counter()
    with single_thread(torch.device("cpu")):  # the metrics' torch calls are on small arrays
        reference = Reference(truth) if truth is not None else None
        memo: dict = {}  # what the floors' shared RGB video gives, computed once
        sample.scores["model"] = score(Prediction.from_registration(rgb, reg), reference, memo)
    sample.seconds["score"] = time.perf_counter() - start
    start = time.perf_counter()
    image = (truth.rgb if truth is not None else rgb)[:1]  # the input image, held by every floor
    floors = {name: dataclasses.replace(p, rgb=image).held(sample.frames) for name, p in held.items()}
    if truth is not None:
        first = dataclasses.replace(register_frame(first_frame_xyz(truth), config), rgb=image)
        K = camera_matrix(focal, *sample.size)
        floors["first_frame"] = first.held(sample.frames)
        floors["static_camera"] = Prediction(None, K[None], np.eye(4)[None]).held(sample.frames)
    with single_thread(torch.device("cpu")):
        for name, prediction in floors.items():
            sample.scores[name] = score(prediction, reference, memo)
    sample.seconds["floors"] = time.perf_counter() - start
