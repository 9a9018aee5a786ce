"""What fourdnex.model.loading says about model and transformer folders, on the bundled tiny model and folders built
from it: where components live, their configs and weights files (one or sharded), completeness, the random marker,
and the reference's domain embedding read from whichever shard holds it."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fourdnex.model import loading
from fourdnex.model.loading import (
    ModelFolderError,
    check_model_folder,
    check_transformer_folder,
    component_folder,
    has_random_weights,
    is_model_folder,
    load_components,
    load_transformer,
    read_config,
    transformer_folder,
    weights_file_holding,
    weights_files,
)
from fourdnex.model.presets import PRESETS


@pytest.fixture(scope="module")
def sharded(tiny_path, tmp_path_factory):
    """The tiny transformer saved as a transformer folder of its own, in shards of at most 40 kB."""
    folder = tmp_path_factory.mktemp("sharded")
    load_transformer(tiny_path, torch.float32).save_pretrained(folder, max_shard_size="40KB")
    return folder


def keys_of(path) -> set[str]:
    with safe_open(path, "pt") as f:
        return set(f.keys())


def test_where_the_components_of_a_model_folder_live(tiny_path, tmp_path):
    assert component_folder(tiny_path, "vae") == tiny_path / "vae"
    assert (component_folder(tiny_path, "tokenizer") / "tokenizer_config.json").is_file()
    assert is_model_folder(tiny_path) and not is_model_folder(tiny_path / "transformer")
    assert not is_model_folder(tmp_path / "nowhere")
    assert transformer_folder(tiny_path) == tiny_path / "transformer"
    assert transformer_folder(tiny_path, tmp_path / "sft") == tmp_path / "sft"


def test_a_component_config_is_read_and_a_bad_one_named(tiny_path, tmp_path):
    config = read_config(transformer_folder(tiny_path))
    assert config["num_attention_heads"] == PRESETS["tiny"].transformer["num_attention_heads"]  # what built it
    assert config["num_layers"] == PRESETS["tiny"].transformer["num_layers"]
    with pytest.raises(ModelFolderError, match=r"cannot read the model config .*nowhere/config\.json"):
        read_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"config\.json is not JSON"):
        read_config(tmp_path)


def test_weights_files_one_or_sharded_and_the_file_holding_a_key(tiny_path, sharded, tmp_path):
    single = tiny_path / "transformer"
    assert weights_files(single) == [single / "diffusion_pytorch_model.safetensors"]
    shards = weights_files(sharded)
    assert len(shards) > 1 and all(path.parent == sharded and path.is_file() for path in shards)
    state = load_transformer(tiny_path, torch.float32).state_dict()
    stored = [keys_of(path) for path in shards]
    assert set().union(*stored) == set(state) and sum(map(len, stored)) == len(state)  # every key, once
    weight_map = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    for key in ("patch_embedding.weight", "blocks.1.ffn.net.2.weight", "proj_out.bias"):
        assert weights_file_holding(sharded, key) == sharded / weight_map[key]
        assert weights_file_holding(single, key) == single / "diffusion_pytorch_model.safetensors"
    assert weights_file_holding(sharded, "no.such.key") is None
    assert weights_files(tmp_path) == [] and weights_file_holding(tmp_path, "proj_out.bias") is None


def test_the_random_marker(tiny_path, tmp_path):
    assert has_random_weights(tiny_path)  # the tiny test model: random weights
    trained = tmp_path / "trained"
    shutil.copytree(tiny_path, trained)
    index = json.loads((trained / "model_index.json").read_text())
    del index[loading.RANDOM_MARKER]
    (trained / "model_index.json").write_text(json.dumps(index))
    assert not has_random_weights(trained)
    assert not has_random_weights(tiny_path / "transformer")  # a component folder has no index


def test_incomplete_folders_are_named_with_the_missing_file(tiny_path, sharded, tmp_path):
    check_model_folder(tiny_path)
    check_transformer_folder(sharded)
    check_transformer_folder(tiny_path / "transformer")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_path, partial)
    (partial / "tokenizer" / "tokenizer_config.json").unlink()
    check_model_folder(partial, ("vae", "transformer"))  # only the components asked for
    with pytest.raises(ModelFolderError, match=r"partial is incomplete: tokenizer/tokenizer_config\.json is missing"):
        check_model_folder(partial)
    with pytest.raises(ModelFolderError, match=r"model_index\.json is missing; build it with presets$"):
        check_model_folder(tmp_path, ("vae",), how="build it with presets")
    with pytest.raises(ModelFolderError, match=r"is a model folder, not a transformer folder: pass .*/transformer$"):
        check_transformer_folder(tiny_path)
    with pytest.raises(ModelFolderError, match=r"transformer folder .*nowhere does not exist"):
        check_transformer_folder(tmp_path / "nowhere")
    without = tmp_path / "without"
    shutil.copytree(tiny_path / "transformer", without)
    (without / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"incomplete: diffusion_pytorch_model\.safetensors is missing"):
        check_transformer_folder(without)
    with pytest.raises(ModelFolderError, match="not a transformer folder"):  # --sft_path given a whole model
        load_components(tiny_path, torch.float32, transformer=tiny_path)


def test_the_reference_domain_embedding_is_read_from_the_shard_that_holds_it(sharded, tmp_path):
    """The reference's fully fine-tuned transformer keeps its domain embedding under ``learnable_domain_embeddings``;
    in a sharded folder it is read from the shard the index names."""
    folder = tmp_path / "reference"
    shutil.copytree(sharded, folder)
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    last = weights_files(folder)[-1]
    state = load_file(last)
    embedding = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    state["learnable_domain_embeddings"] = embedding
    save_file(state, last, metadata={"format": "pt"})
    index["weight_map"]["learnable_domain_embeddings"] = last.name
    index_file.write_text(json.dumps(index))
    loaded = load_transformer(folder, torch.float32, subfolder=None)
    assert torch.equal(loaded.domain_embedding.detach(), embedding)
    assert not load_transformer(sharded, torch.float32, subfolder=None).domain_embedding.any()  # Wan's: zero
