"""The VAE's round trip of the truth: the best any transformer on a model's VAE can score.

For clip i (id order, the numbering of :mod:`fourdnex.evaluation.inputs`) of ``--gt`` it prepares the clip as training
does (its RGB video and its normalized pointmap video), encodes both with the model's VAE, decodes the posterior's
mode and writes the two decoded videos as result i of ``--out`` (the result format of
:mod:`fourdnex.geometry.results`). A transformer that produced exactly the truth's latents would produce these
results, so ``evaluate.py`` on them gives the VAE's ceiling: what no amount of transformer training on this VAE
gets past.

    python -m fourdnex.evaluation.roundtrip --model_path demo-model --gt held-out/data --out results/vae \\
        --num_frames 25 --height 96 --width 144
    python evaluate.py --results results/vae --gt held-out/data --mapping held-out/inputs/mapping.json --out reports/vae
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fourdnex.cli import run
from fourdnex.config import check_video_shape
from fourdnex.evaluation.truth import clip_sources
from fourdnex.runtime import device_of


def write_round_trips(
    model_path: str | Path, gt: str | Path, out: str | Path, num_frames: int, height: int, width: int,
    device: str = "auto", batch_size: int = 4,
) -> int:  # fmt: skip
    """Write the round trip of every clip of ``gt`` into ``out``; returns how many clips."""
    import torch
    from tqdm.auto import tqdm

    from fourdnex.data.prepare import as_videos, prepare_clip
    from fourdnex.data.sources import Captions, read_clip
    from fourdnex.geometry.results import write_sample
    from fourdnex.model.fusion import vae_round_trip
    from fourdnex.model.loading import check_model_folder, load_vae

    check_video_shape(num_frames, height, width)
    check_model_folder(model_path, ("vae",), how="give a model folder with a vae/ subfolder")
    sources = sorted(clip_sources(gt).items())
    vae = load_vae(model_path, torch.float32).to(device_of(device)).eval()
    captions = Captions(gt)
    Path(out).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(sources), desc="VAE round trips", unit="clip")
    for start in range(0, len(sources), batch_size):
        batch = [source for _, source in sources[start : start + batch_size]]
        clips = [prepare_clip(source, read_clip(source, captions), num_frames, height, width) for source in batch]
        rgb = torch.from_numpy(np.stack([clip.rgb for clip in clips]))
        xyz = torch.from_numpy(np.stack([clip.pointmap for clip in clips]))
        decoded = vae_round_trip(vae, as_videos(rgb, xyz)).permute(0, 2, 3, 4, 1).cpu().numpy()  # (2B, F, H, W, 3)
        for j, clip in enumerate(clips):
            meta = {"clip_id": clip.source.id, "prompt": clip.caption, "model": str(model_path), "vae_round_trip": True}
            write_sample(out, start + j, (decoded[j] + 1) / 2, decoded[len(clips) + j], meta)
            bar.update()
    bar.close()
    return len(sources)


def main(args: argparse.Namespace) -> None:
    """Write the round trips and say where."""
    count = write_round_trips(
        args.model_path, args.gt, args.out, args.num_frames, args.height, args.width, args.device, args.batch_size
    )
    print(f"wrote the VAE round trips of {count} clips to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.evaluation.roundtrip``."""
    p = argparse.ArgumentParser(
        prog="fourdnex.evaluation.roundtrip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_path", required=True, help="a model folder; its vae/ is used")
    p.add_argument("--gt", required=True, help="a 4DNeX-10M data folder")
    p.add_argument("--out", required=True, help="where the results go")
    p.add_argument("--num_frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480, help="per modality")
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--batch_size", type=int, default=4, help="clips per VAE call")
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cuda, cuda:N or cpu")
    return p


if __name__ == "__main__":
    run(main, build_parser())
