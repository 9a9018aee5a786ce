"""Shared fixtures: the bundled tiny random Wan2.1-I2V model and a loaded pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "example" / "tiny-wan-i2v"
#: A small sampling setting the tiny model runs in well under a second.
SMALL = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 3, "guidance_scale": 5.0}


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture(scope="session")
def example_image():
    from PIL import Image

    with Image.open(ROOT / "example" / "scene.png") as image:
        return image.convert("RGB")


@pytest.fixture
def tiny_pipe():
    """A fresh float32 pipeline on the tiny model (fresh: adapters change the transformer in place)."""
    from fourdnex.generate.pipeline import load_pipeline

    pipe = load_pipeline(TINY, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A tiny training cache of two clips, built by build_wan_dataset.py."""
    from train_cache import build_cache

    return build_cache(tmp_path_factory.mktemp("cache"), num_clips=2)


@pytest.fixture(scope="session")
def overfit_run(cache_dir, tmp_path_factory) -> Path:
    """finetune.py's overfit run (training_support.overfit_args), shared by the tests that read what it wrote."""
    from training_support import finetune, overfit_args

    out = tmp_path_factory.mktemp("overfit")
    finetune(*overfit_args(cache_dir, out))
    return out
