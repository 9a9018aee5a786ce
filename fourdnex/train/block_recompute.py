"""Gradient checkpointing of the transformer blocks that keeps the self-attention output and the feed-forward's
pre-activation instead of recomputing them, and can park in host memory what it keeps.

Plain gradient checkpointing keeps each block's input and, in the backward, runs the block again to rebuild its
activations; at 35,100 tokens that recompute includes the self-attention kernel (~25 TFLOP of a block's ~47) and the
feed-forward (~10 TFLOP). What :class:`BlockRecompute` can do instead (a :class:`RecomputePlan` says which):

* **keep the self-attention output** (``attention``): the forward stores the kernel's output and log-sum-exp; the
  recompute runs the projections (their LoRA weights need those activations) but not the kernel, and the backward
  calls the kernel's own backward op on the kept output, as autograd does for the kernel;
* **keep the feed-forward's pre-activation** (``ffn``): with its weights frozen, the feed-forward's backward needs
  nothing but its weights and the input of its GELU, h = x W1^T + b1, which the forward stores; the recompute skips
  both matmuls and the backward computes ((g W2) * GELU'(h)) W1 from the kept h;
* **park** (``park_inputs`` / ``park_attention`` / ``park_ffn``): the block inputs, the kept attention tensors and /
  or the kept pre-activations are copied to host memory (page-locked) on a side CUDA stream as soon as they are
  written, and copied back one block ahead of the backward that needs them, so the GPU holds them for two blocks at a
  time instead of all 40.

Every block call runs through :class:`_RecomputedBlock`, a reentrant-style autograd Function whose forward runs the
block without grad and whose backward runs it again with grad and differentiates it with ``torch.autograd.grad``.
That works with any block callable, regionally compiled or not. The block's trainable (LoRA) parameters are inputs
of the Function, so their gradients are accumulated by the caller's one backward pass, where DeepSpeed's gradient
hooks see them as with plain gradient checkpointing. Wan's blocks have no dropout, so no random state is replayed.

This module calls private torch ops and diffusers internals (listed in
:data:`fourdnex.train.memory_policy.PRIVATE_SYMBOLS`); the policy there checks them before this module is imported.

Sizes at the 4DNeX shape (35,100 tokens x 5120, bf16): a block input is 0.36 GB, a kept attention output 0.36 GB
plus its log-sum-exp 5.6 MB, a kept pre-activation (13,824 wide) 0.97 GB; 40 blocks keep 14.4 GB of inputs, 14.6 GB
of attention outputs and 38.8 GB of pre-activations.
"""

from __future__ import annotations

import types
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import nn
from torch.nn.attention import SDPBackend

from fourdnex.config import FLASH_4_BACKEND
from fourdnex.model import attention
from fourdnex.train.config import REPLAYABLE_ATTENTION_BACKENDS
from fourdnex.train.memory_policy import RecomputePlan

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------------------------------
# The attention kernels, called as autograd calls them: inputs (B, H, N, D), no mask, no dropout, default scale.


class AttentionKernel(NamedTuple):
    """One SDPA kernel's forward and backward aten ops.

    ``forward(q, k, v) -> (out, lse, extra)``: ``extra`` holds the small outputs its backward takes (sequence
    offsets, sizes, RNG state); ``backward(grad, q, k, v, out, lse, extra) -> (dq, dk, dv)``. q, k and v come as
    diffusers lays them out, (B, N, H, D) memory viewed as (B, H, N, D), which every kernel here reads in place.
    """

    name: str
    forward: Callable
    backward: Callable


def _cpu_flash_forward(q, k, v):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, lse, ()


def _cpu_flash_backward(grad, q, k, v, out, lse, extra):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, False)


def _cuda_flash_forward(q, k, v):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _cuda_flash_backward(grad, q, k, v, out, lse, extra):
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset
    )


def _cudnn_forward(q, k, v):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(grad, q, k, v, out, lse, extra):
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return aten._scaled_dot_product_cudnn_attention_backward(
        grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, False
    )


def _native_cuda_forward(q, k, v):
    cudnn = torch._fused_sdp_choice(q, k, v) == SDPBackend.CUDNN_ATTENTION.value
    out, lse, extra = (_cudnn_forward if cudnn else _cuda_flash_forward)(q, k, v)
    return out, lse, (cudnn, *extra)


