"""The reference's .pkl results are read through the restricted unpickler; malicious pickles are refused unrun."""

import os
import pickle

import numpy as np
import pytest

from fourdnex.geometry.legacy import PickledObject, safe_unpickle
from fourdnex.geometry.results import ResultError, find_results, load_result


class ReferenceResult:
    """Stands for the reference's result class: its attribute layout, none of its code."""

    def __init__(self, frames=3, height=4, width=5, seed=0):
        rng = np.random.default_rng(seed)
        self.rgb = rng.random((frames, height, width, 3))
        self.pcd = rng.random((frames, height * width, 3)).astype(np.float32)
        self.colors = self.rgb.reshape(frames, -1, 3)
        self.mask = np.ones((frames, height, width), bool)
        self.cams2world = np.tile(np.eye(4), (frames, 1, 1))
        self.K = np.eye(3)
        self.depth = np.ones((frames, height, width))


class RunsCode:
    """A pickle that would run a shell command when loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_reference_pickle_loads_as_plain_arrays(tmp_path, protocol):
    ref = ReferenceResult()
    path = tmp_path / "00000.pkl"
    path.write_bytes(pickle.dumps(ref, protocol=protocol))
    result = load_result(path)
    assert result.rgb.dtype == np.uint8 and result.rgb.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(result.rgb, np.round(ref.rgb * 255).astype(np.uint8))
    np.testing.assert_allclose(result.xyz, ref.pcd.reshape(3, 4, 5, 3) * 2 - 1, atol=1e-6)
    obj = safe_unpickle(path.read_bytes())
    assert isinstance(obj, PickledObject) and obj.qualname.endswith("ReferenceResult")


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "00000.pkl"
    path.write_bytes(pickle.dumps(RunsCode(marker), protocol=protocol))
    with pytest.raises(ResultError, match="refused to call"):
        load_result(path)
    assert not marker.exists()


def test_eval_and_nested_calls_are_refused():
    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_unpickle(pickle.dumps({"a": [np.zeros(2), Evil()]}))


def test_find_results_skips_outputs_and_prefers_npz(tmp_path):
    for name in ("00000.npz", "00000.pkl", "00001.pkl", "00000_reg.npz", "00002_reg.npz", "notes.npz"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_results(tmp_path)] == ["00000.npz", "00001.pkl"]
    with pytest.raises(ResultError, match="registration output"):
        find_results(tmp_path / "00000_reg.npz")
