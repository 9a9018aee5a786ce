"""A stand-in for FlashAttention-4 on the CPU: its interface functions computed by plain math in float64.

:func:`installed` puts a package ``flash_attn.cute`` whose ``interface`` module has ``_flash_attn_fwd`` and
``_flash_attn_bwd`` (the two functions :mod:`fourdnex.model.attention` calls, with their signatures' names) into
``sys.modules`` for the duration of a ``with`` block, so the ``flash_4`` backend, its custom ops, its context-parallel
path and the kept attention of fine-tuning run on a machine without a GPU. The backward is FlashAttention's: it
rebuilds the probabilities from the log-sum-exp and takes the output for its row sums, so a wrong log-sum-exp or
output (ring attention passes merged ones) gives wrong gradients here as it would on the GPU.

Layouts as FlashAttention-4's: q ``(B, N, H, D)``, k and v ``(B, M, H, D)``, log-sum-exp ``(B, H, N)`` float32.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor

#: Calls of the stand-in's functions by name, since the last :func:`installed` began.
CALLS: Counter = Counter()
MODULES = ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface")


def _scores(q: Tensor, k: Tensor, scale: float | None) -> tuple[Tensor, float]:
    """Scaled scores ``(B, H, N, M)`` in float64, and the scale."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * scale, scale


def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    **unused,
) -> tuple[Tensor, Tensor | None, None, None, None]:
    """Softmax attention: out ``(B, N, H, D)`` in q's dtype and, with ``return_lse``, the log-sum-exp of the scaled
    scores ``(B, H, N)`` float32 (else None), then the three more values 4.0.0b36 returns (None unless asked for
    what this stand-in does not compute)."""
    if causal:
        raise NotImplementedError("the stand-in computes non-causal attention only")
    CALLS["forward"] += 1
    scores, _ = _scores(q, k, softmax_scale)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, N)
    out = torch.einsum("bhnm,bmhd->bnhd", (scores - lse[..., None]).exp(), v.double())
    return out.to(q.dtype), lse.float() if return_lse else None, None, None, None


def flash_attn_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    **unused,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention's backward from ``out`` and ``lse``: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO
    O)), dQ = scale dS K, dK = scale dS^T Q; in float64, returned in the inputs' dtypes."""
    if causal:
        raise NotImplementedError("the stand-in computes non-causal attention only")
    CALLS["backward"] += 1
    scores, scale = _scores(q, k, softmax_scale)
    p = (scores - lse.double()[..., None]).exp()  # (B, H, N, M)
    dout, out = dout.double(), out.double()
    dv = torch.einsum("bhnm,bnhd->bmhd", p, dout)
    dp = torch.einsum("bnhd,bmhd->bhnm", dout, v.double())
    rows = (dout * out).sum(-1).transpose(1, 2)  # (B, H, N)
    ds = p * (dp - rows[..., None])
    dq = torch.einsum("bhnm,bmhd->bnhd", ds, k.double()) * scale
    dk = torch.einsum("bhnm,bnhd->bmhd", ds, q.double()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@contextlib.contextmanager
def installed(version: str = "4.0.0b36+stand-in") -> Iterator[Counter]:
    """Make ``import flash_attn.cute.interface`` find the stand-in inside the block; yields :data:`CALLS` (reset)."""
    saved = {name: sys.modules.get(name) for name in MODULES}
    package, cute, interface = (types.ModuleType(name) for name in MODULES)
    for module in (package, cute, interface):  # what importlib.util.find_spec reads (diffusers probes flash_attn)
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None, is_package=module is not interface)
    package.__path__, cute.__path__ = [], []
    cute.__version__ = version
    interface._flash_attn_fwd, interface._flash_attn_bwd = flash_attn_fwd, flash_attn_bwd
    package.cute, cute.interface = cute, interface
    sys.modules.update(zip(MODULES, (package, cute, interface), strict=True))
    CALLS.clear()
    try:
        yield CALLS
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