def _native_cuda_backward(grad, q, k, v, out, lse, extra):
    cudnn, *extra = extra
    return (_cudnn_backward if cudnn else _cuda_flash_backward)(grad, q, k, v, out, lse, tuple(extra))


def _flash4_forward(q, k, v):
    out, lse = attention.kept_forward(q, k, v)
    return out, lse, ()


def _flash4_backward(grad, q, k, v, out, lse, extra):
    return attention.kept_backward(grad, q, k, v, out, lse)


CPU_FLASH = AttentionKernel("flash (cpu)", _cpu_flash_forward, _cpu_flash_backward)
CUDA_FLASH = AttentionKernel("flash", _cuda_flash_forward, _cuda_flash_backward)
CUDNN = AttentionKernel("cudnn", _cudnn_forward, _cudnn_backward)
#: What SDPA itself picks for these inputs (cuDNN on Hopper with this torch, FlashAttention elsewhere).
CUDA_NATIVE = AttentionKernel("sdpa's choice", _native_cuda_forward, _native_cuda_backward)
#: FlashAttention-4 (the ``flash_4`` backend): its forward's output and log-sum-exp are what its backward takes.
FLASH_4 = AttentionKernel("flash_4", _flash4_forward, _flash4_backward)


def attention_kernel(device: torch.device, backend: str | None) -> AttentionKernel:
    """The kernel a diffusers backend runs on ``device`` (None: diffusers' active backend); for "native" on CUDA, the
    one SDPA itself would choose for the inputs (``torch._fused_sdp_choice``); for ``flash_4`` FlashAttention-4's."""
    backend = backend or _AttentionBackendRegistry.get_active_backend()[0]
    if backend not in REPLAYABLE_ATTENTION_BACKENDS:
        name = getattr(backend, "value", backend)
        raise ValueError(f"kept self-attention replays the backends {REPLAYABLE_ATTENTION_BACKENDS}, got {name!r}")
    if backend == FLASH_4_BACKEND:  # its ops run where FlashAttention-4 does (the backend's choice checked that)
        return FLASH_4
    if device.type == "cpu":
        return CPU_FLASH
    if device.type != "cuda":
        raise ValueError(f"kept self-attention runs on cpu or cuda, got {device.type}")
    if backend == "_native_cudnn":
        return CUDNN
    return CUDA_FLASH if backend == "_native_flash" else CUDA_NATIVE


class _KeptAttention(torch.autograd.Function):
    """The attention kernel replayed from its kept output: forward returns it, backward runs the kernel's backward."""

    @staticmethod
    def forward(ctx, query, key, value, kept, kernel):  # (B, H, N, D) each; kept: (out, lse, extra)
        ctx.save_for_backward(query, key, value)
        ctx.kept, ctx.kernel = kept, kernel
        return kept[0].detach()

    @staticmethod
    def backward(ctx, grad):
        query, key, value = ctx.saved_tensors
        out, lse, extra = ctx.kept
        if grad.stride() != out.stride():  # the kernels read the gradient in the memory layout they wrote out in
            grad = torch.empty_like(out).copy_(grad)
        grad_query, grad_key, grad_value = ctx.kernel.backward(grad, query, key, value, out, lse, extra)
        return grad_query, grad_key, grad_value, None, None  # nothing flows to the kept tensors or the kernel


# --------------------------------------------------------------------------------------------------------------------
# Host buffers and copies.


def _register_host_memory(tensor: torch.Tensor) -> Callable[[], None]:
    """Page-lock a CPU tensor's memory for CUDA copies (``cudaHostRegister``); returns the call that undoes it.

    PyTorch's own pinned allocator rounds each request up to a power of two: 38.8 GB of pre-activations would take
    64 GiB. Registering a plain allocation pins exactly what is asked for.
    """
    cudart = torch.cuda.cudart()
    pointer = tensor.data_ptr()
    error = cudart.cudaHostRegister(pointer, tensor.nbytes, 0)
    if int(error):
        reason = cudart.cudaGetErrorString(error)
        raise RuntimeError(f"cannot page-lock {tensor.nbytes / 1e9:.1f} GB of host memory for parking: {reason}")
    return lambda: cudart.cudaHostUnregister(pointer)


