"""app.py's package side (fourdnex.app): upload checks, job folders, the viewer's files, and jobs run by the engine
on the bundled demo model on this CPU, at small settings (9 frames of 32 x 48, 3 steps)."""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import ROOT

from fourdnex.app import uploads
from fourdnex.app.engine import CONDITIONS, Engine, JobRequest, find_examples
from fourdnex.app.jobs import JobFolders, write_archive
from fourdnex.app.uploads import UploadError, check_caption, check_image, check_video
from fourdnex.app.viewer import recording_stride, viewer_html
from fourdnex.app.web import exposure_warning
from fourdnex.generate.config import RunConfig, SampleConfig

DEMO = ROOT / "example" / "demo"
SMALL = SampleConfig(num_frames=9, height=32, width=48, steps=3, guidance_scale=1.0)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny compressed row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


# --- uploads -----------------------------------------------------------------------------------------------------


def test_an_image_is_accepted_and_decoded(tmp_path):
    path = tmp_path / "a.jpg"
    PIL.Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    image = check_image(str(path))
    assert image.size == (40, 30) and image.mode == "RGB"


def test_a_file_that_is_no_image_is_refused_with_its_name(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    with pytest.raises(UploadError, match=r"'notes\.png' is not an image"):
        check_image(path)


def test_a_huge_png_header_is_refused_before_its_pixels_are_decoded(tmp_path):
    path = png_header(tmp_path / "bomb.png", 50_000, 50_000)
    tic = time.perf_counter()
    with pytest.raises(UploadError, match="claims 2500 megapixels; at most 40 megapixels"):
        check_image(path)
    with pytest.raises(UploadError, match=r"10000 x 5000 pixels \(50 megapixels\); at most 40"):
        check_image(png_header(tmp_path / "big.png", 10_000, 5_000))
    assert time.perf_counter() - tic < 1.0  # nothing was decoded


def test_files_too_large_empty_missing_or_of_another_format_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    PIL.Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(UploadError, match="at most 0 MB"):
        check_image(path)
    monkeypatch.undo()
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UploadError, match="empty"):
        check_image(tmp_path / "empty.png")
    with pytest.raises(UploadError, match="no image given"):
        check_image(None)
    with pytest.raises(UploadError, match="gone"):
        check_image(tmp_path / "missing.png")
    tiff = tmp_path / "a.tif"
    PIL.Image.new("RGB", (8, 8)).save(tiff)
    with pytest.raises(UploadError, match="TIFF file; accepted: PNG"):
        check_image(tiff)


def test_captions_must_say_something(tmp_path):
    assert check_caption("  a ball rolls \n") == "a ball rolls"
    for empty in ("", "   ", None):
        with pytest.raises(UploadError, match="caption is empty"):
            check_caption(empty)
    with pytest.raises(UploadError, match="at most"):
        check_caption("x" * 5000)


def test_a_video_gives_its_first_frames_or_says_it_is_too_short(tmp_path):
    from fourdnex.files import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, np.full((6, 32, 48, 3), 128, np.uint8))
    assert [f.size for f in check_video(path, 5)] == [(48, 32)] * 5
    with pytest.raises(UploadError, match="fewer than the 9 frames"):
        check_video(path, 9)
    with pytest.raises(UploadError, match="not a video"):
        (tmp_path / "x.mp4").write_text("no video here")
        check_video(tmp_path / "x.mp4", 5)


# --- job folders, archive, examples, viewer, listening address ----------------------------------------------------


def test_job_folders_expire_and_only_job_names_are_found(tmp_path):
    jobs = JobFolders(tmp_path, ttl_s=60)
    old, new = jobs.new(), jobs.new()
    os.utime(old, (time.time() - 120, time.time() - 120))
    (tmp_path / "not-a-job").mkdir()
    assert jobs.sweep() == [old.name]
    assert not old.exists() and new.is_dir() and (tmp_path / "not-a-job").is_dir()
    assert jobs.find(new.name) == new and jobs.find(old.name) is None
    assert jobs.find("../etc") is None and jobs.find("not-a-job") is None
    jobs.close()
    assert not tmp_path.exists()


def test_the_archive_holds_every_file_but_itself_and_partial_ones(tmp_path):
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "00000.npz").write_bytes(b"x" * 100)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "result" / ".00000.partial.mp4").write_bytes(b"")
    archive = write_archive(tmp_path, tmp_path / "all.zip")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["metrics.json", "result/00000.npz"]
        assert zf.getinfo("result/00000.npz").compress_type == zipfile.ZIP_STORED


def test_examples_are_the_lines_of_the_folder_lists(tmp_path):
    demo = find_examples(DEMO)
    assert len(demo) == len((DEMO / "prompt.txt").read_text().strip().splitlines()) >= 1
    assert demo[0].image.is_file() and demo[0].caption
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "prompt.txt").write_text("first\nsecond\n")
    (tmp_path / "image.txt").write_text("a.png\nb.png\n")
    assert [(e.image.name, e.caption) for e in find_examples(tmp_path)] == [("a.png", "first"), ("b.png", "second")]
    (tmp_path / "image.txt").write_text("a.png\n")
    assert find_examples(tmp_path) == []  # the lists disagree
    assert find_examples(tmp_path / "nothing") == [] and find_examples(None) == []


