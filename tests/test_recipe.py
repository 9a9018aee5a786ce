"""scripts/train_demo.sh's stage-2 runs: the flags each passes to finetune.py make a valid training configuration,
with the flags every run of the recipe shares, so that no run of a device session fails on a typo."""

import json
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

import finetune

RECIPE = (ROOT / "scripts" / "train_demo.sh").read_text()
FLAGS = RECIPE[RECIPE.index("declare -A RUN_FLAGS=(") :]
RUNS = dict(re.findall(r'^\s+\[([\w-]+)\]="(--[^"]+)"$', FLAGS[: FLAGS.index("\n)")], re.M))
SHARED = ["--cache_dir", "cache", "--output_dir", "out", "--model_path", "model", "--train_batch_size", "256"]
SHARED += ["--no_gradient_checkpointing", "--timestep_sampling", "shifted", "--cache_in_memory", "--compile_blocks"]
SHARED += ["--lr_warmup_steps", "200", "--min_lr_ratio", "0.1", "--max_steps", "900"]


def test_the_recipe_defines_its_runs():
    assert {"4dnex", "any-frame", "full", "full-deep", "full-fine", "full-xyz", "full-uniform"} <= set(RUNS)


def test_each_growth_of_the_recipe_is_a_valid_grow_command():
    from fourdnex.model.grow import build_parser

    growth = RECIPE[RECIPE.index("declare -A RUN_GROWTH=(") :]
    runs = dict(re.findall(r'^\s+\[([\w-]+)\]="(--[^"]+)"$', growth[: growth.index("\n)")], re.M))
    assert set(runs) == {"full-deep", "full-wide", "full-fine"} and set(runs) <= set(RUNS)
    parsed = {run: build_parser().parse_args(["source", "out", *shlex.split(flags)]) for run, flags in runs.items()}
    assert (parsed["full-deep"].blocks, parsed["full-wide"].width, parsed["full-fine"].patch) == (12, 2, 1)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_run_of_the_recipe_is_a_valid_training_configuration(run):
    cfg = finetune.config_from_args(finetune.build_parser().parse_args(SHARED + shlex.split(RUNS[run])))
    cfg.validate()
    if run.startswith("full-xyz"):
        assert cfg.xyz_loss_weight == 3 and cfg.rgb_loss_weight == 1
        assert cfg.xyz_temporal_loss_weight == (0 if run == "full-xyz" else 3)
    assert cfg.condition_tasks == ("any" if run.endswith("any") or run == "any-frame" else "image")
    if run == "full-uniform":  # the run's flag comes after the shared one, and wins
        assert cfg.timestep_sampling == "uniform"
    if run.startswith("full"):
        assert cfg.train_mode == "full"


def test_micro_batched_transformers_keep_the_recipe_s_step_of_256(tmp_path):
    """A transformer the recipe trains in micro-batches (by its patch size, read from its model folder) trains on 256
    samples an optimizer step, as every other run does: full-fine's grown transformer and a run continuing it."""
    table = RECIPE[RECIPE.index("declare -A PATCH_MICRO_BATCHES=(") :]
    splits = {int(p): int(n) for p, n in re.findall(r"^\s+\[(\d+)\]=(\d+)$", table[: table.index("\n)")], re.M)}
    assert splits == {1: 2}
    function = RECIPE[RECIPE.index("patch_size() {") :]
    function = function[: function.index("\n}\n") + 3]
    grown = tmp_path / "grown" / "transformer"
    grown.mkdir(parents=True)
    config = json.loads((ROOT / "example/demo/model/transformer/config.json").read_text())
    (grown / "config.json").write_text(json.dumps(config | {"patch_size": [1, 1, 1]}))
    for folder, patch in ((ROOT / "example/demo/model", 2), (grown.parent, 1)):
        script = f'PY="{sys.executable}"\n{function}patch_size "{folder}"'
        assert subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout == f"{patch}\n"
    for run in ("full-fine", "full-xyz"):
        split = splits[1]
        extra = ["--train_batch_size", str(256 // split), "--gradient_accumulation_steps", str(split)]
        cfg = finetune.config_from_args(finetune.build_parser().parse_args(SHARED + shlex.split(RUNS[run]) + extra))
        cfg.validate()
        assert cfg.train_batch_size * cfg.gradient_accumulation_steps == 256 and cfg.train_batch_size == 128
