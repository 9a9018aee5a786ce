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
