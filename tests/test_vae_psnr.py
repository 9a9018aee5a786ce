"""bench/vae_psnr.py: a VAE's held-out PSNR per tree and size, against diffusers' own encode and decode."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT

from bench.vae_psnr import main
from fourdnex.data.synthetic import write_tree
from fourdnex.model.loading import load_vae
from fourdnex.train.vae import load_clips

DEMO = ROOT / "example" / "demo" / "model"


def independent_psnr(vae, clips: np.ndarray) -> float:
    """PSNR (peak-to-peak 2) of clips ``(N, F, H, W, 3)`` in [-1, 1] through diffusers' encode, mode and decode."""
    videos = torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3)  # (N, 3, F, H, W)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(videos).latent_dist.mode()).sample.clamp(-1, 1)
    return 10 * math.log10(4 / float((decoded - videos).square().mean()))


def test_each_tree_at_its_size_as_diffusers_codes_it(tmp_path):
    """The same two scenes written at 32 x 48 and at 64 x 96, each prepared at the size written: each row's PSNR of
    both modalities equals the one computed here through diffusers' AutoencoderKLWan from the prepared clips."""
    small = write_tree(tmp_path / "small", num_clips=2, num_frames=5, height=32, width=48, seed=2)
    large = write_tree(tmp_path / "large", num_clips=2, num_frames=5, height=64, width=96, seed=2)
    rows = main(["--model_path", str(DEMO), "--tree", str(small), "32", "48", "--tree", str(large), "64", "96",
                 "--num_frames", "5", "--device", "cpu", "--json", str(tmp_path / "out.json")])  # fmt: skip
    assert [(r["height"], r["width"], r["clips"]) for r in rows] == [(32, 48, 2), (64, 96, 2)]
    vae = load_vae(DEMO).eval()
    for row, tree, size in zip(rows, (small, large), ((32, 48), (64, 96)), strict=True):
        clips = load_clips(tree, 5, *size, None, 1)
        assert row["rgb"] == pytest.approx(independent_psnr(vae, clips.rgb / 127.5 - 1), abs=1e-3)
        assert row["xyz"] == pytest.approx(independent_psnr(vae, clips.xyz.astype(np.float32)), abs=1e-3)
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == rows
