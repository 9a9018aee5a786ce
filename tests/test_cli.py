"""Flags to settings: every script's flags, given nothing, are its settings dataclasses' defaults (each default is
written once, on the field); the flags reach their fields; the former spellings of flags and values give the same
settings as the names that replaced them; a value no flag takes stops with one line."""

import argparse
import dataclasses

import pytest
from training_support import load_script

from fourdnex.cli import field_default, field_flag, settings, switch
from fourdnex.data.build import BuildConfig
from fourdnex.generate.config import AccelerationConfig, RunConfig, SampleConfig
from fourdnex.geometry.registration import RegistrationConfig
from fourdnex.train.config import TrainConfig
from fourdnex.train.vae import VaeTrainConfig, build_parser


@dataclasses.dataclass
class Toy:
    path: str
    count: int = 3
    kept: bool = True
    names: tuple[str, ...] = dataclasses.field(default_factory=lambda: ("a", "b"))


def test_field_flags_take_the_fields_defaults_and_settings_take_the_flags():
    parser = argparse.ArgumentParser()
    field_flag(parser, Toy, "path", required=True)
    field_flag(parser, Toy, "count", type=int, help="(default %(default)s)")
    field_flag(parser, Toy, "kept", "--drop", action="store_false")
    field_flag(parser, Toy, "names", nargs="+")
    parser.add_argument("--other", default=1)  # no field: not a setting
    assert settings(Toy, parser.parse_args(["--path", "p"])) == Toy("p")
    given = parser.parse_args(["--path", "p", "--count", "5", "--drop", "--names", "x"])
    assert settings(Toy, given) == Toy("p", 5, False, ["x"])
    assert settings(Toy, given, names=("y",), count=6) == Toy("p", 6, False, ("y",))  # values win over flags
    assert "(default 3)" in parser.format_help()
    assert field_default(Toy, "names") == ("a", "b") and field_default(Toy, "path") is dataclasses.MISSING
    with pytest.raises(KeyError):
        field_flag(parser, Toy, "size")
    spelled = argparse.ArgumentParser()
    field_flag(spelled, Toy, "path", "--spelled", aliases={"old": "p", "gone": "q"}, choices=("p", "old", "q"))
    assert [settings(Toy, spelled.parse_args(["--spelled", v])).path for v in ("old", "p", "q")] == ["p", "p", "q"]
    with pytest.raises(SystemExit):  # an alias the choices lack is refused as given
        spelled.parse_args(["--spelled", "gone"])
    assert [switch(v) for v in ("auto", "on", "off")] == [None, True, False]


def _inference(*flags: str) -> RunConfig:
    args = load_script("inference.py").build_parser().parse_args(["--prompt", "p", *flags])
    return settings(RunConfig, args, sample=settings(SampleConfig, args), speed=settings(AccelerationConfig, args))


def test_each_scripts_flags_given_nothing_are_its_settings_defaults():
    assert _inference() == RunConfig("p")
    app = load_script("app.py").build_parser().parse_args([])
    assert settings(RunConfig, app, prompt="", model_path=field_default(RunConfig, "model_path")) == RunConfig("")
    assert settings(AccelerationConfig, app) == AccelerationConfig()
    finetune = load_script("finetune.py")
    assert finetune.config_from_args(finetune.build_parser().parse_args(["--cache_dir", "c"])) == TrainConfig("c")
    build = load_script("build_wan_dataset.py").build_parser().parse_args(["--data_dir", "d", "--out", "o"])
    assert settings(BuildConfig, build) == BuildConfig("d", "o")
    vae = build_parser().parse_args(["--model_path", "m", "--out", "o"])
    assert settings(VaeTrainConfig, vae) == VaeTrainConfig(None, "m", "o")
    registration = load_script("pm_registration.py").build_parser().parse_args(["--pkl_dir", "r"])
    assert settings(RegistrationConfig, registration) == RegistrationConfig()


def test_flags_reach_their_fields():
    run = _inference("--type", "i2vwbw", "--modalities", "xyz", "--steps", "7", "--compile", "off", "--fp8",
                     "--vae_tiling", "on", "--frames", "0,4", "--dtype", "float16")  # fmt: skip
    assert (run.model_type, run.modalities, run.sample.steps, run.frames, run.dtype) == (
        "i2vwbw",
        "xyz",
        7,
        (0, 4),
        "float16",
    )
    assert (run.speed.compile, run.speed.fp8, run.speed.vae_tiling) == (False, True, True)
    args = load_script("pm_registration.py").build_parser().parse_args(["--pkl_dir", "r", "--per_frame_intrinsics"])
    assert settings(RegistrationConfig, args) == RegistrationConfig(shared_intrinsics=False)


def test_former_spellings_give_the_same_settings():
    for old, new in (
        (["--mode", "xyzrgb"], ["--modalities", "rgbxyz"]),
        (["--mode", "xyz"], ["--modalities", "xyz"]),
        (["--modalities", "xyzrgb"], ["--modalities", "rgbxyz"]),
        (["--dtype", "bf16"], ["--dtype", "bfloat16"]),
        (["--dtype", "fp16"], ["--dtype", "float16"]),
        (["--dtype", "fp32"], ["--dtype", "float32"]),
    ):
        assert _inference(*old) == _inference(*new), old
    finetune = load_script("finetune.py")

    def train(*flags: str) -> TrainConfig:
        return finetune.config_from_args(finetune.build_parser().parse_args(["--cache_dir", "c", *flags]))

    assert train("--layout", "rgb") == train("--modalities", "rgb") == TrainConfig("c", modalities="rgb")
    assert train("--mixed_precision", "bf16") == train() == TrainConfig("c", mixed_precision="bfloat16")
    for spelling in ("no", "fp32", "float32"):
        assert train("--mixed_precision", spelling) == TrainConfig("c", mixed_precision="float32"), spelling
    parser = load_script("build_wan_dataset.py").build_parser()

    def cache(*flags: str) -> BuildConfig:
        return settings(BuildConfig, parser.parse_args(["--data_dir", "d", "--out", "o", *flags]))

    assert cache("--encoder_dtype", "bf16", "--dtype", "fp16") == BuildConfig(
        "d", "o", encoder_dtype="bfloat16", dtype="float16"
    )
    assert cache("--encoder_dtype", "fp32") == cache() == BuildConfig("d", "o", encoder_dtype="float32")


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("inference.py", ["--prompt", "p", "--modalities", "rgb"], "--modalities/--mode: invalid choice: 'rgb'"),
        ("inference.py", ["--prompt", "p", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        ("inference.py", ["--prompt", "p", "--compile", "yes"], "--compile: 'yes' is not one of auto, on, off"),
        ("finetune.py", ["--cache_dir", "c", "--layout", "xyz"], "--modalities/--layout: invalid choice: 'xyz'"),
        ("finetune.py", ["--cache_dir", "c", "--mixed_precision", "fp16"], "invalid choice: 'fp16'"),
        ("build_wan_dataset.py", ["--data_dir", "d", "--out", "o", "--encoder_dtype", "fp16"], "choice: 'fp16'"),
    ],
)
def test_a_value_no_flag_takes_is_one_line(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).build_parser().parse_args(flags)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith(f"{script}: error: "), lines