class HostBuffers:
    """Host buffers for parked tensors, allocated one slab per kind (page-locked when CUDA is there) and reused.

    A slab holds ``capacity[kind]`` buffers (one per block that parks that kind), so a training step allocates
    nothing after the first; a second forward in flight before a backward gets a second slab.
    """

    def __init__(self, capacity: dict[str, int]) -> None:
        self.capacity = capacity
        self.free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self.slabs: list[torch.Tensor] = []  # every allocation, alive as long as its registration
        self._unregister: list[Callable[[], None]] = []
        weakref.finalize(self, _call_all, self._unregister)

    @staticmethod
    def _key(kind: str, like: torch.Tensor) -> tuple:
        return kind, tuple(like.shape), like.stride(), like.dtype

    def take(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        """A free host buffer with ``like``'s shape, strides and dtype."""
        free = self.free[self._key(kind, like)]
        if not free:
            span = 1 + sum((n - 1) * s for n, s in zip(like.shape, like.stride(), strict=True))  # storage elements
            count = self.capacity[kind]
            slab = torch.empty(count * span, dtype=like.dtype)
            if like.device.type == "cuda":
                self._unregister.append(_register_host_memory(slab))
            self.slabs.append(slab)
            free += [slab[i * span : (i + 1) * span].as_strided(like.shape, like.stride()) for i in range(count)]
        return free.pop()

    def give(self, kind: str, buffer: torch.Tensor) -> None:
        """Return a buffer taken with :meth:`take`."""
        self.free[self._key(kind, buffer)].append(buffer)


def _call_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


class HostCopier:
    """Device <-> host copies. On CUDA they run on a side stream that waits for the compute stream's writes, and the
    compute stream waits for a copy back only where it reads the data; on a CPU they are plain copies."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def device(self) -> torch.device:
        """The device the copies go to and come from."""
        return self.stream.device if self.stream is not None else torch.device("cpu")

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy ``src`` into the host buffer ``dst``; ``src`` may be freed at once (its memory is not reused before
        the copy has read it)."""
        if self.stream is None:
            dst.copy_(src)
            return
        self.stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)

    def to_device(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the host buffer ``src`` to a new tensor on ``device``; returns it and the event that marks
        the copy done (None on a CPU, where it is done already)."""
        dst = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=device)
        if self.stream is None:
            return dst.copy_(src), None
        self.stream.wait_stream(torch.cuda.current_stream(device))  # dst's memory may have been read there just now
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        dst.record_stream(self.stream)
        return dst, ready

    def wait(self, ready: torch.cuda.Event | None, device: torch.device) -> None:
        """Make the compute stream wait until a :meth:`to_device` copy is done."""
        if ready is not None:
            torch.cuda.current_stream(device).wait_event(ready)


# --------------------------------------------------------------------------------------------------------------------
# The recomputed block call.


@dataclass(eq=False)
class _Stash:
    """What one block call keeps for its backward, by name: on the device, or parked in host buffers."""

    previous: weakref.ref | None  # the stash of the block that ran before this one in the same forward pass
    device: dict[str, torch.Tensor] = field(default_factory=dict)
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: tuple = ()  # the attention kernel's small outputs (stay on the device)
    kernel: AttentionKernel | None = None
    ready: torch.cuda.Event | None = None  # the copies back to the device are done
    fetching: bool = False
    released: bool = False


def _flatten(args: tuple) -> tuple[list, tuple]:
    """Block arguments to a flat list of tensors (diffusers passes RoPE as a (cos, sin) pair) and how to regroup."""
    flat, spec = [], []
    for arg in args:
        group = isinstance(arg, (tuple, list))
        flat.extend(arg if group else (arg,))
        spec.append(len(arg) if group else None)
    return flat, tuple(spec)


def _flat_size(spec: tuple) -> int:
    """How many tensors :func:`_flatten` made of the arguments ``spec`` describes."""
    return sum(1 if n is None else n for n in spec)


def _unflatten(flat: list, spec: tuple) -> list:
    """Inverse of :func:`_flatten`."""
    args, i = [], 0
    for n in spec:
        args.append(flat[i] if n is None else tuple(flat[i : i + n]))
        i += 1 if n is None else n
    return args


#: The arguments of :class:`_RecomputedBlock` before the block's tensors: the block, its BlockRecompute, the spec.
NON_TENSOR_ARGS = 3
#: Positions in a Wan block's flattened arguments: diffusers calls
#: ``block(hidden_states, encoder_hidden_states, timestep_proj, (rope_cos, rope_sin))``.
HIDDEN_STATES, TIMESTEP_PROJ = 0, 2


class _RecomputedBlock(torch.autograd.Function):
    """One block call: forward without grad keeping the inputs (and what the plan keeps), backward re-running the
    block with grad.

    The block's trainable parameters are inputs of the Function too: its backward returns their gradients (from
    ``torch.autograd.grad`` on the recomputed block), so they are accumulated by the one backward pass the caller
    runs, as with plain gradient checkpointing, and hooks on their gradients (DeepSpeed's) see a single backward.
    """

    @staticmethod
    def forward(ctx, block, owner, spec, *tensors):  # tensors: the flattened block arguments, then its parameters
        flat = list(tensors[: _flat_size(spec)])
        stash = owner.open_stash()
        device_type = flat[HIDDEN_STATES].device.type
        ctx.autocast = device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        ctx.block, ctx.owner, ctx.spec, ctx.stash = block, owner, spec, stash
        ctx.params = tensors[len(flat) :]
        if owner.park_inputs:  # the hidden states: the one input that is new for every block
            owner.keep(stash, "input", flat[HIDDEN_STATES])
            ctx.save_for_backward(*(None if i == HIDDEN_STATES else x for i, x in enumerate(flat)))
        else:
            ctx.save_for_backward(*flat)
        with owner.running(stash, replay=False):
            return block(*_unflatten(flat, spec))

    @staticmethod
    def backward(ctx, grad):
        owner, stash = ctx.owner, ctx.stash
        saved = list(ctx.saved_tensors)
        owner.fetch(stash)
        if stash.previous is not None:
            owner.prefetch(stash.previous())  # the next backward's block, while this one recomputes
        if owner.park_inputs:
            saved[HIDDEN_STATES] = stash.device["input"]
        needs = ctx.needs_input_grad[NON_TENSOR_ARGS : NON_TENSOR_ARGS + len(saved)]
        if "ffn" in stash.device and needs[TIMESTEP_PROJ]:
            raise RuntimeError(
                "a kept feed-forward replays a zero output, so the gate of its residual (from the timestep "
                "projection) must not be trained: use --activation_memory attention"
            )
        inputs = [x.detach().requires_grad_(need) for x, need in zip(saved, needs, strict=True)]
        device_type, autocast, dtype = ctx.autocast
        with (
            torch.enable_grad(),
            torch.autocast(device_type, dtype=dtype, enabled=autocast),
            owner.running(stash, replay=True),
        ):
            out = ctx.block(*_unflatten(inputs, ctx.spec))
        wanted = [x for x, need in zip(inputs, needs, strict=True) if need] + list(ctx.params)
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        owner.release(stash)
        input_grads = [next(grads) if need else None for need in needs]
        return *(None,) * NON_TENSOR_ARGS, *input_grads, *grads


class BlockRecompute:
    """The gradient-checkpointing function diffusers calls as ``func(block, *block_args)`` for every block.

    Keeps the inputs of each block, the self-attention output of the blocks given a
    :class:`KeptSelfAttentionProcessor` and the feed-forward pre-activation of the blocks whose feed-forward
    :func:`keep_feed_forward` set up, each kind parked in host memory where the :class:`RecomputePlan` says.
    Blocks must run in order and their backwards in reverse order, as a transformer's do; one forward pass may be in
    flight per backward, more just take more host memory.
    """

    def __init__(self, num_blocks: int, plan: RecomputePlan) -> None:
        kept = len(range(num_blocks)[: plan.blocks])  # the first plan.blocks blocks keep what the plan keeps
        self.park_inputs = plan.park_inputs
        self.parked = {
            "input": plan.park_inputs,
            "attention": plan.park_attention,
            "lse": plan.park_attention,
            "ffn": plan.park_ffn,
        }
        self.active: _Stash | None = None  # the stash of the block running now (its forward or its recompute)
        self.replaying = False
        self._last: weakref.ref | None = None
        attention, ffn = (kept if plan.attention else 0), (kept if plan.ffn else 0)
        self.host_buffers = HostBuffers({"input": num_blocks, "attention": attention, "lse": attention, "ffn": ffn})
        self.copier: HostCopier | None = None  # made at the first tensor parked, on its device

    def __call__(self, block: nn.Module, *args) -> torch.Tensor:
        """Run ``block(*args)`` (hidden states (B, N, C) out) with its backward recomputing it as planned."""
        flat, spec = _flatten(args)
        params = [p for p in block.parameters() if p.requires_grad]
        return _RecomputedBlock.apply(block, self, spec, *flat, *params)

    # -- what the block call and the attention processor use

    def open_stash(self) -> _Stash:
        """A new stash, linked to the one opened before it."""
        stash = _Stash(previous=self._last)
        self._last = weakref.ref(stash)
        return stash

    @contextmanager
    def running(self, stash: _Stash, replay: bool) -> Iterator[None]:
        """Mark ``stash``'s block as running (its forward, or with ``replay`` its recompute)."""
        self.active, self.replaying = stash, replay
        try:
            yield
        finally:
            self.active, self.replaying = None, False

    def keep(self, stash: _Stash, name: str, tensor: torch.Tensor) -> None:
        """Keep a tensor for the backward: parked in a host buffer if its kind is parked, else as is."""
        if not self.parked[name]:
            stash.device[name] = tensor
            return
        if self.copier is None:
            self.copier = HostCopier(tensor.device)
        buffer = self.host_buffers.take(name, tensor)
        self.copier.to_host(tensor, buffer)
        stash.host[name] = buffer

    def prefetch(self, stash: _Stash | None) -> None:
        """Start copying a stash's parked tensors back to the device (no-op if done, started or nothing parked)."""
        if stash is None or stash.released or stash.fetching or not stash.host:
            return
        for name, buffer in stash.host.items():
            stash.device[name], stash.ready = self.copier.to_device(buffer, self.copier.device)
        stash.fetching = True

    def fetch(self, stash: _Stash) -> None:
        """Have a stash's tensors on the device, ready for the compute stream."""
        self.prefetch(stash)
        if stash.host:
            self.copier.wait(stash.ready, self.copier.device)

    def release(self, stash: _Stash) -> None:
        """Drop what a stash keeps after its backward, returning its host buffers."""
        for name, buffer in stash.host.items():
            self.host_buffers.give(name, buffer)
        stash.host, stash.device, stash.extra, stash.released = {}, {}, (), True


# --------------------------------------------------------------------------------------------------------------------
# The self-attention processor.


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of ``x`` (B, N, H, D): channel pairs (2i, 2i+1) turned by the angle of column 2i."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


@torch.compiler.disable
def _self_attention(processor: KeptSelfAttentionProcessor, query, key, value) -> torch.Tensor:
    """The attention kernel of a kept block, (B, N, H, D) in and out: stored while the block's forward runs under
    its BlockRecompute, replayed while it recomputes, plain diffusers dispatch otherwise (inference, validation).

    Kept out of torch.compile: storing and fetching are side effects (a graph break either side).
    """
    owner = processor.owner
    stash = owner.active
    if stash is None:
        return dispatch_attention_fn(
            query, key, value, backend=processor._attention_backend, parallel_config=processor._parallel_config
        )
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, N, D)
    if owner.replaying:
        kept = (stash.device["attention"], stash.device["lse"], stash.extra)
        out = _KeptAttention.apply(q, k, v, kept, stash.kernel)
    else:
        kernel = attention_kernel(query.device, processor._attention_backend)
        out, lse, stash.extra = kernel.forward(q, k, v)
        stash.kernel = kernel
        owner.keep(stash, "attention", out)
        owner.keep(stash, "lse", lse)
    return out.transpose(1, 2)


