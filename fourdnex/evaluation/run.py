"""The evaluation that evaluate.py runs.

1. Check every input before any work: the result files (shapes read from their headers), which clip each result
   shows and that the clip exists.
2. With ground truth: prepare each result's clip once (the slow part of a run), keep it in a temporary folder under
   the output folder, and collect the mean depth map and focal length of the set.
3. Register the floors that are the same for every sample of a size (plane, mean depth), once per size.
4. For every result: read its registration (compute and save it beside the result when missing, as
   pm_registration.py does with its defaults); score the model and the floors of the sample. A result that cannot be
   registered is reported as not scored, with the reason.
5. Average over the scored samples; the caller writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fourdnex.config import RegistrationConfig
from fourdnex.evaluation.floors import FLOORS, MeanDepth, camera_matrix, first_frame_xyz, plane_xyz
from fourdnex.evaluation.scoring import Prediction, Reference, Score, register_frame, score
from fourdnex.evaluation.truth import EvaluationError, Truth, clip_of, clip_sources, load_truth, read_mapping
from fourdnex.geometry.registration import RegistrationError, register_result, single_thread
from fourdnex.geometry.results import (
    find_results,
    load_registration,
    load_result,
    registration_path,
    result_shape,
    save_registration,
)


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
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        sample.clip_id = clip_of(sample.path, meta, names, mapping, clips)
    return samples


def _registration(sample: Sample, xyz: np.ndarray, config: RegistrationConfig) -> dict[str, np.ndarray]:
    """The result's registration: read, or computed on the CPU and saved beside it."""
    path = registration_path(sample.path)
    if path.is_file():
        reg = load_registration(path)
        if reg["depth"].shape != (sample.frames, *sample.size) or not np.array_equal(
            reg["frame_index"], np.arange(sample.frames)
        ):
            raise EvaluationError(
                f"{path}: registers frames {reg['frame_index'].tolist()} at {list(reg['depth'].shape[1:])}, not all "
                f"{sample.frames} frames of {sample.path.name} at {list(sample.size)}: delete it or run "
                "pm_registration.py without frame selection"
            )
        sample.registration = "read"
        return reg
    reg, info = register_result(xyz, np.arange(sample.frames), config, torch.device("cpu"))
    frames = {"start": 0, "end": None, "gap": 1, "count": sample.frames}
    save_registration(path, reg, {"source": str(sample.path), "frames": frames, **info})
    sample.registration = "computed"
    return reg


def evaluate(
    results: str | Path,
    out: str | Path,
    gt: str | Path | None = None,
    mapping: str | Path | None = None,
    config: RegistrationConfig | None = None,
) -> Evaluation:
    """Score every result in ``results`` (with ground truth from the 4DNeX-10M tree ``gt`` when given) beside its
    floors; ``out`` holds the temporary ground-truth cache while this runs."""
    results, out = Path(results), Path(out)
    gt, mapping = (Path(gt) if gt is not None else None), (Path(mapping) if mapping is not None else None)
    config = config or RegistrationConfig()
    samples = check_inputs(results, gt, mapping)
    out.mkdir(parents=True, exist_ok=True)
    predictors = ["model", *(FLOORS if gt is not None else ["plane"])]
    evaluation = Evaluation(results, gt, samples, predictors)
    sizes = sorted({s.size for s in samples})
    with tempfile.TemporaryDirectory(dir=out, prefix=".truth-") as cache:
        mean = MeanDepth()
        if gt is not None:
            sources = clip_sources(gt)
            for sample in tqdm(samples, desc="ground truth", unit="sample", leave=False):
                start = time.perf_counter()
                truth = load_truth(gt, sources[sample.clip_id], sample.frames, *sample.size)
                mean.add(truth)
                truth.save(Path(cache) / f"{sample.name}.npz")
                evaluation.truth_paths[sample.name] = truth.cam2world[:, :3, 3]
                sample.seconds["truth"] = time.perf_counter() - start
        held = {size: {"plane": register_frame(plane_xyz(*size), config)} for size in sizes}
        if gt is not None:
            for size in sizes:
                held[size]["mean_depth"] = register_frame(mean.xyz(size), config)
        for sample in tqdm(samples, desc="scoring", unit="sample", leave=False):
            truth = Truth.load(Path(cache) / f"{sample.name}.npz") if gt is not None else None
            _score_sample(sample, truth, held[sample.size], mean, config)
    return evaluation


def _score_sample(
    sample: Sample, truth: Truth | None, held: dict[str, Prediction], mean: MeanDepth, config: RegistrationConfig
) -> None:
    """Register (or read the registration of) one result and score it and its floors into ``sample``."""
    start = time.perf_counter()
    result = load_result(sample.path)
    sample.seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        reg = _registration(sample, result.xyz, config)
    except (RegistrationError, torch.linalg.LinAlgError) as err:
        sample.status = f"not scored: registration failed: {str(err).splitlines()[0]}"
        return
    sample.seconds["registration"] = time.perf_counter() - start
    if not all(np.isfinite(reg[k]).all() for k in ("K", "cam2world", "depth")):
        sample.status = "not scored: the registration holds NaN or infinite cameras or depths"
        return
    start = time.perf_counter()
    frames = sample.frames
    image = (truth.rgb if truth is not None else result.rgb)[:1]  # the input image, held by every floor
    predictions = {"model": Prediction.from_registration(result.rgb, reg)}
    predictions |= {name: dataclasses.replace(p, rgb=image).held(frames) for name, p in held.items()}
    if truth is not None:
        predictions["first_frame"] = dataclasses.replace(register_frame(first_frame_xyz(truth), config), rgb=image)
        predictions["first_frame"] = predictions["first_frame"].held(frames)
        K = camera_matrix(mean.focal(sample.size), *sample.size)
        predictions["static_camera"] = Prediction(None, K[None], np.eye(4)[None]).held(frames)
    floors_start = start
    with single_thread(torch.device("cpu")):  # the metrics' torch calls are on small arrays
        reference = Reference(truth) if truth is not None else None
        memo: dict = {}
        for name, prediction in predictions.items():
            sample.scores[name] = score(prediction, reference, memo)
            if name == "model":
                sample.seconds["score"] = time.perf_counter() - start
                floors_start = time.perf_counter()
    sample.seconds["floors"] = time.perf_counter() - floors_start
