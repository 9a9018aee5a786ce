"""Decoding videos with ``fourdnex.files.read_video``: FFmpeg's decoder threads on and off, at the demo recipe's
size (25 frames of 96 x 144) and a real clip's (49 frames of 480 x 720), one reader, several reader threads at once
(the cache build's readers and ``HeldCache``'s ``READ_THREADS``) and as many forked worker processes (their start and
the frames' way back included). Says which setting ``read_video`` picks.

    python bench/bench_video_read.py --json video_read.json

The floor is the plain decode of one reader times the readers (clips/s): what several readers reach if nothing
holds them back (Python's lock, the CPUs, the frames' way back).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex import files
from fourdnex.train.data import READ_THREADS

SIZES = {"demo": (25, 96, 144), "real": (49, 480, 720)}
#: THREADED_DECODE_PIXELS values that force each setting.
SETTINGS = {"threads": 0, "plain": 10**12}


def write_clips(folder: Path, size: tuple[int, int, int], count: int) -> list[Path]:
    """``count`` H.264 clips of moving gradients with noise (so that the encoder cannot skip the frames)."""
    frames, height, width = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        video = np.stack([
            (np.sin(x / 17 + t / 3 + i) + np.cos(y / 23 - t / 5)) * 60 + 128 + rng.normal(0, 8, (height, width))
            for t in range(frames)
        ]).clip(0, 255).astype(np.uint8)  # fmt: skip
        path = folder / f"{i:03d}.mp4"
        files.write_video(path, np.stack([video, 255 - video, video // 2], axis=-1))
        paths.append(path)
    return paths


def clips_per_second(paths: list[Path], readers: int, rounds: int, processes: bool = False) -> float:
    """Clips decoded per second, every clip ``rounds`` times, by ``readers`` threads (or forked worker processes,
    their start and the frames' way back to this process included)."""
    work = paths * rounds
    start = time.perf_counter()
    if readers == 1 and not processes:
        for path in work:
            files.read_video(path)
    elif processes:
        with ProcessPoolExecutor(readers, multiprocessing.get_context("fork")) as pool:
            list(pool.map(files.read_video, work, chunksize=4))
    else:
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(files.read_video, work))
    return len(work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="distinct clips of each size")
    parser.add_argument("--seconds", type=float, default=4.0, help="about how long each row decodes")
    parser.add_argument("--readers", type=int, nargs="+", default=[1, READ_THREADS])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    chosen = files.THREADED_DECODE_PIXELS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SIZES.items():
            folder = Path(tmp, name)
            folder.mkdir()
            paths = write_clips(folder, size, args.clips)
            picked = "threads" if size[1] * size[2] >= chosen else "plain"
            for readers in args.readers:
                for setting, threshold in SETTINGS.items():
                    for processes in (False, True) if readers > 1 else (False,):
                        files.THREADED_DECODE_PIXELS = threshold
                        files.read_video(paths[0])  # warm-up
                        probe = clips_per_second(paths[:2], readers, 1)
                        rounds = max(1, round(args.seconds * probe / len(paths)))
                        rate = clips_per_second(paths, readers, rounds, processes)
                        kind = "processes" if processes else "threads" if readers > 1 else "reader"
                        rows.append({"size": name, "frames_hw": size, "readers": readers, "reader_kind": kind,
                                     "decoder": setting, "clips_per_s": rate, "frames_per_s": rate * size[0],
                                     "read_video_picks": setting == picked})  # fmt: skip
                        print(f"{name} {size} {readers} {kind}, decoder {setting}: {rate:.1f} clips/s", flush=True)
            files.THREADED_DECODE_PIXELS = chosen
    plain_one = {r["size"]: r["clips_per_s"] for r in rows if r["readers"] == 1 and r["decoder"] == "plain"}
    print(f"\n{os.cpu_count()} CPUs; read_video threads frames of >= {chosen:,} pixels\n")
    print("| size | readers | decoder | clips/s | frames/s | floor (clips/s) | read_video's choice |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        floor = plain_one[r["size"]] * r["readers"]
        print(f"| {r['size']} {r['frames_hw'][0]} x {r['frames_hw'][1]} x {r['frames_hw'][2]} | {r['readers']} "
              f"{r['reader_kind']} | {r['decoder']} | {r['clips_per_s']:.1f} | {r['frames_per_s']:.0f} | {floor:.1f} | "
              f"{'yes' if r['read_video_picks'] else ''} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "threshold": chosen, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
