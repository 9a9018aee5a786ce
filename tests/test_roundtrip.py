"""The VAE's round trip of the truth (fourdnex.evaluation.roundtrip): each result is the truth's prepared RGB and
pointmap videos through the model's VAE, numbered as the evaluation inputs number the clips."""

import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT
from diffusers import AutoencoderKLWan

from fourdnex.data.prepare import prepare_clip
from fourdnex.data.sources import Captions, find_clips, read_clip
from fourdnex.data.synthetic import write_tree
from fourdnex.evaluation.inputs import write_inputs
from fourdnex.evaluation.roundtrip import write_round_trips
from fourdnex.evaluation.truth import read_mapping
from fourdnex.geometry.results import load_result
from fourdnex.model.presets import save_model

SIZE = (9, 32, 48)


def test_round_trips_are_the_truth_through_diffusers_vae_numbered_as_the_inputs(tmp_path):
    data = write_tree(tmp_path / "gt", 3, *SIZE)
    model = save_model(tmp_path / "model", "tiny")
    assert write_round_trips(model, data, tmp_path / "rt", *SIZE, device="cpu", batch_size=2) == 3
    write_inputs(data, tmp_path / "inputs", *SIZE)
    mapping = read_mapping(tmp_path / "inputs" / "mapping.json")
    vae = AutoencoderKLWan.from_pretrained(model / "vae", dtype=torch.float32).eval()
    sources = {clip.id: clip for clip in find_clips(data).clips}
    for number, clip_id in mapping.items():
        result = load_result(tmp_path / "rt" / f"{number}.npz")
        assert result.meta["clip_id"] == clip_id
        clip = prepare_clip(sources[clip_id], read_clip(sources[clip_id], Captions(data)), *SIZE)
        for video, got, tolerance in ((clip.rgb / 127.5 - 1, result.rgb / 127.5 - 1, 1 / 127.5),
                                      (clip.pointmap, result.xyz, 1e-5)):  # fmt: skip
            x = torch.from_numpy(np.asarray(video, np.float32)).permute(3, 0, 1, 2)[None]
            with torch.no_grad():
                expected = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[0].permute(1, 2, 3, 0)
            assert np.abs(got - expected.numpy()).max() <= tolerance + 1e-6


def test_a_folder_without_a_vae_is_refused_in_one_line(tmp_path):
    data = write_tree(tmp_path / "gt", 1, *SIZE)
    (tmp_path / "empty").mkdir()
    command = [sys.executable, "-m", "fourdnex.evaluation.roundtrip", "--model_path", str(tmp_path / "empty")]
    command += ["--gt", str(data), "--out", str(tmp_path / "rt"), "--num_frames", "9", "--height", "32"]
    command += ["--width", "48"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "vae" in done.stderr
    assert not (tmp_path / "rt").exists()
