"""Reading the reference implementation's ``{i:05d}.pkl`` results without running any code they carry.

Such a file is a pickled class instance holding ``pcd`` (F, H*W, 3) in [0, 1], ``colors`` and ``rgb`` (F, H, W, 3) in
[0, 1]. :class:`SafeUnpickler` rebuilds only numpy arrays, numpy scalars and plain containers; any other global
becomes a stand-in that refuses to be called, so a pickle that would run code fails before anything runs.
:func:`fourdnex.geometry.results.load_result` reads such files through :func:`read_legacy`.
"""

from __future__ import annotations

import io
import pickle

import numpy as np


class PickledObject:
    """What :class:`SafeUnpickler` makes of an instance of any class: its name and the state it was pickled with."""

    qualname = "object"

    def __setstate__(self, state) -> None:
        self.state = state


def _stand_in(module: str, name: str) -> type:
    """A class standing for ``module.name``: it can be instantiated as a pickle does for objects (``cls.__new__``)
    but never called, so a pickle that calls ``module.name(...)`` to run code fails before anything runs."""

    class _Meta(type):
        def __call__(cls, *args, **kwargs):
            raise pickle.UnpicklingError(f"refused to call {module}.{name}{_short(args)}: the pickle would run code")

    return _Meta(
        name, (PickledObject,), {"qualname": f"{module}.{name}", "__new__": lambda cls, *a, **k: object.__new__(cls)}
    )


def _short(args: tuple) -> str:
    """``args`` as a call's argument list, cut short for an error message."""
    text = repr(args) if len(args) != 1 else f"({args[0]!r})"
    return text if len(text) < 80 else text[:76] + "...)"


def _reconstructor(cls, base, state):
    """The pickle protocol 0/1 instance constructor (copyreg's), for stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)) or state is not None:
        raise pickle.UnpicklingError(f"refused to reconstruct {cls!r} from {base!r}")
    return cls.__new__(cls)


#: The numpy functions that rebuild arrays, dtypes and scalars (numpy 2 pickles name ``numpy._core``).
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
    ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, numpy scalars and plain containers, and stand-ins for class instances.

    Only numpy's array/dtype/scalar reconstruction functions may be called. Any other global becomes a
    :class:`PickledObject` stand-in whose pickled state is kept; calling it (what a malicious ``__reduce__`` does,
    e.g. with ``os.system``) raises ``pickle.UnpicklingError`` and nothing is imported or run.
    """

    def find_class(self, module: str, name: str):
        """Map a pickled global to an allowed function or to a stand-in class."""
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)  # Python 2 names (protocol 0-2)
        key = (module.replace("numpy._core.", "numpy.core.", 1), name)
        if key in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[key]
        if key in {("_codecs", "encode"), ("codecs", "encode")}:
            return _encode_latin1
        if key == ("copyreg", "_reconstructor"):
            return _reconstructor
        return _stand_in(module, name)

    def persistent_load(self, pid):
        """Persistent ids (external references) are not supported."""
        raise pickle.UnpicklingError("refused a persistent id: the pickle refers to external objects")


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """The bytes of a protocol 0-2 pickle's ``_codecs.encode(text, 'latin1')``; other codecs are refused."""
    if encoding not in {"latin1", "latin-1"} or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def safe_unpickle(data: bytes) -> object:
    """Unpickle ``data`` with :class:`SafeUnpickler`; instances come back as :class:`PickledObject` stand-ins."""
    return SafeUnpickler(io.BytesIO(data)).load()


def read_legacy(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The RGB ``(F, H, W, 3)`` uint8 and XYZ ``(F, H, W, 3)`` float32 in [-1, 1] of a reference ``.pkl``'s bytes:
    pcd (F, H*W, 3) in [0, 1] -> xyz in [-1, 1], rgb (F, H, W, 3) in [0, 1] -> uint8. ValueError names what is
    wrong with an unsafe, unreadable or unexpected pickle."""
    try:
        obj = safe_unpickle(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"unsafe or unreadable pickle ({err})") from err
    state = getattr(obj, "state", obj)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
        state = {**(state[0] or {}), **state[1]}
    if not isinstance(state, dict) or "pcd" not in state or not ({"rgb", "colors"} & set(state)):
        raise ValueError("a pickle without the reference's pcd and rgb/colors")
    pcd = np.asarray(state["pcd"], dtype=np.float32)
    rgb = state.get("rgb")
    if rgb is None or np.ndim(rgb) != 4:
        raise ValueError(f"rgb must be (F, H, W, 3), got {np.shape(rgb)}")
    rgb = np.asarray(rgb, dtype=np.float32)
    frames, height, width, _ = rgb.shape
    if pcd.size != frames * height * width * 3:
        raise ValueError(f"pcd {pcd.shape} does not match rgb {rgb.shape}")
    xyz = pcd.reshape(frames, height, width, 3) * 2 - 1
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8), xyz
