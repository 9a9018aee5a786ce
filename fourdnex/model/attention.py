"""FlashAttention-4 as a diffusers attention backend (``flash_4``), and the choice of backend for a device.

FlashAttention-4 (PyPI ``flash-attn-4``, module ``flash_attn.cute``: CuTeDSL kernels with a Hopper forward and
backward) is an optional dependency, needed only on the GPU. It runs the 4DNeX self-attention (35,100 tokens x 40
heads x 128, bf16) faster than cuDNN's kernel on an H200 (BENCHMARKS.md, "FlashAttention-4 (`--attention_backend
flash_4`)"). Here it is wrapped so that every diffusers feature that calls an attention backend uses it:

* two ``torch.library`` custom ops, ``fourdnex::flash4_forward`` (q, k, v -> out, log-sum-exp) and
  ``fourdnex::flash4_backward`` (the gradients from out and the log-sum-exp, as FlashAttention's backward computes
  them), each with a fake kernel, so ``torch.compile`` (regional compile, ``fullgraph=True``) traces a call as one
  node with no graph break; the forward op's gradient is the backward op (``register_autograd``);
* a diffusers backend registered under :data:`~fourdnex.config.FLASH_4_BACKEND` (``set_attention_backend("flash_4")``)
  that returns the log-sum-exp where the dispatch asks for it and supports context parallelism: Ulysses and ring
  attention drive the same two ops through diffusers' templated context-parallel functions (ring attention merges
  the partial outputs with the log-sum-exp and replays the backward per key/value chunk from the merged ones);
* :func:`kept_forward` / :func:`kept_backward`, the same kernels for fine-tuning's kept self-attention
  (``fourdnex.train.block_recompute``): the forward's output and log-sum-exp are what its backward takes.

Layouts: q, k, v and the output are ``(B, N, H, D)`` as diffusers hands them to a backend; the kernel's log-sum-exp is
``(B, H, N)`` float32 (natural log), diffusers' context parallelism takes it as ``(B, N, H)``.

FlashAttention-4's Python interface is young: the ops call ``flash_attn.cute.interface._flash_attn_fwd`` (with
``return_lse``) and ``_flash_attn_bwd``, the functions its own autograd function calls, and :func:`flash4_problem`
checks they are there before the backend is chosen. Registering the backend adds a member to diffusers'
``AttentionBackendName`` and an entry to its private backend registry (diffusers 0.42 has no public way to add one);
it imports nothing of FlashAttention-4, so importing this module is cheap on any machine.
"""

import importlib
import inspect
from importlib import metadata

import torch
from diffusers.models import attention_dispatch as dispatch
from torch import Tensor

from fourdnex.config import FLASH_4_BACKEND

#: How to install the optional dependency (the README's GPU section says more).
FLASH_4_INSTALL = 'install it with: pip install "flash-attn-4[cu13]==4.0.0b36" (drop [cu13] under CUDA 12)'
#: The module and the two functions of FlashAttention-4 the ops call.
INTERFACE = "flash_attn.cute.interface"
FORWARD, BACKWARD = "_flash_attn_fwd", "_flash_attn_bwd"


# --------------------------------------------------------------------------------------------------------------------
# The package.


def _interface():
    """FlashAttention-4's interface module (an ImportError, or another error of the package, where it fails)."""
    return importlib.import_module(INTERFACE)


def flash4_version() -> str | None:
    """The installed FlashAttention-4's version; None where it does not import."""
    try:
        module = importlib.import_module("flash_attn.cute")
    except Exception:  # a broken install (its CUDA libraries, the DSL) counts as none; package_problem says why
        return None
    try:
        return metadata.version("flash-attn-4")
    except metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def package_problem() -> str | None:
    """Why the installed FlashAttention-4 cannot serve as the backend (one short reason), None if it can."""
    try:
        interface = _interface()
    except Exception as err:  # whatever stops the import (a missing module, its CUDA libraries) is the reason
        return f"flash-attn-4 does not import ({type(err).__name__}: {err}); {FLASH_4_INSTALL}"
    missing = [name for name in (FORWARD, BACKWARD) if not callable(getattr(interface, name, None))]
    if missing:
        return f"{INTERFACE} lacks {', '.join(missing)}; {FLASH_4_INSTALL}"
    if "return_lse" not in inspect.signature(getattr(interface, FORWARD)).parameters:
        return f"{INTERFACE}.{FORWARD} cannot return the log-sum-exp (a version before return_lse); {FLASH_4_INSTALL}"
    return registration_problem()


