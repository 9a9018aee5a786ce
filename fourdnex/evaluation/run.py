"""The evaluation that evaluate.py runs.

1. Check every input before any work: the result files (shapes read from their headers), which clip each result
   shows and that the clip exists.
2. Register the plane floor once per size.
3. For every result: with ground truth, prepare its clip (read and cropped as training does), add it to the set's mean
   depth map and focal lengths, and keep a reduced copy in a temporary folder under the output folder (the grids the
   metrics read: an eighth of the clip's bytes at 480 x 720); read the result's registration (compute and save it
   beside the result when missing, as pm_registration.py does with its defaults); score the model; make the floors'
   RGB video, the input image held (:class:`fourdnex.evaluation.scoring.FloorImage`), and score the plane and, with
   ground truth, the first frame with it. A result that cannot be registered is reported as not scored, with the
   reason.
4. With ground truth: register the mean depth map once per size, then score each sample's floors made of the whole
   set (mean depth, still camera) against its reduced truth, the mean depth with the sample's floor image of step 3.
5. The caller averages over the scored samples and writes the report.

Steps 3 and 4 run on worker processes forked from this one, one per CPU this process may use and at most one per
sample: one task per sample in each step, each task with torch and the BLAS libraries on one thread (threads would
share Python's lock: BENCHMARKS.md, Evaluation, measures both on 16 CPUs). Each clip
is read and decoded once and scored while it is in memory. Results come back in sample order and are the same
numbers as in one process. Where processes cannot be forked, the tasks run in the calling thread, on one thread too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from fourdnex.evaluation.floors import FLOORS, MeanDepth, camera_matrix, first_frame_xyz, plane_xyz
from fourdnex.evaluation.scoring import FloorImage, Prediction, Reference, Score, register_frame, score
from fourdnex.evaluation.truth import EvaluationError, clip_of, clip_sources, load_truth, read_mapping
from fourdnex.geometry.registration import FIT_VERSION, RegistrationConfig, RegistrationError, register_result
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
from fourdnex.runtime import cpu_threads, worker_processes

if TYPE_CHECKING:
    from fourdnex.data.sources import ClipSource


@dataclass
class EvaluatedSample:
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
    samples: list[EvaluatedSample]
    predictors: list[str]  # "model" then the floors that apply
    truth_paths: dict[str, np.ndarray] = field(default_factory=dict)  # true camera centres by sample name

    @property
    def scored(self) -> list[EvaluatedSample]:
        """The samples that were scored."""
        return [s for s in self.samples if s.status == "scored"]


def check_inputs(results: Path, gt: Path | None, mapping: Path | None) -> list[EvaluatedSample]:
    """The samples of a results folder (or file), every input checked; EvaluationError names the first bad one."""
    samples = []
    for path in find_results(results):
        frames, height, width = result_shape(path)
        samples.append(EvaluatedSample(path, frames, (height, width)))
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


def _fitted_as(path: Path, config: RegistrationConfig) -> bool:
    """Whether the saved registration at ``path`` was fitted by this revision of the fit with ``config``'s settings
    (its ``.json``: ``fit`` and ``config``; a setting it does not record has its default)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        return meta.get("fit") == FIT_VERSION and RegistrationConfig(**meta.get("config", {})) == config
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _registration(sample: EvaluatedSample, config: RegistrationConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The result's RGB video and its registration: read (the registration without its points, which scoring does
    not need), or registered on the CPU and saved beside the result where there is none or the one there was fitted
    by another revision of the fit (:data:`~fourdnex.geometry.registration.FIT_VERSION`) or with other settings."""
    path = registration_path(sample.path)
    if not path.is_file() or not _fitted_as(path, config):
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
    floors; ``out`` holds the temporary reduced truths while this runs. ``workers`` processes share the work
    (default: the CPUs this process may use, at most one per sample; 1: all in the calling thread)."""
    results, out = Path(results), Path(out)
    gt, mapping = (Path(gt) if gt is not None else None), (Path(mapping) if mapping is not None else None)
    config = config or RegistrationConfig()
    samples = check_inputs(results, gt, mapping)
    out.mkdir(parents=True, exist_ok=True)
    predictors = ["model", *(FLOORS if gt is not None else ["plane"])]
    evaluation = Evaluation(results, gt, samples, predictors)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, len(samples))
    plane = {size: register_frame(plane_xyz(*size), config) for size in {s.size for s in samples}}
    with contextlib.ExitStack() as stack:  # left in reverse: the workers end before the reduced truths go
        cache = (
            None if gt is None else Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out, prefix=".truth-")))
        )
        pool = stack.enter_context(worker_processes(workers if workers > 1 else 0))  # one: as well here
        if gt is None:
            tasks = [(_score_sample, sample, plane[sample.size], config) for sample in samples]
            for sample, part in zip(samples, _map(pool, tasks, "scoring"), strict=True):
                part.add_to(sample)
        else:
            _score_with_truth(evaluation, pool, gt, cache, plane, config)
    for sample in samples:  # in the order of the predictors
        sample.scores = {name: sample.scores[name] for name in predictors if name in sample.scores}
    return evaluation


