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

Steps 2 and 4 run on a pool of threads, one per CPU this process may use and at most one per task, with torch on
one thread each (the work is numpy, scipy and torch calls on whole arrays, which release the GIL): one task per
sample prepares its truth; with ground truth the model and the floors of a sample are two scoring tasks (they share
the truth, reduced once), so that a few samples keep every thread busy too. Results come back in sample order and are
the same numbers as in one thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
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
    floors; ``out`` holds the temporary ground-truth cache while this runs. ``workers`` threads share the work
    (default: the CPUs this process may use, at most one per scoring task; 1: all in the calling thread)."""
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
        workers = min(cpus, len(samples) * (2 if gt is not None else 1))  # scoring tasks
    with tempfile.TemporaryDirectory(dir=out, prefix=".truth-") as cache, _pool(workers) as pool:
        cache = Path(cache)
        mean = MeanDepth()
        if gt is not None:
            sources = clip_sources(gt)
            tasks = [(_prepare_truth, sample, sources[sample.clip_id], gt, cache) for sample in samples]
            for sample, (depth, path, seconds) in zip(samples, _map(pool, tasks, "ground truth"), strict=True):
                mean.merge(depth)
                evaluation.truth_paths[sample.name] = path
                sample.seconds["truth"] = seconds
        held = {size: {"plane": register_frame(plane_xyz(*size), config)} for size in sizes}
        focals = {}
        if gt is not None:
            for size in sizes:
                held[size]["mean_depth"] = register_frame(mean.xyz(size), config)
                focals[size] = mean.focal(size)
        references = {s.name: _SharedReference(cache / s.name if gt is not None else None) for s in samples}
        per_sample, tasks = (2 if gt is not None else 1), []
        for sample in samples:  # with ground truth the model and the floors are two tasks: few samples keep every
            # thread busy too
            floors = (sample, references[sample.name], held[sample.size], focals.get(sample.size), config)
            tasks.append((_score_model, sample, references[sample.name], config, None if gt is not None else floors))
            tasks += [(_score_floors, *floors)] if gt is not None else []
        parts = _map(pool, tasks, "scoring", per_sample)
        for sample in samples:
            found = [next(parts) for _ in range(per_sample)]
            sample.status, sample.registration = found[0].status or sample.status, found[0].registration
            for part in found if found[0].status is None else found[:1]:  # no floors beside an unscored model
                sample.scores |= part.scores
                sample.seconds |= part.seconds
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


def _map(pool: ThreadPoolExecutor | None, tasks: Iterable[tuple], desc: str, per_sample: int = 1) -> Iterator:
    """``task[0](*task[1:])`` for every task, in order, on the pool or here, counted by a progress bar over the
    samples (``per_sample`` consecutive tasks each)."""
    tasks = list(tasks)
    done = pool.map(_call, tasks) if pool is not None else map(_call, tasks)
    with tqdm(desc=desc, total=len(tasks) // per_sample, unit="sample", leave=False) as bar:
        for i, result in enumerate(done, 1):
            bar.update(i % per_sample == 0)
            yield result


def _call(task: tuple):
    """``task[0](*task[1:])``."""
    return task[0](*task[1:])


def _prepare_truth(sample: Sample, source: ClipSource, gt: Path, cache: Path) -> tuple[MeanDepth, np.ndarray, float]:
    """Prepare one sample's truth and save it in ``cache``; its share of the set's mean depth, its true camera centres
    and the seconds it took."""
    start = time.perf_counter()
    truth = load_truth(gt, source, sample.frames, *sample.size)
    truth.save(cache / sample.name)
    depth = MeanDepth()
    depth.add(truth)
    return depth, truth.cam2world[:, :3, 3], time.perf_counter() - start


@dataclass
class _Part:
    """What one scoring task found for a sample, merged into it in sample order."""

    scores: dict[str, Score] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    status: str | None = None  # "not scored: <reason>"
    registration: str = ""


class _SharedReference:
    """One sample's truth reduced for scoring (:class:`Reference`), built from its saved truth (``folder``) by the
    first of its two scorings (the model's, the floors') that asks, and dropped when both have finished with it (None
    without ground truth)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.lock, self.reference, self.finished = folder, threading.Lock(), None, 0

    def get(self) -> Reference | None:
        """The reference (built on the first call)."""
        with self.lock:
            if self.reference is None and self.folder is not None:
                with single_thread(torch.device("cpu")):  # the metrics' torch calls are on small arrays
                    self.reference = Reference(Truth.load(self.folder))
            return self.reference

    def finish(self) -> None:
        """One of the sample's two scorings is done with the reference."""
        with self.lock:
            self.finished += 1
            if self.finished == 2:
                self.reference = None


def _score_model(
    sample: Sample, shared: _SharedReference, config: RegistrationConfig, floors: tuple | None = None
) -> _Part:
    """Register (or read the registration of) one result and score it; with ``floors`` (the arguments of
    :func:`_score_floors`, without ground truth) its floors too."""
    part = _Part()
    start = time.perf_counter()
    try:
        rgb, reg = _registration(sample, config)
        part.registration = sample.registration
    except (ResultError, RegistrationError, torch.linalg.LinAlgError) as err:  # the file's shape was checked
        stage = "registration failed: " if not isinstance(err, ResultError) else ""
        part.status = f"not scored: {stage}{str(err).splitlines()[0]}"
    else:
        part.seconds["registration"] = time.perf_counter() - start
        if not all(np.isfinite(reg[k]).all() for k in ("K", "cam2world", "depth")):
            part.status = "not scored: the registration holds NaN or infinite cameras or depths"
    if part.status is None:
        start = time.perf_counter()
        reference = shared.get()
        with single_thread(torch.device("cpu")):
            part.scores["model"] = score(Prediction.from_registration(rgb, reg), reference)
        part.seconds["score"] = time.perf_counter() - start
        if floors is not None:
            other = _score_floors(*floors, image=rgb[:1])
            part.scores |= other.scores
            part.seconds |= other.seconds
    shared.finish()
    return part


def _score_floors(
    sample: Sample,
    shared: _SharedReference,
    held: dict[str, Prediction],
    focal: float | None,
    config: RegistrationConfig,
    image: np.ndarray | None = None,
) -> _Part:
    """Score the floors of one sample: those held for its size, and with ground truth the first frame and the static
    camera (``focal``: the set's median focal length at its size); ``image`` is the input image every floor holds
    (frame 0 of the truth when there is one)."""
    part, start = _Part(), time.perf_counter()
    reference = shared.get()
    truth = reference.truth if reference is not None else None
    image = truth.rgb[:1] if truth is not None else image
    floors = {name: dataclasses.replace(p, rgb=image).held(sample.frames) for name, p in held.items()}
    if truth is not None:
        first = dataclasses.replace(register_frame(first_frame_xyz(truth), config), rgb=image)
        K = camera_matrix(focal, *sample.size)
        floors["first_frame"] = first.held(sample.frames)
        floors["static_camera"] = Prediction(None, K[None], np.eye(4)[None]).held(sample.frames)
    memo: dict = {}  # what the floors' shared RGB video gives, computed once
    with single_thread(torch.device("cpu")):
        for name, prediction in floors.items():
            part.scores[name] = score(prediction, reference, memo)
    part.seconds["floors"] = time.perf_counter() - start
    shared.finish()
    return part