def test_viewer_panel_and_point_budget():
    assert "scene.rrd" not in viewer_html(None)
    assert 'src="viewer/embed.html?rrd=../jobs/abc/scene.rrd"' in viewer_html("jobs/abc/scene.rrd")
    assert recording_stride(96, 144) == 1 and recording_stride(480, 720) == 3


def test_only_a_non_loopback_address_gets_the_warning():
    assert exposure_warning("127.0.0.1", 7860) is None and exposure_warning("localhost", 1) is None
    assert exposure_warning("::1", 1) is None
    assert "NOT only on this machine" in exposure_warning("0.0.0.0", 7860)


def test_app_says_first_that_it_listens_beyond_this_machine(tmp_path):
    command = [sys.executable, str(ROOT / "app.py"), "--host", "0.0.0.0", "--model_path", str(tmp_path / "none")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout.splitlines()[0].startswith("app.py: listening on 0.0.0.0:7860, NOT only on this machine")
    assert proc.stderr.strip().splitlines()[-1].startswith("app.py: ")  # one line, no traceback
    assert "Traceback" not in proc.stderr


def test_the_web_viewer_files_come_from_the_installed_sdk(tmp_path):
    from fourdnex.app.viewer import VIEWER_FILES, web_viewer_files

    folder = web_viewer_files(tmp_path)
    assert all((folder / name).stat().st_size > 0 for name in VIEWER_FILES)
    assert (folder / "re_viewer_bg.wasm").read_bytes()[:4] == b"\0asm"
    assert web_viewer_files(tmp_path) == folder  # copied once


# --- jobs on the demo model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = RunConfig(prompt="", model_path=str(DEMO / "model"), device="cpu")
    jobs = JobFolders(tmp_path_factory.mktemp("jobs"))
    yield Engine.load(config, jobs, SMALL)
    jobs.close()


def _request(**changes) -> JobRequest:
    example = find_examples(DEMO)[0]
    fields = {"caption": example.caption, "image": str(example.image), "sample": SMALL} | changes
    return JobRequest(**fields)


def test_bad_inputs_end_the_job_with_a_message_and_leave_no_folder(engine, tmp_path):
    text = tmp_path / "a.png"
    text.write_text("hello")
    bomb = png_header(tmp_path / "bomb.png", 50_000, 50_000)
    cases = {
        "is not an image": _request(image=str(text)),
        "claims 2500 megapixels": _request(image=str(bomb)),
        "caption is empty": _request(caption=" "),
        "num_frames must be 4k+1": _request(sample=SampleConfig(num_frames=8, height=32, width=48)),
        "needs weights trained with --condition_tasks any": _request(condition="video"),
        "unknown camera path": _request(camera_path="loop"),
    }
    for message, request in cases.items():
        updates = list(engine.run(request))
        assert [u.stage for u in updates] == ["failed"], message
        assert message in updates[0].error and updates[0].status.startswith("**refused:**")
    assert list(engine.jobs.root.iterdir()) == []
    assert engine.conditions == ["image"]  # the demo model: frame 0 only


def test_a_job_fails_cleanly_and_the_next_one_runs_every_stage(engine, monkeypatch):
    import fourdnex.app.viewer

    def broken(*args, **kwargs):
        raise RuntimeError("the recording exploded")

    monkeypatch.setattr(fourdnex.app.viewer, "write_recording", broken)
    updates = list(engine.run(_request()))
    assert [u.stage for u in updates] == ["generated", "failed"]
    assert updates[-1].status == "**failed:** registration failed (RuntimeError: the recording exploded)"
    assert list(engine.jobs.root.iterdir()) == []  # its folder is gone
    monkeypatch.undo()

    steps = []

    def record(done, total, what):
        steps.append((done, what))

    # At the demo model's own size: at others its pointmaps can leave the new camera's view empty (the job then goes
    # on without a novel view).
    native = SampleConfig(num_frames=25, height=96, width=144, steps=SMALL.steps, guidance_scale=1.0)
    updates = list(engine.run(_request(camera_path="dolly", sample=native), record))
    assert [u.stage for u in updates] == ["generated", "registered", "rendered", "done"]
    assert [s for s in steps if s[1] == "denoising"] == [(i, "denoising") for i in range(SMALL.steps + 1)]
    first, registered, rendered, done = updates
    folder = engine.jobs.root / first.job
    assert first.rgb_video.is_file() and first.xyz_video.is_file()
    assert registered.recording == f"jobs/{first.job}/scene.rrd" and (folder / "scene.rrd").is_file()
    assert "focal length" in registered.camera and "px" in registered.camera
    assert rendered.novel_video.is_file()
    assert len(done.metrics) == 7 and all(len(row) == 5 for row in done.metrics)
    assert all(np.isfinite(float(row[1])) for row in done.metrics)
    with zipfile.ZipFile(done.archive) as zf:
        names = set(zf.namelist())
    expected = {
        "input/image.png",
        "result/00000.npz",
        "result/00000.json",
        "result/00000.mp4",
        "result/00000_reg.npz",
        "result/00000_export/colmap/cameras.txt",
        "result/00000_export/transforms.json",
        "result/00000_export/ply/frame_00000.ply",
        "novel/00000/novel.mp4",
        "metrics.json",
        "scene.rrd",
    }
    assert expected <= names, expected - names
    from rerun.chunk import RrdReader

    paths = set(RrdReader(folder / "scene.rrd").store().schema().entity_paths())
    assert {"/world/00000/points", "/world/00000/camera", "/world/00000/trajectory"} <= paths


def test_weights_trained_on_any_frames_offer_first_and_last_frames(tmp_path):
    """The demo model with its any-frame adapter (example/demo/any-frame, whose metadata says it was trained with
    --condition_tasks any): the page offers every condition, and a first-and-last job runs."""
    config = RunConfig(prompt="", model_path=str(DEMO / "model"), lora_path=str(DEMO / "any-frame"), device="cpu")
    jobs = JobFolders(tmp_path / "jobs")
    engine = Engine.load(config, jobs, SMALL)
    assert engine.conditions == list(CONDITIONS)
    updates = list(engine.run(_request(condition="first_last")))  # no last frame
    assert updates[-1].stage == "failed" and "no last frame given" in updates[-1].error
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (48, 32), (200, 30, 30)).save(buffer, "PNG")
    (tmp_path / "last.png").write_bytes(buffer.getvalue())
    small = SampleConfig(num_frames=5, height=32, width=48, steps=3, guidance_scale=1.0)
    updates = list(engine.run(_request(condition="first_last", last_image=str(tmp_path / "last.png"), sample=small)))
    assert updates[-1].stage == "done", updates[-1].error
    with zipfile.ZipFile(updates[-1].archive) as zf:
        meta = json.loads(zf.read("result/00000.json"))
        assert {"input/image.png", "input/last.png"} <= set(zf.namelist())
    assert meta["given_frames"] == [0, 4] and meta["image"] == "input/image.png,input/last.png"
    jobs.close()


