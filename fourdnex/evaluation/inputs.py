"""Inference inputs for the clips of a ground-truth tree: what ``inference.py`` generates from and ``evaluate.py``
scores against that tree.

For clip i (id order) of ``--gt`` it writes into ``--out``, at the size and frame count the results will have:

    images/{i:05d}.png   frame 0 as training prepares it (the image of image-to-4D)
    videos/{i:05d}.mp4   the prepared clip's frames (the condition of 4D reconstruction, or of --frames)
    prompts.txt          the clips' captions, one per line
    images.txt           the images, one per line;  videos.txt: the videos, one per line
    mapping.json         result number -> clip id, for ``evaluate.py --mapping``

    python -m fourdnex.evaluation.inputs --gt held-out/data --out held-out/inputs --num_frames 25 --height 96 \\
        --width 144
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fourdnex.cli import run
from fourdnex.config import check_video_shape
from fourdnex.data.sources import Captions
from fourdnex.evaluation.truth import clip_sources, load_truth
from fourdnex.files import write_json, write_png, write_text, write_video


def write_inputs(gt: str | Path, out: str | Path, num_frames: int, height: int, width: int) -> int:
    """Write the inputs of every clip of ``gt`` into ``out``; returns how many clips."""
    from tqdm.auto import tqdm

    check_video_shape(num_frames, height, width)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(exist_ok=True)
    captions = Captions(gt)
    prompts, images, videos, mapping = [], [], [], {}
    for i, (clip_id, source) in enumerate(tqdm(sorted(clip_sources(gt).items()), desc="inputs", unit="clip")):
        truth = load_truth(gt, source, num_frames, height, width)
        write_png(out / "images" / f"{i:05d}.png", truth.rgb[0])
        write_video(out / "videos" / f"{i:05d}.mp4", truth.rgb)
        prompts.append(captions.caption(source)[1])
        images.append(f"images/{i:05d}.png")
        videos.append(f"videos/{i:05d}.mp4")
        mapping[f"{i:05d}"] = clip_id
    for name, lines in (("prompts.txt", prompts), ("images.txt", images), ("videos.txt", videos)):
        write_text(out / name, "".join(line + "\n" for line in lines))
    write_json(out / "mapping.json", mapping)
    return len(mapping)


def main(args: argparse.Namespace) -> None:
    """Write the inputs and say where."""
    count = write_inputs(args.gt, args.out, args.num_frames, args.height, args.width)
    print(f"wrote the inputs of {count} clips to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.evaluation.inputs``."""
    p = argparse.ArgumentParser(
        prog="fourdnex.evaluation.inputs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gt", required=True, help="a 4DNeX-10M data folder")
    p.add_argument("--out", required=True, help="where the inputs go")
    p.add_argument("--num_frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480, help="per modality")
    p.add_argument("--width", type=int, default=720)
    return p


if __name__ == "__main__":
    run(main, build_parser())
