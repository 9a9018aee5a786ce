"""Every command line of the project: each answers --help with its usage, and a command that did none of its work
exits non-zero with one line saying so."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fourdnex.data.synthetic import write_tree
from fourdnex.geometry.results import save_result

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "example" / "tiny-wan-i2v"
MAIN = re.compile(r'^if __name__ == "__main__":', re.MULTILINE)


def entry_points() -> dict[str, list[str]]:
    """Every file with a ``__main__`` block, by the name its usage line gives (its ``prog``): the top-level scripts
    as ``python X.py``, the package's modules as ``python -m fourdnex.…``."""
    commands = {p.name: [str(p)] for p in sorted(ROOT.glob("*.py")) if MAIN.search(p.read_text())}
    for path in sorted((ROOT / "fourdnex").rglob("*.py")):
        if MAIN.search(path.read_text()):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            commands[module] = ["-m", module]
    return commands


def run_all(commands: dict[str, list[str]], cwd: Path = ROOT) -> dict[str, subprocess.CompletedProcess]:
    """Each command (arguments to this Python) in a process of its own, several at a time; its output decoded as
    written (carriage returns kept)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def one(args: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], capture_output=True, cwd=cwd, env=env, timeout=300)
        proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
        return proc

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(commands, pool.map(one, commands.values()), strict=True))


def shown(stream: str) -> list[str]:
    """The lines a terminal shows of ``stream`` (progress bars redraw themselves after carriage returns)."""
    return [line.split("\r")[-1] for line in stream.split("\n") if line.split("\r")[-1].strip()]


ENTRY_POINTS = entry_points()
#: Runs each command of ``sys.argv[1]`` (JSON: name -> arguments to Python) as ``python ARGS --help`` would, one
#: after the other in this one process (they share the imports: the whole set takes seconds, not a minute), and
#: prints JSON: name -> [exit status, stdout, stderr], the status "returned" when it ended without exiting.
RUN_WITH_HELP = """
import contextlib, io, json, runpy, sys, traceback
found = {}
for name, args in json.loads(sys.argv[1]).items():
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [args[1] if args[0] == "-m" else args[0], "--help"]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if args[0] == "-m":
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(args[0], run_name="__main__")
        status = "returned"
    except SystemExit as exit:
        status = exit.code or 0
    except Exception:
        status = "raised"
        stderr.write(traceback.format_exc())
    found[name] = [status, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, list]:
    """What each entry point did with ``--help``: ``[exit status, stdout, stderr]`` by name."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", RUN_WITH_HELP, json.dumps(ENTRY_POINTS)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_script_of_the_readme_has_a_command_line():
    scripts = {"inference.py", "pm_registration.py", "rerun_vis.py", "render.py", "build_wan_dataset.py"}
    scripts |= {"finetune.py", "evaluate.py"}
    modules = {"fourdnex.data.sources", "fourdnex.data.synthetic", "fourdnex.evaluation.inputs"}
    modules |= {"fourdnex.evaluation.roundtrip", "fourdnex.model.grow"}
    modules |= {"fourdnex.model.presets", "fourdnex.testing.corrupted", "fourdnex.train.checkpoints"}
    assert scripts | modules <= set(ENTRY_POINTS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_prints_the_usage(helps, name):
    status, stdout, stderr = helps[name]
    assert status == 0, stderr
    assert stdout.startswith(f"usage: {name} "), stdout[:200]
    assert re.search(r"^(options|optional arguments):$", stdout, re.MULTILINE), stdout


def test_finetune_help_in_a_process_of_its_own():
    # its help once stopped with a traceback: a "%" in a help string, which argparse formats with %
    (proc,) = run_all({"finetune.py": ["finetune.py", "--help"]}).values()
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: finetune.py ") and "(image 40%, first+last 20%," in proc.stdout


def test_commands_given_an_empty_results_folder_stop_with_one_line(tmp_path):
    empty = tmp_path / "results"
    empty.mkdir()
    commands = {
        "pm_registration.py": ["pm_registration.py", "--pkl_dir", str(empty)],
        "rerun_vis.py": ["rerun_vis.py", "--pkl_dir", str(empty), "--rr_recording", str(tmp_path / "scene.rrd")],
        "render.py": ["render.py", "--pkl_dir", str(empty), "--out", str(tmp_path / "novel")],
        "evaluate.py": ["evaluate.py", "--results", str(empty), "--out", str(tmp_path / "report")],
    }
    for name, proc in run_all(commands).items():
        lines = shown(proc.stderr)
        assert proc.returncode != 0 and len(lines) == 1, (name, proc.stderr)
        assert lines[0] == f"{name}: {empty}: holds no result files (NNNNN.npz or NNNNN.pkl)"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing written


def test_evaluate_that_scored_no_sample_fails_after_its_report(tmp_path):
    rgb = np.zeros((5, 32, 48, 3), np.uint8)
    (tmp_path / "results").mkdir()
    for index in range(2):
        save_result(tmp_path / "results", index, rgb, np.full(rgb.shape, 0.5, np.float32), {})  # one point: no camera
    args = [str(ROOT / "evaluate.py"), "--results", "results", "--out", "report"]  # relative to the working folder
    (proc,) = run_all({"evaluate": args}, tmp_path).values()
    assert proc.returncode != 0 and "scored" not in proc.stdout
    assert shown(proc.stderr) == ["evaluate.py: none of the 2 samples could be scored (the reasons: report/summary.md)"]
    summary = (tmp_path / "report/summary.md").read_text()
    assert summary.count("| not scored: registration failed") == 2


def test_a_build_whose_every_clip_failed_fails_after_its_summary(tmp_path):
    data = write_tree(tmp_path / "synthetic", 2, 9, 32, 48)
    for captions in (data / "caption").iterdir():
        captions.write_text("number,caption\n")  # no clip has a caption
    out = tmp_path / "cache"
    args = ["build_wan_dataset.py", "--data_dir", str(data), "--out", str(out), "--model_path", str(TINY)]
    args += ["--num_frames", "9", "--resolution_h", "32", "--resolution_w", "48", "--device", "cpu"]
    (proc,) = run_all({"build": args}).values()
    assert proc.returncode != 0
    assert shown(proc.stdout)[-1].startswith("0/2 clips done, 2 failed, 0 pending (this run: 0 encoded, 2 failed")
    message = "build_wan_dataset.py: none of the 2 clips this run tried could be cached (reasons: "
    message += f"{out}/failures.jsonl)"
    assert shown(proc.stderr)[-1] == message
    assert [line for line in shown(proc.stderr) if "build_wan_dataset.py" in line] == [message]
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2