def flash4_problem(device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` (one short reason), None if it can: it needs a CUDA GPU of
    compute capability 9.0 or newer (Hopper, Blackwell) and the package."""
    if device.type != "cuda":
        return f"flash_4 runs on CUDA GPUs, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"flash_4 needs compute capability 9.0 or newer (Hopper, Blackwell); this GPU has {major}.{minor}"
    return package_problem()


def choose_backend(device: torch.device, fallback: str) -> tuple[str, str]:
    """The backend ``--attention_backend auto`` runs on ``device`` and why: flash_4 on Hopper (compute capability
    9.x, where it was measured) when FlashAttention-4 is installed, else ``fallback``."""
    problem = flash4_problem(device)
    if problem is None and torch.cuda.get_device_capability(device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(device)
        problem = f"auto picks flash_4 on Hopper (compute capability 9.x, where it was measured), not {major}.{minor}"
    if problem is not None:
        return fallback, problem
    return FLASH_4_BACKEND, f"flash-attn-4 {flash4_version()} on a Hopper GPU"


# --------------------------------------------------------------------------------------------------------------------
# The ops. Their outputs are contiguous, as their fake kernels say (torch.compile checks the real strides).


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


@torch.library.custom_op("fourdnex::flash4_forward", mutates_args=())
def flash4_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """FlashAttention-4's forward: q ``(B, N, H, D)``, k and v ``(B, M, H, D)`` -> out ``(B, N, H, D)`` (q's dtype)
    and the log-sum-exp of the scaled scores ``(B, H, N)`` float32."""
    out, lse, *_ = getattr(_interface(), FORWARD)(  # 4.0.0b36 returns three more values, None here
        *_contiguous(q, k, v), softmax_scale=scale, causal=causal, return_lse=True
    )
    return out.contiguous(), lse.contiguous()


@flash4_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    batch, tokens, heads, _ = q.shape
    return q.new_empty((batch, tokens, heads, v.shape[-1])), q.new_empty((batch, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("fourdnex::flash4_backward", mutates_args=())
def flash4_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-4's backward: the gradients of q, k, v from the output's gradient ``grad`` ``(B, N, H, D)``, the
    forward's ``out`` and its log-sum-exp ``lse`` ``(B, H, N)`` (under ring attention: the merged ones)."""
    grads = getattr(_interface(), BACKWARD)(*_contiguous(q, k, v, out, grad, lse), softmax_scale=scale, causal=causal)
    return tuple(_contiguous(*grads[:3]))


@flash4_backward.register_fake
def _(grad, q, k, v, out, lse, scale, causal) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.causal = scale, causal


def _gradients(ctx, grad: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fourdnex.flash4_backward(grad, q, k, v, out, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


flash4_forward.register_autograd(_gradients, setup_context=_setup_context)


def _scale(query: Tensor, scale: float | None) -> float:
    """The softmax scale: the given one, or 1 / sqrt(head dim)."""
    return query.shape[-1] ** -0.5 if scale is None else float(scale)


def _check_plain(attn_mask: Tensor | None, dropout_p: float) -> None:
    """Refuse what the kernels do not do (the Wan transformer asks for neither)."""
    if attn_mask is not None:
        raise ValueError("the flash_4 attention backend takes no attention mask")
    if dropout_p:
        raise ValueError(f"the flash_4 attention backend has no dropout, got dropout_p={dropout_p}")


# --------------------------------------------------------------------------------------------------------------------
# The diffusers backend, with and without context parallelism.


def _cp_forward(
    ctx,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config=None,
):
    """The forward diffusers' templated Ulysses / ring attention calls (inside their autograd Function)."""
    _check_plain(attn_mask, dropout_p)
    scale = _scale(query, scale)
    out, lse = torch.ops.fourdnex.flash4_forward(query, key, value, scale, is_causal)
    lse = lse.transpose(1, 2)  # (B, N, H)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.flash4_settings = (scale, is_causal)
    return (out, lse) if return_lse else out


def _cp_backward(ctx, grad_out: Tensor, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """The backward diffusers' templated attention calls; ring attention passes each iteration's key/value chunk and
    the merged output and log-sum-exp, Ulysses none of them (the saved ones are used)."""
    saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors, strict=True))
    given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
    q, k, v, o, m = (saved[name] if given[name] is None else given[name] for name in saved)
    scale, causal = ctx.flash4_settings
    return torch.ops.fourdnex.flash4_backward(grad_out, q, k, v, o, m.transpose(1, 2), scale, causal)


def flash4_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    _parallel_config=None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``flash_4`` backend as diffusers' dispatch calls it: q ``(B, N, H, D)``, k and v ``(B, M, H, D)`` -> out
    ``(B, N, H, D)``, and with ``return_lse`` the log-sum-exp ``(B, N, H)``; split over processes when
    ``_parallel_config`` (diffusers' context parallelism) is given."""
    _check_plain(attn_mask, dropout_p)
    if _parallel_config is None:
        out, lse = torch.ops.fourdnex.flash4_forward(query, key, value, _scale(query, scale), is_causal)
        return (out, lse.transpose(1, 2)) if return_lse else out
    return dispatch._templated_context_parallel_attention(
        query,
        key,
        value,
        None,
        0.0,
        is_causal,
        scale,
        False,
        return_lse,
        forward_op=_cp_forward,
        backward_op=_cp_backward,
        _parallel_config=_parallel_config,
    )


def kept_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The forward of fine-tuning's kept self-attention: q, k, v ``(B, H, N, D)`` (diffusers' ``(B, N, H, D)`` memory,
    viewed) -> out ``(B, H, N, D)`` (a view of ``(B, N, H, D)`` memory) and the log-sum-exp ``(B, H, N)``."""
    out, lse = torch.ops.fourdnex.flash4_forward(*(x.transpose(1, 2) for x in (q, k, v)), _scale(q, None), False)
    return out.transpose(1, 2), lse


def kept_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """The gradients of q, k, v ``(B, H, N, D)`` from the output's gradient and :func:`kept_forward`'s outputs."""
    grads = torch.ops.fourdnex.flash4_backward(
        *(x.transpose(1, 2) for x in (grad, q, k, v, out)), lse, _scale(q, None), False
    )
    return tuple(g.transpose(1, 2) for g in grads)


# --------------------------------------------------------------------------------------------------------------------
# Registration with diffusers.


def _add_backend_name(value: str):
    """``AttentionBackendName(value)``, adding the member where diffusers does not have it."""
    AttentionBackendName = dispatch.AttentionBackendName

    if value in AttentionBackendName._value2member_map_:
        return AttentionBackendName(value)
    name = value.upper()
    member = str.__new__(AttentionBackendName, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = AttentionBackendName
    member._sort_order_ = len(AttentionBackendName._member_names_)
    type.__setattr__(AttentionBackendName, name, member)
    AttentionBackendName._member_map_[name] = member
    AttentionBackendName._value2member_map_[value] = member
    AttentionBackendName._member_names_.append(name)
    return member


def _register() -> str | None:
    """Register the ``flash_4`` backend with diffusers (once); why it could not be, or None."""
    try:
        dispatch._templated_context_parallel_attention  # noqa: B018 - the context-parallel path calls it
        constraints = [dispatch._check_device, dispatch._check_qkv_dtype_bf16_or_fp16, dispatch._check_shape]
        member = _add_backend_name(FLASH_4_BACKEND)
        if member not in dispatch._AttentionBackendRegistry._backends:
            dispatch._AttentionBackendRegistry.register(
                member, constraints=constraints, supports_context_parallel=True
            )(flash4_attention)
    except (AttributeError, TypeError) as err:
        return f"this diffusers cannot take a new attention backend ({type(err).__name__}: {err})"
    return None


_REGISTRATION_PROBLEM = _register()


def registration_problem() -> str | None:
    """Why the ``flash_4`` backend is not registered with diffusers, None where it is (at import of this module)."""
    return _REGISTRATION_PROBLEM


def set_attention_backend(transformer: torch.nn.Module, backend: str, device: torch.device) -> None:
    """``transformer.set_attention_backend(backend)`` for every attention of the model; ``flash_4`` is checked first
    against ``device`` (ValueError naming why it cannot run)."""
    if backend == FLASH_4_BACKEND:
        problem = flash4_problem(device)
        if problem is not None:
            raise ValueError(problem)
    transformer.set_attention_backend(backend)