class KeptSelfAttentionProcessor:
    """Wan's self-attention (``block.attn1``) with its kernel output kept by a :class:`BlockRecompute`.

    Computes what diffusers' ``WanAttnProcessor`` computes for a self-attention (no mask, no image context).
    """

    _attention_backend = None  # set by diffusers' set_attention_backend, like its own processors
    _parallel_config = None

    def __init__(self, owner: BlockRecompute) -> None:
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # (B, N, C) each
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # (B, N, H, D)
        query, key = _rope(query, *rotary_emb), _rope(key, *rotary_emb)
        out = _self_attention(self, query, key, value).flatten(2, 3).type_as(query)  # (B, N, C)
        return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------------------------------------------
# The feed-forward.


class _KeptFeedForward(torch.autograd.Function):
    """Wan's feed-forward (Linear, GELU, Linear; weights frozen) replayed from its kept pre-activation.

    Forward returns zeros: the recompute's output is only differentiated, never read, and with the residual's gate
    not trained (checked by the block's backward) nothing needs the feed-forward's value. Backward is the input
    gradient autograd computes for the stock module: ((g W2) * GELU'(h)) W1.
    """

    @staticmethod
    def forward(ctx, x, up_weight, down_weight, hidden, approximate):
        ctx.save_for_backward(up_weight, down_weight)
        ctx.hidden, ctx.approximate = hidden, approximate
        return x.new_zeros(*x.shape[:-1], down_weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        up_weight, down_weight = ctx.saved_tensors
        grad_hidden = aten.gelu_backward(grad @ down_weight, ctx.hidden, approximate=ctx.approximate)
        grad_x = grad_hidden @ up_weight
        return grad_x, None, None, None, None  # the weights are frozen; the kept h and the GELU variant get none


@torch.compiler.disable
def _kept_feed_forward(ffn: nn.Module, owner: BlockRecompute, x: torch.Tensor) -> torch.Tensor:
    """The forward of a feed-forward set up by :func:`keep_feed_forward`: the pre-activation stored while the
    block's forward runs under its BlockRecompute, replayed while it recomputes, the stock module otherwise.

    Kept out of torch.compile: storing and fetching are side effects (a graph break either side).
    """
    stash = owner.active
    if stash is None:
        return type(ffn).forward(ffn, x)
    up, down, approximate = ffn.net[0].proj, ffn.net[2], ffn.net[0].approximate
    if owner.replaying:
        return _KeptFeedForward.apply(x, up.weight, down.weight, stash.device["ffn"], approximate)
    hidden = F.linear(x, up.weight, up.bias)
    owner.keep(stash, "ffn", hidden)
    return F.linear(F.gelu(hidden, approximate=approximate), down.weight, down.bias)


def keep_feed_forward(block: nn.Module, owner: BlockRecompute) -> None:
    """Make ``block.ffn`` keep its pre-activation under ``owner`` (its parameters and their names unchanged).

    Raises ValueError where the replay would be wrong: a trainable feed-forward (LoRA on it), a trainable modulation
    table, or a feed-forward other than diffusers' Linear, GELU, Dropout(0), Linear.
    """
    ffn = block.ffn
    net = getattr(ffn, "net", ())
    stock = (
        len(net) == 3
        and isinstance(net[0], GELU)
        and type(net[0].proj) is nn.Linear
        and isinstance(net[1], nn.Dropout)
        and net[1].p == 0
        and type(net[2]) is nn.Linear
    )
    if not stock:
        raise ValueError("keeping the feed-forward needs diffusers' Linear-GELU-Linear without LoRA on it")
    if any(p.requires_grad for p in ffn.parameters()) or block.scale_shift_table.requires_grad:
        raise ValueError("keeping the feed-forward needs its weights and the block's modulation frozen")
    ffn.forward = types.MethodType(lambda module, x: _kept_feed_forward(module, owner, x), ffn)


def enable_block_recompute(transformer: nn.Module, plan: RecomputePlan) -> BlockRecompute:
    """Run every block of a Wan transformer under a :class:`BlockRecompute` that keeps and parks what ``plan`` says;
    returns it (also found with :func:`block_recompute`). Raises ValueError as :func:`keep_feed_forward` does."""
    blocks = transformer.blocks
    owner = BlockRecompute(len(blocks), plan)
    kept = blocks[: plan.blocks]
    for block in kept:
        if plan.ffn:
            keep_feed_forward(block, owner)
        if plan.attention:
            stock = block.attn1.processor
            processor = KeptSelfAttentionProcessor(owner)
            processor._attention_backend = stock._attention_backend
            processor._parallel_config = stock._parallel_config
            block.attn1.set_processor(processor)
    transformer.enable_gradient_checkpointing(owner)
    transformer._fourdnex_block_recompute = owner
    return owner


def block_recompute(model: nn.Module) -> BlockRecompute | None:
    """The :class:`BlockRecompute` a transformer's blocks run under, None if it uses plain gradient checkpointing."""
    return getattr(model, "_fourdnex_block_recompute", None)
