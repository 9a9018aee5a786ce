"""Atomic writes, video round trips, the result file format, and the bundled tiny model's reproducibility."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from transformers import T5Tokenizer

from fourdnex.files import atomic_path, read_npz, read_video, write_json, write_npz, write_video
from fourdnex.geometry.results import ResultError, find_results, load_result, save_result
from fourdnex.model.loading import RANDOM_MARKER
from fourdnex.model.presets import build_pipeline


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


def _smooth_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Slowly drifting colour gradients, ``(F, H, W, 3)`` uint8: content a video codec keeps well."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    rgb = np.stack([0.7 * x + 0.03 * t, 0.4 + 0.5 * x * y, 0.8 - 0.5 * y + 0.02 * t], axis=-1)
    return np.round(255 * np.clip(rgb, 0, 1)).astype(np.uint8)


@pytest.mark.parametrize(("height", "width", "pix_fmt"), [(32, 48, "yuv420p"), (33, 47, "yuv444p")])
def test_video_round_trip_keeps_size_frames_and_fps(tmp_path, height, width, pix_fmt):
    frames = _smooth_frames(9, height, width)
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    assert list(tmp_path.iterdir()) == [path]
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # Measured mean absolute error: 1.9 at 32 x 48 (yuv420p), 1.3 at 33 x 47 (yuv444p); 3 leaves room for other
    # FFmpeg builds and still fails a frame shifted by one (4.2 apart here) or swapped red and blue (42).
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    np.testing.assert_array_equal(read_video(path, [7, 2, 7]), decoded[[7, 2, 7]])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 24 and stream.frames == 9 and stream.codec_context.pix_fmt == pix_fmt
    with pytest.raises(ValueError, match="ends before frame 9"):
        read_video(path, [8, 9])


def test_the_same_frames_make_the_same_video(tmp_path):
    """libx264's default macroblock tree made this writer code a rendered scene differently from call to call."""
    from fourdnex.data.synthetic import render_scene

    frames = render_scene(700008, 25, 96, 144).rgb  # made 6 different videos in 6 writes
    decoded = set()
    for i in range(6):
        write_video(tmp_path / f"{i}.mp4", frames)
        decoded.add(read_video(tmp_path / f"{i}.mp4").tobytes())
    assert len(decoded) == 1