# --- app.py itself: its flags as the README tells them, its first settings ---------------------------------------


def _app_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_script", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_documents_every_flag_of_app_py():
    import re

    flags = {o for a in _app_module().build_parser()._actions for o in a.option_strings if o != "--help"}
    flags = {f for f in flags if f.startswith("--")}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The web page (app.py)") :]
    section = section[: section.index("\n## ", 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `--"))
    assert set(re.findall(r"`(--\w+)", table)) == flags
    assert "python app.py" in section and "docs/app.png" in section and (ROOT / "docs" / "app.png").is_file()
    assert (ROOT / "docs" / "app.png").stat().st_size < 300_000


def test_the_page_names_the_demos_folders_without_this_machines_paths(tmp_path):
    app = _app_module()
    config = RunConfig(prompt="p", model_path=str(app.DEMO_MODEL), sft_path=str(app.DEMO_MODEL / "transformer"))
    assert app.shown(config.model_path) == "example/demo/model"
    assert app.weights_line(config) == "fully fine-tuned transformer `example/demo/model/transformer`"
    assert str(ROOT) not in app.weights_line(config)
    assert app.shown(tmp_path / "model") == str(tmp_path / "model")  # a folder elsewhere, as given
    lora = str(tmp_path / "lora")
    assert app.weights_line(RunConfig(prompt="p", lora_path=lora)) == f"adapter `{lora}`"


def test_the_first_settings_are_the_demos_the_papers_or_the_flags():
    from fourdnex.generate.run import trained_size
    from fourdnex.model.adapters import read_transformer_meta

    app = _app_module()
    parser = app.build_parser()
    demo = trained_size(read_transformer_meta(app.DEMO_MODEL / "transformer"))
    assert demo == (25, 96, 144)  # what the demo model's weights say they were trained at
    assert app.initial_sample(parser.parse_args([]), demo) == SampleConfig(25, 96, 144, 30, 1.0)
    other = parser.parse_args(["--model_path", "./pretrained/Wan2.1-I2V-14B-480P-Diffusers"])
    assert app.initial_sample(other, None) == SampleConfig(49, 480, 720, 50, 5.0)  # the paper's
    assert app.initial_sample(other, (9, 32, 48)) == SampleConfig(9, 32, 48, 50, 5.0)  # weights trained elsewhere
    assert app.initial_sample(parser.parse_args(["--steps", "4", "--seed", "7"]), demo) == SampleConfig(
        25, 96, 144, 4, 1.0, seed=7
    )
    from fourdnex.errors import UsageError

    with pytest.raises(UsageError, match="num_frames must be 4k\\+1"):
        app.initial_sample(parser.parse_args(["--num_frames", "24"]), demo)
