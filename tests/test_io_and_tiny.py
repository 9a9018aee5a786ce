"""Atomic writes, the result file format, and the bundled tiny model's reproducibility."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline

from fourdnex.io import atomic_path, write_json
from fourdnex.pointmap import ResultError, find_results, load_result, save_result
from fourdnex.tiny_model import TINY_MARKER, build_tiny_pipeline


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o044  # readable by others, like any file the user writes


def test_result_round_trip_and_validation(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    xyz = np.random.default_rng(1).uniform(-1, 1, (3, 4, 5, 3)).astype(np.float32)
    path = save_result(tmp_path, 7, rgb, xyz, {"prompt": "p"})
    assert path.name == "00007.npz" and find_results(tmp_path) == [path]
    result = load_result(path)
    assert np.array_equal(result.rgb, rgb) and np.array_equal(result.xyz, xyz) and result.meta == {"prompt": "p"}
    with pytest.raises(ResultError, match="xyz must match"):
        save_result(tmp_path, 8, rgb, xyz[:, :2], {})
    bad = xyz.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ResultError, match="NaN"):
        save_result(tmp_path, 9, rgb, bad, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007.json", "00007.npz"]


def test_bundled_tiny_model_is_the_deterministic_build(tiny_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index[TINY_MARKER] is True
    bundled = WanImageToVideoPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    rebuilt = build_tiny_pipeline()
    for name in ("transformer", "vae", "text_encoder", "image_encoder"):
        ours, theirs = getattr(rebuilt, name).state_dict(), getattr(bundled, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    text = "a dog runs across a sunny park POINTMAP_STYLE."
    assert rebuilt.tokenizer(text).input_ids == bundled.tokenizer(text).input_ids
