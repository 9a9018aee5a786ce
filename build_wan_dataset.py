"""Build the training cache from 4DNeX-10M clips: cropped videos, normalized pointmaps (with what undoes the
normalization), Wan VAE latents of RGB, XYZ and the condition, CLIP and UMT5 embeddings, lists, manifest, and the
XYZ latent statistics. The clip layouts read are listed in fourdnex/data/sources.py, the cache layout is specified in
fourdnex/data/cache.py (``python -m fourdnex.data.cache`` prints it); the README has both tables.

    python build_wan_dataset.py --data_dir ./data --out ./cache \\
        --model_path ./pretrained/Wan2.1-I2V-14B-480P-Diffusers --num_frames 49

Shards: run with --num_tasks N --task_idx i (i = 0 .. N-1), e.g. one per GPU; the last shard to finish writes the
lists and statistics (or run once more with --merge). A re-run skips finished clips. A run that tried clips and
cached none of them exits non-zero.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fourdnex.cli import dtype_flag, field_flag, run, settings
from fourdnex.data.build import ENCODER_DTYPES, BuildConfig, build, merge_shards
from fourdnex.data.cache import FAILURE_FILE, FAILURES_FILE
from fourdnex.data.prepare import CENTER_MODES
from fourdnex.data.sources import ClipError


def main(args: argparse.Namespace) -> None:
    """Build (one shard of) the cache, or only merge the shards' outputs with ``--merge``; a run whose every clip
    failed exits non-zero after its summary."""
    cfg = settings(BuildConfig, args)
    cfg.validate()
    if args.merge:
        result = merge_shards(cfg.data_dir, cfg.out, cfg.limit)
        print(f"merged {result.done} clips, {result.failed} failed")
        return
    summary = build(cfg)
    print(summary.line())
    if summary.failed_now and not summary.processed:
        reasons = Path(cfg.out) / (FAILURES_FILE if summary.merged else FAILURE_FILE)
        raise ClipError(f"none of the {summary.failed_now} clips this run tried could be cached (reasons: {reasons})")
    if not summary.merged:
        print("lists and stats.json are written when every clip is done (by the last shard, or with --merge)")


def build_parser() -> argparse.ArgumentParser:
    """The command line (snake_case flags; the reference's flags keep working); every default is a BuildConfig
    field's."""
    parser = argparse.ArgumentParser(
        prog="build_wan_dataset.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    field_flag(parser, BuildConfig, "data_dir", required=True, help="4DNeX-10M root: dynamic/ static/ raw/ caption/")
    field_flag(parser, BuildConfig, "out", required=True, help="the cache folder")
    field_flag(parser, BuildConfig, "model_path", help="Wan2.1-I2V in diffusers layout (default %(default)s)")
    field_flag(parser, BuildConfig, "num_tasks", type=int, help="number of shards")
    field_flag(parser, BuildConfig, "task_idx", type=int, help="this shard, 0 .. num_tasks - 1")
    field_flag(parser, BuildConfig, "resolution_h", type=int)
    field_flag(parser, BuildConfig, "resolution_w", type=int)
    field_flag(parser, BuildConfig, "num_frames", type=int, help="frames per clip (training uses 49)")
    field_flag(parser, BuildConfig, "cond_num_frames", type=int, help="condition frames (min(49, num_frames))")
    field_flag(parser, BuildConfig, "limit", type=int, help="only the first N clips (in id order)")
    field_flag(parser, BuildConfig, "device", help="auto, cuda, cuda:N or cpu (default auto: cuda when available)")
    dtype_flag(
        parser,
        BuildConfig,
        "dtype",
        help="the text encoder's dtype (default auto: bfloat16 on GPU, float32 on CPU)",
    )
    dtype_flag(
        parser,
        BuildConfig,
        "encoder_dtype",
        tuple(ENCODER_DTYPES),
        help="the VAE's and CLIP's dtype: float32 (default: the latents inference's and training's float32 VAE "
        "computes) or bfloat16 (faster on a GPU; latents 0.3-0.4 %% of their spread away, RMS)",
    )
    field_flag(
        parser,
        BuildConfig,
        "center",
        choices=CENTER_MODES,
        help="pointmap centring: clip (one centre, box and scale per clip: static points stay put) or per_frame "
        "(the reference's, for an adapter compatible with the released one)",
    )
    field_flag(parser, BuildConfig, "batch_size", type=int, help="clips per VAE call")
    field_flag(
        parser,
        BuildConfig,
        "num_workers",
        type=int,
        help="processes that read, crop and write the videos of clips ahead of the encoders (0: in this process)",
    )
    field_flag(parser, BuildConfig, "retry_failed", action="store_true", help="try clips that failed before again")
    parser.add_argument("--merge", action="store_true", help="only combine the shards' records into lists and stats")
    return parser


if __name__ == "__main__":
    run(main, build_parser())