def test_failed_video_write_leaves_no_file(tmp_path):
    path = tmp_path / "clip.mp4"
    with pytest.raises(av.FFmpegError):  # libx264 refuses a frame 20000 pixels wide once the file is open
        write_video(path, np.zeros((2, 2, 20000, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
    frames = _smooth_frames(3, 32, 48)
    write_video(path, frames)
    with pytest.raises(av.FFmpegError):
        write_video(path, np.zeros((2, 2, 20000, 3), np.uint8))
    assert list(tmp_path.iterdir()) == [path] and read_video(path).shape == frames.shape  # the old file is intact
    with pytest.raises(ValueError, match="uint8"):
        write_video(path, frames.astype(np.float32))


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
    assert index[RANDOM_MARKER] is True
    bundled = WanImageToVideoPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    rebuilt = build_pipeline("tiny")
    for name in ("transformer", "vae", "text_encoder", "image_encoder"):
        ours, theirs = getattr(rebuilt, name).state_dict(), getattr(bundled, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    text = "a dog runs across a sunny park POINTMAP_STYLE."
    assert rebuilt.tokenizer(text).input_ids == bundled.tokenizer(text).input_ids


def test_a_model_assembled_from_trained_components_stores_them_in_half_precision(tmp_path):
    from safetensors.torch import load_file

    from fourdnex.model.loading import load_transformer, load_vae
    from fourdnex.model.presets import save_model

    pipe = build_pipeline("tiny")
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.25)  # "trained": other values than the preset's
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    pipe.vae.save_pretrained(tmp_path / "vae")
    random = save_model(tmp_path / "random", "tiny")
    assert json.loads((random / "model_index.json").read_text())[RANDOM_MARKER] is True
    model = save_model(
        tmp_path / "model", "tiny", trained={"vae": tmp_path / "vae", "transformer": tmp_path / "transformer"}
    )
    assert RANDOM_MARKER not in json.loads((model / "model_index.json").read_text())
    stored = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    loaded = load_transformer(model, torch.float32).state_dict()
    for name, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(loaded[name], value.half().float(), rtol=0, atol=0)
    assert load_vae(model).dtype == torch.float32


def test_a_model_built_with_another_models_encoders_has_exactly_them(tmp_path, tiny_path):
    """--encoders_from: the tokenizer and the text and image encoders are the given folder's, not the seed's or the
    corpus's (a model trained further keeps the encoders it learned with); another width than the transformer reads
    is refused in one line."""
    from safetensors.torch import load_file

    from fourdnex.errors import UsageError
    from fourdnex.model.presets import SEED, build_parser, main

    corpus = tmp_path / "captions.txt"
    corpus.write_text("On striped sandy ground a mottled teal pillar slides and turns.\n")
    model = tmp_path / "model"
    main(
        build_parser().parse_args(
            [str(model), "--seed", str(SEED + 1), "--corpus", str(corpus), "--encoders_from", str(tiny_path)]
        )
    )
    for name in ("text_encoder", "image_encoder"):
        ours, theirs = (load_file(folder / name / "model.safetensors") for folder in (model, tiny_path))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    query = "encoder.block.0.layer.0.SelfAttention.q.weight"
    seeds = build_pipeline("tiny", SEED + 1).text_encoder.state_dict()[query]
    assert not torch.equal(load_file(model / "text_encoder" / "model.safetensors")[query], seeds)  # not the seed's
    taken, source = (T5Tokenizer.from_pretrained(folder / "tokenizer") for folder in (model, tiny_path))
    assert taken.tokenize("a mottled pillar") == source.tokenize("a mottled pillar")  # not the corpus's
    with pytest.raises(UsageError, match="text_dim 64"):
        main(build_parser().parse_args([str(tmp_path / "demo"), "--preset", "demo", "--encoders_from", str(tiny_path)]))


def test_a_model_tokenizer_knows_the_words_of_its_corpus(tmp_path):
    """--corpus: a caption's words are whole pieces of the tokenizer of a model built with it; elsewhere they fall
    back to characters."""
    from fourdnex.model.presets import build_parser, main

    corpus = tmp_path / "captions.txt"
    corpus.write_text("On striped sandy ground a mottled teal pillar slides and turns.\n")
    main(build_parser().parse_args([str(tmp_path / "model"), "--corpus", str(corpus)]))
    known = T5Tokenizer.from_pretrained(tmp_path / "model" / "tokenizer")
    toy = build_pipeline("tiny").tokenizer
    assert known.tokenize("a mottled pillar") == ["\u2581a", "\u2581mottled", "\u2581pillar"]
    assert len(toy.tokenize("mottled")) > 1 and "<unk>" not in toy.tokenize("mottled")


ROOT = Path(__file__).resolve().parents[1]


def _readme_table_names(heading: str) -> list[str]:
    """The first column's backquoted names of the first table after ``heading`` in the README."""
    lines = (ROOT / "README.md").read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return [row.split("|")[1].strip().strip("`") for row in lines[start + 2 : end]]


def test_result_registration_and_adapter_files_hold_what_their_specs_list(tmp_path):
    """Each writer writes exactly the keys its format's spec lists, and the README's tables list the same."""
    import dataclasses

    from safetensors import safe_open

    from fourdnex.geometry.results import REGISTRATION_ARRAYS, RESULT_ARRAYS, save_registration
    from fourdnex.model.adapters import DOMAIN_KEY, AdapterMeta, save_adapter

    frames = np.zeros((2, 4, 5, 3), np.uint8)
    path = save_result(tmp_path, 0, frames, np.zeros((2, 4, 5, 3), np.float32), {})
    with np.load(path) as data:
        assert set(data.files) == set(RESULT_ARRAYS)
    arrays = {"K": np.zeros((2, 3, 3)), "cam2world": np.zeros((2, 4, 4)), "depth": np.zeros((2, 4, 5)),
              "points": np.zeros((2, 4, 5, 3)), "residual": np.zeros((2, 4, 5)),
              "frame_index": np.arange(2)}  # fmt: skip
    save_registration(tmp_path / "00000_reg.npz", arrays, {})
    with np.load(tmp_path / "00000_reg.npz") as data:
        assert set(data.files) == set(REGISTRATION_ARRAYS)
    assert _readme_table_names("`NNNNN_reg.npz`:") == list(REGISTRATION_ARRAYS)
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}` (F, H, W, 3)" in readme for name in RESULT_ARRAYS)
    lora = {
        "blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 4),
        "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(4, 2),
    }
    adapter = save_adapter(tmp_path / "adapter", lora, torch.zeros(2, 4), AdapterMeta(2, 2.0, ["to_q"]))
    with safe_open(adapter, "pt") as f:
        assert set(f.keys()) == {f"transformer.{k}" for k in lora} | {DOMAIN_KEY}
        written = set(json.loads(f.metadata()["config"]))
    assert written == {field.name for field in dataclasses.fields(AdapterMeta)}
    assert all(f"`{name}`" in readme.split("### Adapters", 1)[1].split("##", 1)[0] for name in written)


def test_read_npz_maps_stored_members_and_reads_compressed_ones(tmp_path):
    arrays = {
        "a": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b": np.asfortranarray(np.eye(3)),
        "c": np.zeros(0),
    }
    write_npz(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    for name in ("stored.npz", "packed.npz"):
        got = read_npz(tmp_path / name)
        assert got.keys() == arrays.keys()
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[key], value)
            assert got[key].dtype == value.dtype and got[key].flags.f_contiguous == value.flags.f_contiguous
        assert read_npz(tmp_path / name, {"b"}).keys() == {"b"}
    mapped = read_npz(tmp_path / "stored.npz")["a"]
    mapped[0, 0, 0] = 99  # copy-on-write: the file keeps its value
    assert mapped.base is not None and read_npz(tmp_path / "stored.npz")["a"][0, 0, 0] == 0
    np.savez(tmp_path / "objects.npz", o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        read_npz(tmp_path / "objects.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "stored.npz").read_bytes()[:200])
    with pytest.raises(ValueError):
        read_npz(tmp_path / "cut.npz")


def test_shipped_configs_name_no_machine_path():
    """The bundled models' configs, and the metadata of their weights (what finetune.py trained them as), hold no
    path of the machine that built or trained them."""
    from safetensors import safe_open

    texts = {config: config.read_text() for config in (ROOT / "example").rglob("*.json")}
    for weights in (ROOT / "example").rglob("*.safetensors"):
        with safe_open(weights, "pt") as f:
            texts[weights] = json.dumps(f.metadata() or {})
    assert any(path.suffix == ".safetensors" and "fourdnex" in text for path, text in texts.items())
    for path, text in texts.items():
        assert "_name_or_path" not in text and "/root/" not in text and "/tmp/" not in text, path
