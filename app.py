"""Image to 4D in the browser: one page to upload an image (or pick a held-out example), caption it, generate, and
look at the result: the RGB and XYZ videos, the registered dynamic point cloud with its cameras in the Rerun web
viewer, a novel view, the recovered focal length and the consistency metrics, and one archive to download.

    python app.py                                    # the bundled demo model on this machine's CPU
    python app.py --model_path ./pretrained/Wan2.1-I2V-14B-480P-Diffusers --lora_path ./pretrained/4dnex-lora

Then open http://127.0.0.1:7860. The page is layout only: every job runs fourdnex.app.engine (the package calls of
inference.py, pm_registration.py, render.py and evaluate.py); the models load once, and jobs run one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from fourdnex.cli import dtype_flag, field_default, field_flag, run, settings, switch
from fourdnex.generate.config import DEFAULT_FRAMES, MEMORY_MODES, AccelerationConfig, RunConfig, SampleConfig

ROOT = Path(__file__).resolve().parent
DEMO_MODEL = ROOT / "example" / "demo" / "model"
#: The page's steps and guidance for the demo model: the quick start's (README.md; their time on a CPU: BENCHMARKS.md,
#: "The web page (app.py)").
DEMO_SAMPLE = SampleConfig(steps=30, guidance_scale=1.0)
#: For any other model: the paper's (inference.py's defaults).
PAPER_SAMPLE = SampleConfig()
#: The size the page starts at for weights that record none (the paper's: inference.py's, from a 3:2 image).
PAPER_SIZE = (DEFAULT_FRAMES, 480, 720)
MAX_FRAMES, MAX_SIDE = 81, 832  # the sliders' ends (Wan2.1's longest clip; 832 x 480 is Wan's 16:9 size)


def initial_sample(args: argparse.Namespace, trained: tuple[int, int, int] | None) -> SampleConfig:
    """The page's first settings: the flags given, else the demo's steps and guidance for the demo model (the
    paper's for any other), at the size ``trained`` (frames, height, width) the weights were trained at where they
    record it (:func:`fourdnex.generate.run.trained_size`), else at the paper's."""
    base = DEMO_SAMPLE if Path(args.model_path).resolve() == DEMO_MODEL else PAPER_SAMPLE
    frames, height, width = trained or PAPER_SIZE
    base = dataclasses.replace(base, num_frames=frames, height=height, width=width)
    names = ("num_frames", "height", "width", "steps", "guidance_scale", "seed")
    sample = SampleConfig(**{n: getattr(args, n) if getattr(args, n) is not None else getattr(base, n) for n in names})
    sample.validate()
    return sample


def shown(path: str | Path) -> str:
    """A folder as the page names it: relative to this checkout where it lies inside it (the demo's folders, with no
    path of the machine serving the page), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def weights_line(config: RunConfig) -> str:
    """What the page and the log say the model samples with: its adapter, or its fully fine-tuned transformer."""
    if config.lora_path:
        return f"adapter `{shown(config.lora_path)}`"
    if config.sft_path:
        return f"fully fine-tuned transformer `{shown(config.sft_path)}`"
    return "no adapter (the base model)"


def build_page(engine, sample: SampleConfig, examples):
    """The page: inputs on the left, results on the right; every event calls the package."""
    import gradio as gr

    from fourdnex.app.engine import CONDITIONS, JobRequest
    from fourdnex.app.uploads import UploadError, check_image
    from fourdnex.app.viewer import viewer_html
    from fourdnex.geometry.paths import CAMERA_PATHS

    conditions = engine.conditions
    with gr.Blocks(title="fourdnex: image to 4D") as page:
        gr.Markdown(
            "## fourdnex: image to 4D\nAn image and a caption in; an RGB video and a pointmap (XYZ) video out, "
            "registered into a dynamic point cloud with its cameras, seen from a new camera, scored, and packed to "
            f"download. Model: `{shown(engine.config.model_path)}`, {weights_line(engine.config)} on "
            f"{engine.model.device}."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                condition = gr.Radio(
                    [(CONDITIONS[c], c) for c in conditions],
                    value="image",
                    label="condition",
                    visible=len(conditions) > 1,
                    elem_id="condition",
                )
                image = gr.File(label="image (PNG, JPEG, WebP, BMP, GIF)", type="filepath", elem_id="image")
                last = gr.File(label="last frame", type="filepath", visible=False, elem_id="last-image")
                video = gr.File(label="video", type="filepath", visible=False, elem_id="video")
                preview = gr.Image(label="what the model sees first", interactive=False, height=200)
                caption = gr.Textbox(label="caption", lines=3, elem_id="caption")
                if examples:
                    gr.Examples(
                        [[str(e.image), e.caption] for e in examples],
                        [image, caption],
                        label="held-out examples (the model never saw them)",
                    )
                with gr.Accordion("sampling settings", open=False):
                    frames = gr.Slider(5, MAX_FRAMES, sample.num_frames, step=4, label="frames (4k+1)")
                    with gr.Row():
                        height = gr.Slider(16, MAX_SIDE, sample.height, step=16, label="height")
                        width = gr.Slider(16, MAX_SIDE, sample.width, step=16, label="width")
                    steps = gr.Slider(1, 100, sample.steps, step=1, label="denoising steps")
                    guidance = gr.Slider(1.0, 10.0, sample.guidance_scale, step=0.5, label="guidance scale (1: none)")
                    seed = gr.Number(sample.seed, precision=0, label="seed")
                    path = gr.Dropdown(list(CAMERA_PATHS), value="orbit", label="novel view: camera path")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                with gr.Row():
                    rgb = gr.Video(label="RGB", autoplay=True, loop=True, elem_id="rgb-video")
                    xyz = gr.Video(label="XYZ (the pointmap as colours)", autoplay=True, loop=True, elem_id="xyz-video")
                viewer = gr.HTML(viewer_html(None), label="registered point cloud and cameras", elem_id="viewer")
                with gr.Row():
                    novel = gr.Video(label="novel view: input | new camera", autoplay=True, loop=True, elem_id="novel")
                    camera = gr.Markdown(elem_id="camera")
                metrics = gr.Dataframe(
                    headers=["metric", "model", "sloped plane (floor)", "better", "definition"],
                    label="consistency metrics (no ground truth needed)",
                    wrap=True,
                    column_widths=["19%", "11%", "13%", "11%", "46%"],
                    elem_id="metrics",
                )
                archive = gr.File(
                    label="download: result, registration, exports (PLY, COLMAP, nerfstudio), novel view, metrics",
                    elem_id="archive",
                )

        def show_inputs(mode):
            return (
                gr.update(visible=mode != "video"),
                gr.update(visible=mode == "first_last"),
                gr.update(visible=mode == "video"),
            )

        def check_upload(path):
            if not path:
                return None, ""
            try:
                return check_image(path), ""
            except UploadError as err:
                return None, f"**refused:** {err}"

        def generate(mode, first, final, clip, text, f, h, w, s, g, sd, camera_path, progress=gr.Progress()):  # noqa: B008
            settings = SampleConfig(int(f), int(h), int(w), int(s), float(g), seed=int(sd or 0))
            request = JobRequest(text, first, final, clip, mode, settings, camera_path)
            yield {status: "starting...", rgb: None, xyz: None, viewer: viewer_html(None), novel: None, camera: "",
                   metrics: None, archive: None}  # fmt: skip
            for update in engine.run(request, lambda done, total, what: progress((done, total), desc=what)):
                shown = {status: update.status}
                for component, value in (
                    (rgb, update.rgb_video),
                    (xyz, update.xyz_video),
                    (novel, update.novel_video),
                    (camera, update.camera),
                    (metrics, update.metrics),
                    (archive, update.archive),
                ):
                    if value is not None:
                        shown[component] = str(value) if isinstance(value, Path) else value
                if update.recording is not None:
                    shown[viewer] = viewer_html(update.recording)
                yield shown

        condition.change(show_inputs, condition, [image, last, video])
        image.change(check_upload, image, [preview, status])
        last.change(check_upload, last, [preview, status])
        inputs = [condition, image, last, video, caption, frames, height, width, steps, guidance, seed, path]
        outputs = [status, rgb, xyz, viewer, novel, camera, metrics, archive]
        button.click(generate, inputs, outputs, concurrency_limit=1)
    return page


def main(args: argparse.Namespace) -> None:
    """Say where the app listens, load the model once, serve the page until Ctrl-C."""
    from fourdnex.app.web import exposure_warning

    warning = exposure_warning(args.host, args.port)
    if warning:
        print(warning, flush=True)
    from fourdnex.app.jobs import JobFolders
    from fourdnex.generate.run import trained_size, with_own_transformer
    from fourdnex.model.adapters import trained_meta_at

    config = with_own_transformer(settings(RunConfig, args, prompt="", speed=settings(AccelerationConfig, args)))
    sample = initial_sample(args, trained_size(trained_meta_at(config.lora_path, config.sft_path)))
    jobs = JobFolders()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # a stop by `kill` removes the jobs too
    os.environ["GRADIO_TEMP_DIR"] = str(jobs.root / "gradio")  # uploads and Gradio's copies, removed with the jobs
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import uvicorn

        from fourdnex.app.engine import Engine, find_examples
        from fourdnex.app.viewer import web_viewer_files
        from fourdnex.app.web import build_app

        print(f"loading {args.model_path} ({weights_line(config)}) ...", flush=True)
        engine = Engine.load(config, jobs, sample)
        if args.examples is not None:
            examples = find_examples(args.examples)
        else:
            examples = find_examples(Path(args.model_path).parent) or find_examples(ROOT / "example")
        page = build_page(engine, sample, examples)
        app = build_app(page, jobs, web_viewer_files(jobs.root), jobs.ttl_s)
        jobs.start_sweeping()
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"open http://{shown}:{args.port} (Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        jobs.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="app.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_path", default=str(DEMO_MODEL), help="Wan2.1-I2V diffusers folder (default: the demo)")
    field_flag(
        p, RunConfig, "lora_path", help="adapter, as inference.py's (the demo model needs none: it is fully fine-tuned)"
    )
    field_flag(p, RunConfig, "lora_scale", type=float, help="LoRA scale (default: the adapter's own)")
    p.add_argument(
        "--examples",
        default=None,
        help="folder with prompt.txt and image.txt (inference.py's lists) whose lines the page offers as examples "
        "(default: the model folder's parent where it has them, e.g. example/demo, else example/)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network interface)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    page = p.add_argument_group(
        "the page's first settings (default: the size the weights were trained at where they record it, else 49 "
        "frames of 480 x 720; the quick start's steps and guidance for the demo, else the paper's)"
    )
    page.add_argument("--num_frames", type=int, default=None, help="frames, 4k+1")
    page.add_argument("--height", type=int, default=None, help="per-modality height")
    page.add_argument("--width", type=int, default=None, help="per-modality width")
    page.add_argument("--steps", type=int, default=None, help="denoising steps (demo 30, else 50)")
    page.add_argument("--guidance_scale", type=float, default=None, help="(demo 1, else 5)")
    page.add_argument("--seed", type=int, default=None, help=f"(default {field_default(SampleConfig, 'seed')})")
    hw = p.add_argument_group("hardware (as inference.py's)")
    field_flag(hw, RunConfig, "device", help="auto, cuda, cuda:N or cpu (default auto: cuda when available)")
    dtype_flag(hw, RunConfig, "dtype", help="(default auto)")
    field_flag(hw, AccelerationConfig, "memory", choices=["auto", *MEMORY_MODES], help="(default auto: what fits)")
    field_flag(hw, AccelerationConfig, "compile", type=switch, metavar="{auto,on,off}", help="regional torch.compile")
    field_flag(hw, AccelerationConfig, "fp8", action="store_true", help="float8 transformer weights (approximate)")
    return p


if __name__ == "__main__":
    run(main, build_parser(), sys.argv[1:])
