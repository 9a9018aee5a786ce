"""What app.py runs when its button is pressed: one image (and caption) to a 4D result, in stages the page shows as
they finish.

:class:`Engine` loads the model once (:func:`fourdnex.generate.run.load_model`: inference.py's loading and memory
settings) and runs one job at a time (a lock: one model, one device). A job (:meth:`Engine.run`) is the pipeline of
the command-line tools, through the same package calls, in one folder of its own (:mod:`fourdnex.app.jobs`):

1. generation (inference.py): the result files ``result/00000.{mp4,npz,json}`` and the RGB and XYZ videos, with a
   progress report after every denoising step;
2. registration (pm_registration.py): ``result/00000_reg.{npz,json}``, the recovered focal length, and the Rerun
   recording ``scene.rrd`` of the registered dynamic point cloud and its cameras (rerun_vis.py);
3. a novel view (render.py): ``novel/00000/`` along a camera path (a path no point of the scene lands in is reported,
   and the job goes on without it);
4. the exports (pm_registration.py ``--export``: PLY, COLMAP, nerfstudio, depth) into ``result/00000_export/``,
   the metrics that need no ground truth (evaluate.py without ``--gt``: the model beside the sloped-plane floor)
   into ``metrics.json``, and everything in one archive.

After each stage :meth:`Engine.run` yields a :class:`JobUpdate`; it never raises: a refused input or a failing
stage ends the job with an update whose ``error`` says what happened, its folder removed, and the engine is ready
for the next job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fourdnex.app.jobs import JobFolders, write_archive
from fourdnex.app.uploads import UploadError, check_caption, check_image, check_video
from fourdnex.errors import FourDNeXError, UsageError
from fourdnex.generate.config import RunConfig, SampleConfig
from fourdnex.generate.run import Job, LoadedModel, job_meta, load_model, sample_job, with_own_transformer
from fourdnex.geometry.paths import CAMERA_PATHS
from fourdnex.geometry.registration import RegistrationConfig

log = logging.getLogger("fourdnex.app")

#: Condition modes: what the job is given. The last two need weights (an adapter, or a fully fine-tuned transformer)
#: trained for any given frames.
CONDITIONS = {
    "image": "an image (frame 0)",
    "first_last": "first and last frames",
    "video": "a video (every frame)",
}
#: The exports written beside the registration (pm_registration.py's ``--export`` choices).
EXPORT_KINDS = ["ply", "colmap", "nerfstudio", "depth"]
#: Where a job's files go inside its folder.
RESULT_DIR, NOVEL_DIR, RECORDING, METRICS_FILE = "result", "novel", "scene.rrd", "metrics.json"
#: The metrics the page shows, in this order (names of fourdnex.evaluation.scoring.METRICS).
SHOWN_METRICS = (
    "residual.median",
    "residual.p90",
    "edges",
    "stability.static",
    "stability.motion",
    "path.jerk",
    "path.turn",
)

#: What runs after each update's stage (for the message of a stage that fails).
NEXT_STAGE = {"generated": "registration", "registered": "rendering the novel view", "rendered": "exports and metrics"}

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class JobRequest:
    """What the page sends: the condition, the caption and the settings."""

    caption: str | None
    image: str | None = None  # frame 0 (the "image" and "first_last" conditions)
    last_image: str | None = None  # the last frame ("first_last")
    video: str | None = None  # every frame ("video")
    condition: str = "image"  # a CONDITIONS key
    sample: SampleConfig = field(default_factory=SampleConfig)
    camera_path: str = "orbit"  # a fourdnex.geometry.paths.CAMERA_PATHS key: the novel view's path


@dataclass
class JobUpdate:
    """What the page shows after a stage; a field that is None leaves what the page shows as it is."""

    stage: str  # "generated", "registered", "rendered", "done" or "failed"
    status: str  # one line for the page (Markdown)
    job: str | None = None  # the job's folder name
    rgb_video: Path | None = None
    xyz_video: Path | None = None
    recording: str | None = None  # the recording's address, relative to the page
    camera: str | None = None  # the recovered camera (Markdown)
    novel_video: Path | None = None  # the input beside the novel view
    metrics: list[list] | None = None  # rows: metric, model, plane floor, which way is better, definition
    archive: Path | None = None
    error: str | None = None  # what went wrong ("failed" only)
    seconds: dict[str, float] = field(default_factory=dict)  # per finished stage


@dataclass(frozen=True)
class Example:
    """A held-out example: an image and its caption."""

    image: Path
    caption: str


def find_examples(folder: str | Path | None) -> list[Example]:
    """The examples of ``folder``: the lines of its ``prompt.txt`` and ``image.txt`` (inference.py's lists: one
    caption, one image path per line, paths relative to the list); none where the lists are missing or disagree."""
    from fourdnex.generate.run import read_lines_or_literal, resolve_image

    if folder is None:
        return []
    folder = Path(folder)
    prompts, images = folder / "prompt.txt", folder / "image.txt"
    if not (prompts.is_file() and images.is_file()):
        return []
    try:
        captions, _ = read_lines_or_literal(str(prompts), "prompt")
        names, source = read_lines_or_literal(str(images), "image")
        if len(captions) != len(names):
            raise UsageError(f"{prompts} and {images} have different lengths")
        return [Example(resolve_image(n, source), c) for n, c in zip(names, captions, strict=True)]
    except UsageError as err:
        log.warning("no examples from %s: %s", folder, err)
        return []


def camera_summary(reg: dict[str, np.ndarray], mean_residual: float) -> str:
    """The recovered camera in a few lines of Markdown: focal length (pixels, widths, field of view), principal
    point, how far the camera travelled, the registration residual."""
    K = reg["K"]
    frames, height, width = reg["depth"].shape
    fx, fy = float(K[:, 0, 0].mean()), float(K[:, 1, 1].mean())
    cx, cy = float(K[:, 0, 2].mean()), float(K[:, 1, 2].mean())
    fov_x, fov_y = (math.degrees(2 * math.atan(side / 2 / f)) for side, f in ((width, fx), (height, fy)))
    centres = reg["cam2world"][:, :3, 3]
    travel = float(np.linalg.norm(np.diff(centres, axis=0), axis=-1).sum()) if frames > 1 else 0.0
    depth = float(np.median(reg["depth"]))
    shared = bool(np.allclose(K, K[:1]))
    return "\n".join(
        [
            f"- **focal length** fx {fx:.1f} px, fy {fy:.1f} px ({fx / width:.2f} widths; field of view "
            f"{fov_x:.1f}° x {fov_y:.1f}°){'' if shared else ', mean over frames'}",
            f"- **principal point** ({cx:.1f}, {cy:.1f}) px of {width} x {height}",
            f"- **camera path** {travel / depth:.2f} median depths travelled over {frames} frames",
            f"- **registration residual** {mean_residual:.4f} (mean distance from a registered to a generated point, "
            "pointmap units)",
        ]
    )


def _format(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


class Engine:
    """The model, loaded once, and the jobs it runs one at a time."""

    def __init__(self, config: RunConfig, model: LoadedModel, jobs: JobFolders) -> None:
        self.config, self.model, self.jobs = config, model, jobs
        self._lock = threading.Lock()
        self._plane: dict[tuple[int, int], object] = {}  # the sloped-plane floor, registered once per size

    @classmethod
    def load(cls, config: RunConfig, jobs: JobFolders, largest: SampleConfig) -> Engine:
        """Load ``config``'s model on its device with inference.py's memory settings, sized for the ``largest`` job
        the page will send (its frames, height and width)."""
        from fourdnex.generate.parallel import tokens_of

        config = with_own_transformer(config)
        model = load_model(
            config,
            tokens_of(largest.num_frames, largest.height, largest.width, fused=config.modalities == "rgbxyz"),
            largest.num_frames * largest.height * largest.width,
        )
        model.pipe.set_progress_bar_config(disable=True)
        return cls(config, model, jobs)

    @property
    def conditions(self) -> list[str]:
        """The condition modes the loaded adapter was trained for."""
        return list(CONDITIONS) if self.model.condition_tasks == "any" else ["image"]

    def run(self, request: JobRequest, progress: Progress | None = None) -> Iterator[JobUpdate]:
        """Run one job, one stage after another (see the module's description); yields an update after each."""
        with self._lock:
            folder, stage, start = None, "checking the inputs", time.perf_counter()
            try:
                job, sample, images = self._check(request)
                folder = self.jobs.new()
                job = self._store_inputs(job, request, images, folder)
                stage = "generation"
                for update in self._stages(job, sample, request, folder, progress or (lambda *_: None), start):
                    stage = NEXT_STAGE.get(update.stage, stage)
                    yield update
            except Exception as err:  # the job ends; the engine serves the next one
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                line = str(err).splitlines()[0] if str(err) else ""
                refused = isinstance(err, UsageError) and stage == "checking the inputs"
                if refused:
                    message = line
                elif isinstance(err, FourDNeXError):  # a known limit (out of GPU memory, a degenerate pointmap)
                    message = f"{stage} failed: {line}"
                else:
                    log.exception("job failed during %s", stage)
                    message = f"{stage} failed ({type(err).__name__}: {line})"
                status = f"**{'refused' if refused else 'failed'}:** {message}"
                yield JobUpdate("failed", status, error=message)

    def _check(self, request: JobRequest) -> tuple[Job, SampleConfig, dict]:
        """The job a request asks for, every input checked (before any work), and the condition images it read
        (by name: ``image``, ``last``)."""
        if request.condition not in CONDITIONS:
            raise UploadError(f"unknown condition {request.condition!r}; one of {', '.join(CONDITIONS)}")
        if request.condition not in self.conditions:
            raise UploadError(
                f"these weights were trained on {self.model.condition_tasks!r} conditions only: the "
                f"{CONDITIONS[request.condition]} condition needs weights trained with --condition_tasks any"
            )
        if request.camera_path not in CAMERA_PATHS:
            raise UploadError(f"unknown camera path {request.camera_path!r}; one of {', '.join(CAMERA_PATHS)}")
        sample = dataclasses.replace(request.sample)
        if sample.height is None or sample.width is None:
            raise UploadError("give the height and the width")
        sample.validate()
        caption = check_caption(request.caption)
        frames, images = sample.num_frames, {}
        if request.condition == "video":
            check_video(request.video, frames)
            given = tuple(range(frames))
        elif request.condition == "first_last":
            if frames < 2:
                raise UploadError("first and last frames need at least 5 frames")
            images = {"image": check_image(request.image, "first frame")}
            images["last"] = check_image(request.last_image, "last frame")
            given = (0, frames - 1)
        else:
            images, given = {"image": check_image(request.image)}, (0,)
        return Job(0, caption, (), None, given, sample.height, sample.width), sample, images

    @staticmethod
    def _store_inputs(job: Job, request: JobRequest, images: dict, folder: Path) -> Job:
        """Keep the (checked) condition in the job's ``input/`` folder, as the files the job reads."""
        inputs = folder / "input"
        inputs.mkdir()
        if request.condition == "video":
            video = inputs / f"video{Path(request.video).suffix.lower()}"
            shutil.copyfile(request.video, video)
            return dataclasses.replace(job, video=video)
        for name, image in images.items():
            image.save(inputs / f"{name}.png")
        return dataclasses.replace(job, images=tuple(inputs / f"{name}.png" for name in images))

    def _stages(
        self, job: Job, sample: SampleConfig, request: JobRequest, folder: Path, progress: Progress, start: float
    ) -> Iterator[JobUpdate]:
        from fourdnex.app.viewer import write_recording
        from fourdnex.evaluation.floors import plane_xyz
        from fourdnex.evaluation.scoring import METRICS, Prediction, register_frame, score
        from fourdnex.files import write_json
        from fourdnex.geometry.exports import export_all
        from fourdnex.geometry.registration import register_result
        from fourdnex.geometry.render import SPLAT_SCALE, RenderError, render_result, write_novel_views
        from fourdnex.geometry.results import registration_path, save_registration, to_uint8, write_sample

        name, seconds = folder.name, {}
        model, device = self.model, self.model.device
        result_dir = folder / RESULT_DIR
        result_dir.mkdir()

        # 1. Generation.
        tic = time.perf_counter()
        progress(0, sample.steps, "denoising")

        def step_done(pipe, step, timestep, kwargs):
            progress(step + 1, sample.steps, "denoising")
            return kwargs

        output = sample_job(model, job, sample, callback_on_step_end=step_done)
        rgb, xyz = output.rgb[0].numpy(), output.xyz[0].numpy()
        meta = job_meta(model, self.config, job, sample, output.timings)
        meta["app_job"] = name  # the condition's files as the archive holds them
        meta["image"] = ",".join(str(p.relative_to(folder)) for p in job.images) or None
        meta["video"] = str(job.video.relative_to(folder)) if job.video else None
        npz = write_sample(result_dir, 0, rgb, xyz, meta)
        rgb8 = to_uint8(rgb, 0.0)
        seconds["generation"] = time.perf_counter() - tic
        yield JobUpdate(
            "generated",
            f"generated {sample.num_frames} frames of {job.height} x {job.width} in {seconds['generation']:.1f} s; "
            "registering the cameras...",
            name,
            rgb_video=result_dir / "00000_rgb.mp4",
            xyz_video=result_dir / "00000_xyz.mp4",
            seconds=dict(seconds),
        )

        # 2. Registration, and the recording of the registered scene.
        tic = time.perf_counter()
        progress(0, 1, "registering the cameras")
        frames = np.arange(sample.num_frames)
        reg, info = register_result(xyz, frames, RegistrationConfig(), device)
        counts = {"start": 0, "end": None, "gap": 1, "count": sample.num_frames}
        save_registration(registration_path(npz), reg, {"source": str(npz), "frames": counts, **info})
        write_recording(folder / RECORDING, rgb8, xyz, reg, "00000")
        seconds["registration"] = time.perf_counter() - tic
        yield JobUpdate(
            "registered",
            f"registered in {seconds['registration']:.1f} s; rendering a novel view...",
            name,
            recording=f"jobs/{name}/{RECORDING}",
            camera=camera_summary(reg, info["mean_residual"]),
            seconds=dict(seconds),
        )

        # 3. A novel view along the chosen path (where the points allow one: the job goes on without it).
        tic = time.perf_counter()
        progress(0, 1, f"rendering the {request.camera_path} path")
        path = CAMERA_PATHS[request.camera_path]
        try:
            views, K, cam2world, render_info = render_result(rgb8, reg, path, None, SPLAT_SCALE, device)
        except RenderError as err:
            seconds["render"] = time.perf_counter() - tic
            status = f"no novel view along the {request.camera_path} path ({err}); exporting and scoring..."
            yield JobUpdate("rendered", status, name, seconds=dict(seconds))
        else:
            meta = {"source": str(npz), "path": dataclasses.asdict(path), **render_info, "device": str(device)}
            novel = folder / NOVEL_DIR / "00000"
            write_novel_views(novel, views, rgb8[frames], K.numpy(), cam2world.numpy(), frames, "png16", meta)
            seconds["render"] = time.perf_counter() - tic
            yield JobUpdate(
                "rendered",
                f"rendered the {request.camera_path} path in {seconds['render']:.1f} s (points cover "
                f"{render_info['coverage']['mean']:.0%} of the view); exporting and scoring...",
                name,
                novel_video=novel / "preview.mp4",
                seconds=dict(seconds),
            )

        # 4. Exports, metrics without ground truth, the archive.
        tic = time.perf_counter()
        progress(0, 1, "exporting and scoring")
        export_all(result_dir / "00000_export", EXPORT_KINDS, reg, rgb8, "png16", 1)
        size = (job.height, job.width)
        if size not in self._plane:
            self._plane[size] = register_frame(plane_xyz(*size), RegistrationConfig())
        plane = dataclasses.replace(self._plane[size], rgb=rgb8[:1]).held(sample.num_frames)
        scores = {"model": score(Prediction.from_registration(rgb8, reg), None), "plane": score(plane, None)}
        values = {who: dict(each.values) for who, each in scores.items()}
        rows = [
            [METRICS[k][0], _format(values["model"].get(k)), _format(values["plane"].get(k)), METRICS[k][1],
             METRICS[k][2]]
            for k in SHOWN_METRICS
        ]  # fmt: skip
        definitions = {k: dict(zip(("label", "better", "definition"), METRICS[k], strict=True)) for k in SHOWN_METRICS}
        write_json(folder / METRICS_FILE, {"values": values, "definitions": definitions, "camera": info})
        archive = write_archive(folder, folder / f"fourdnex_{name[:8]}.zip")
        seconds["exports"] = time.perf_counter() - tic
        total = time.perf_counter() - start
        yield JobUpdate(
            "done",
            f"done in {total:.1f} s (generation {seconds['generation']:.1f} s, registration "
            f"{seconds['registration']:.1f} s, novel view {seconds['render']:.1f} s, exports and metrics "
            f"{seconds['exports']:.1f} s)",
            name,
            metrics=rows,
            archive=archive,
            seconds=dict(seconds),
        )