def _score_with_truth(
    evaluation: Evaluation,
    pool: Executor | None,
    gt: Path,
    cache: Path,
    plane: dict[tuple[int, int], Prediction],
    config: RegistrationConfig,
) -> None:
    """Two passes over the samples: the first prepares each truth, scores the model and the floors made of it alone
    (plane, first frame) and keeps a reduced truth in ``cache``; the second scores the floors made of the whole set
    (mean depth map, still camera with the median focal length)."""
    sources, samples = clip_sources(gt), evaluation.samples
    truths = [_TruthTask(sources[s.clip_id], gt, cache / s.name) for s in samples]
    tasks = [(_score_sample, s, plane[s.size], config, t) for s, t in zip(samples, truths, strict=True)]
    mean, parts = MeanDepth(), {}
    for sample, part in zip(samples, _map(pool, tasks, "scoring"), strict=True):
        part.add_to(sample)
        mean.merge(part.mean_depth)
        evaluation.truth_paths[sample.name] = part.truth_path
        parts[sample.name] = part
    held = {size: register_frame(mean.xyz(size), config) for size in mean.sums}
    scored = evaluation.scored
    tasks = [
        (_score_set_floors, s, cache / s.name, held[s.size], mean.focal(s.size), parts[s.name].floor_image)
        for s in scored
    ]
    for sample, part in zip(scored, _map(pool, tasks, "floors of the set"), strict=True):
        part.add_to(sample)


def _map(pool: Executor | None, tasks: Iterable[tuple], desc: str) -> Iterator:
    """``task[0](*task[1:])`` for every task, in order, on the pool or here, counted by a progress bar."""
    tasks = list(tasks)
    done = pool.map(_call, tasks) if pool is not None else map(_call, tasks)
    yield from tqdm(done, desc=desc, total=len(tasks), unit="sample", leave=False)


def _call(task: tuple):
    """``task[0](*task[1:])`` with torch and the BLAS libraries numpy and scipy call on one thread, in a worker
    process or here, so that the numbers are the same bit for bit (every worker has a CPU: workers each on the BLAS
    libraries' default threads ran several times slower, BENCHMARKS.md, Evaluation); the thread counts are restored
    after."""
    with cpu_threads(1):
        return task[0](*task[1:])


@dataclass
class _TruthTask:
    """Where a sample's truth comes from (its clip in the tree ``gt``) and where its reduced copy goes."""

    source: ClipSource
    gt: Path
    folder: Path


@dataclass
class _Part:
    """What one task found for a sample, added to it in sample order."""

    scores: dict[str, Score] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    status: str | None = None  # "not scored: <reason>"
    registration: str = ""
    mean_depth: MeanDepth = field(default_factory=MeanDepth)  # the sample's share of the set's mean depth map
    truth_path: np.ndarray | None = None  # (F, 3) true camera centres
    floor_image: FloorImage | None = None  # with ground truth: the floors' RGB video, for the floors of the set

    def time(self, stage: str, start: float) -> None:
        """Add the seconds since ``start`` to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def add_to(self, sample: EvaluatedSample) -> None:
        """Its scores, seconds and status into ``sample``."""
        sample.status = self.status or sample.status
        sample.registration = self.registration or sample.registration
        sample.scores |= self.scores
        for stage, seconds in self.seconds.items():
            sample.seconds[stage] = sample.seconds.get(stage, 0.0) + seconds


def _score_sample(
    sample: EvaluatedSample, plane: Prediction, config: RegistrationConfig, truth: _TruthTask | None = None
) -> _Part:
    """Score one result and the floors that need nothing of the other samples: the plane, and with ground truth the
    first frame. With ground truth the clip is prepared first: its share of the set's mean depth map is kept, and its
    reduced truth and the floors' RGB video are kept for :func:`_score_set_floors`. A result that cannot be
    registered is not scored (its floors neither), with the reason."""
    part, reference = _Part(), None
    if truth is not None:
        start = time.perf_counter()
        clip = load_truth(truth.gt, truth.source, sample.frames, *sample.size)
        reference = Reference.of(clip)
        part.mean_depth.add(clip, reference.unit)
        part.truth_path = clip.cam2world[:, :3, 3]
        reference.save(truth.folder)
        part.time("truth", start)
    start = time.perf_counter()
    try:
        rgb, reg = _registration(sample, config)
        part.registration = sample.registration
    except (ResultError, RegistrationError, torch.linalg.LinAlgError) as err:  # the file's shape was checked
        stage = "registration failed: " if not isinstance(err, ResultError) else ""
        part.status = f"not scored: {stage}{str(err).splitlines()[0]}"
        return part
    part.time("registration", start)
    if not all(np.isfinite(reg[k]).all() for k in ("K", "cam2world", "depth")):
        part.status = "not scored: the registration holds NaN or infinite cameras or depths"
        return part
    start = time.perf_counter()
    part.scores["model"] = score(Prediction.from_registration(rgb, reg), reference)
    part.time("score", start)
    start = time.perf_counter()
    image = FloorImage.of(reference.image if reference is not None else rgb[:1], sample.frames, reference)
    floors = {"plane": plane}
    if reference is not None:
        floors["first_frame"] = register_frame(first_frame_xyz(clip), config)
        part.floor_image = image
    for name, prediction in floors.items():
        part.scores[name] = score(prediction.held(sample.frames), reference, image)
    part.time("floors", start)
    return part


def _score_set_floors(
    sample: EvaluatedSample, folder: Path, mean_depth: Prediction, focal: float, image: FloorImage
) -> _Part:
    """Score the floors of one sample that are made of the whole set: the mean depth map (``mean_depth``, registered
    once for the size) with the sample's floor ``image`` as its RGB video, and the still camera with the set's median
    focal length ``focal``, against the reduced truth in ``folder`` (which has no video: ``image`` was scored against
    it in the first pass)."""
    part, start = _Part(), time.perf_counter()
    reference = Reference.load(folder)
    part.scores["mean_depth"] = score(mean_depth.held(sample.frames), reference, image)
    K = camera_matrix(focal, *sample.size)
    part.scores["static_camera"] = score(Prediction(None, K[None], np.eye(4)[None]).held(sample.frames), reference)
    part.time("floors", start)
    return part
