"""A trained transformer made deeper or wider without changing what it computes, so training goes on from it.

* **Deeper** (``blocks=n``): the transformer gets ``n`` blocks. Blocks spread evenly over its depth are each followed
  by copies of themselves whose three residual branches (self-attention, cross-attention, feed-forward) end in zeroed
  output projections, so each copy adds nothing until trained (8 blocks grown to 12: a copy after every second
  block; to 16: a copy after each).
* **Wider** (``width=k``): every hidden unit (the ``inner_dim`` of the blocks, which grows by adding attention heads
  of the same size, and the feed-forward's) becomes ``k`` copies. A layer that writes hidden units writes each one
  ``k`` times; a layer that reads them reads all ``k`` copies, each with its weight split into ``k`` parts that sum to
  the old weight. The parts differ by noise that cancels in the sum: the grown model computes what the trained one
  does (layer norms and RMS norms of a vector repeated ``k`` times equal those of the vector), yet the copies get
  different gradients and drift apart as training goes on.

* **Finer** (``patch=1``): the transformer reads each latent pixel as a token instead of each 2 x 2 patch of them
  (4x the tokens). The patch embedding becomes the sum of its four kernel taps and the output projection the mean of
  its four sub-pixel outputs; the rotary positions count Wan's 2-pixel step at any patch
  (:class:`fourdnex.model.transformer.SharedRotaryPosEmbed`), so the finer tokens sit at half steps. On a latent
  constant over each 2 x 2 patch, each of a patch's four tokens starts as the coarse token was, and the output starts
  near the mean of the coarse model's over the patch (not exactly: the four tokens' rotary phases differ by the half
  step). Training goes on from there.

The model's inputs and outputs keep their sizes (latent channels, text and image features, time frequencies), so a
grown transformer drops into the model folder it came from:

    python -m fourdnex.model.grow example/demo/model/transformer runs/wide/transformer --width 2
    python -m fourdnex.model.grow example/demo/model/transformer runs/fine/transformer --patch 1
    python -m fourdnex.model.presets runs/wide/model --preset demo --vae example/demo/model/vae \\
        --transformer runs/wide/transformer --encoders_from example/demo/model
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.model.loading import CONFIG_FILE, WEIGHTS_FILE, read_config, weights_files

#: The residual branches' output projections, zeroed in a block's added copies.
BRANCH_OUTPUTS = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")
#: How each weight outside the blocks grows with the width: (its axes that write hidden units, its axes that read
#: them). The time projection writes six hidden-sized chunks (the blocks' shift, scale and gate terms).
_OUTSIDE_BLOCKS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "patch_embedding.weight": ((0,), ()),
    "patch_embedding.bias": ((0,), ()),
    "patch_embedding.domain_embedding": ((1,), ()),
    "condition_embedder.time_embedder.linear_1.weight": ((0,), ()),
    "condition_embedder.time_embedder.linear_1.bias": ((0,), ()),
    "condition_embedder.time_embedder.linear_2.weight": ((0,), (1,)),
    "condition_embedder.time_embedder.linear_2.bias": ((0,), ()),
    "condition_embedder.time_proj.weight": ((0,), (1,)),
    "condition_embedder.time_proj.bias": ((0,), ()),
    "condition_embedder.text_embedder.linear_1.weight": ((0,), ()),
    "condition_embedder.text_embedder.linear_1.bias": ((0,), ()),
    "condition_embedder.text_embedder.linear_2.weight": ((0,), (1,)),
    "condition_embedder.text_embedder.linear_2.bias": ((0,), ()),
    "condition_embedder.image_embedder.norm1.weight": ((), ()),
    "condition_embedder.image_embedder.norm1.bias": ((), ()),
    "condition_embedder.image_embedder.ff.net.0.proj.weight": ((), ()),
    "condition_embedder.image_embedder.ff.net.0.proj.bias": ((), ()),
    "condition_embedder.image_embedder.ff.net.2.weight": ((0,), ()),
    "condition_embedder.image_embedder.ff.net.2.bias": ((0,), ()),
    "condition_embedder.image_embedder.norm2.weight": ((0,), ()),
    "condition_embedder.image_embedder.norm2.bias": ((0,), ()),
    "scale_shift_table": ((2,), ()),
    "proj_out.weight": ((), (1,)),
    "proj_out.bias": ((), ()),
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _width_axes(key: str, tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axes of ``key`` that write and read hidden units; inside a block every axis but the modulation table's
    leading two is one (linear layers read and write them, norms and biases hold one value per unit)."""
    if _BLOCK_KEY.fullmatch(key):
        if key.endswith("scale_shift_table"):
            return (2,), ()
        return ((0,), (1,)) if tensor.ndim == 2 else ((0,), ())
    if key not in _OUTSIDE_BLOCKS:
        raise UsageError(f"cannot widen the weight {key!r} {tuple(tensor.shape)}: not a weight of a Wan transformer")
    return _OUTSIDE_BLOCKS[key]


def _repeat_units(tensor: torch.Tensor, axis: int, k: int, chunks: int) -> torch.Tensor:
    """``tensor`` with each of its ``chunks`` chunks along ``axis`` repeated ``k`` times in place."""
    shape = tensor.shape
    split = tensor.reshape(*shape[:axis], chunks, shape[axis] // chunks, *shape[axis + 1 :])
    return torch.cat([split] * k, dim=axis + 1).reshape(*shape[:axis], shape[axis] * k, *shape[axis + 1 :])


def _split_reads(tensor: torch.Tensor, axis: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` reading ``k`` copies of its input along ``axis``: ``k`` parts of ``tensor / k`` plus noise of the
    weights' own spread that sums to zero over the parts."""
    parts = (tensor / k).unsqueeze(0).repeat(k, *([1] * tensor.ndim))
    noise = torch.randn(parts.shape, generator=generator, dtype=torch.float32) * (tensor.float().std() / k)
    parts = parts + (noise - noise.mean(0, keepdim=True)).to(tensor.dtype)
    return torch.cat(list(parts), dim=axis)


def widen(state: dict[str, torch.Tensor], k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of the transformer ``state`` with ``k`` copies of every hidden unit (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    grown = {}
    for key in sorted(state):
        tensor = state[key].float()
        writes, reads = _width_axes(key, tensor)
        chunks = 6 if key.startswith("condition_embedder.time_proj.") else 1
        for axis in writes:
            tensor = _repeat_units(tensor, axis, k, chunks)
        for axis in reads:
            tensor = _split_reads(tensor, axis, k, generator)
        grown[key] = tensor
    return grown


def copies_per_block(num_layers: int, blocks: int) -> list[int]:
    """How many blocks each of ``num_layers`` source blocks becomes so that there are ``blocks`` in all: each the
    same count, the remainder spread evenly over the depth."""
    if blocks < num_layers:
        raise UsageError(f"--blocks {blocks} is fewer than the transformer's {num_layers} blocks")
    return [(i + 1) * blocks // num_layers - i * blocks // num_layers for i in range(num_layers)]


def deepen(state: dict[str, torch.Tensor], num_layers: int, blocks: int) -> dict[str, torch.Tensor]:
    """The weights of the transformer ``state`` (``num_layers`` blocks) grown to ``blocks`` blocks: each block
    followed by its :func:`copies_per_block` copies, their residual branches' output projections
    (:data:`BRANCH_OUTPUTS`) zeroed."""
    counts = copies_per_block(num_layers, blocks)
    starts = [sum(counts[:i]) for i in range(num_layers)]
    grown = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            grown[key] = tensor.float()
            continue
        index, name = int(match[1]), match[2]
        if index >= num_layers:
            raise UsageError(f"the weights hold block {index}, the config says {num_layers} blocks")
        for copy in range(counts[index]):
            zeroed = copy > 0 and name.startswith(BRANCH_OUTPUTS)
            block = torch.zeros_like(tensor, dtype=torch.float32) if zeroed else tensor.float().clone()
            grown[f"blocks.{starts[index] + copy}.{name}"] = block
    return grown


def refine(state: dict[str, torch.Tensor], patch_size: list[int]) -> dict[str, torch.Tensor]:
    """The weights of the transformer ``state`` of ``patch_size`` (1, 2, 2) made to read one latent pixel per token
    (module docstring): the patch embedding summed over its spatial taps, the output projection averaged over them."""
    if list(patch_size) != [1, 2, 2]:
        raise UsageError(f"--patch 1 refines a transformer of patch (1, 2, 2), this one has {tuple(patch_size)}")
    refined = dict(state)
    weight = state["patch_embedding.weight"].float()  # (D, C, 1, 2, 2)
    refined["patch_embedding.weight"] = weight.sum(dim=(3, 4), keepdim=True)
    # proj_out writes the (p_t, p_h, p_w, C) outputs of a token in that order: average its 4 sub-pixels' rows
    out_weight = state["proj_out.weight"].float()
    taps = 4
    refined["proj_out.weight"] = out_weight.reshape(taps, -1, out_weight.shape[1]).mean(0)
    refined["proj_out.bias"] = state["proj_out.bias"].float().reshape(taps, -1).mean(0)
    return refined


def grow_config(config: dict, blocks: int, width: int, patch: int | None = None) -> dict:
    """The transformer config after :func:`deepen` to ``blocks`` blocks, :func:`widen` by ``width`` and, with
    ``patch`` 1, :func:`refine`."""
    config = {key: value for key, value in config.items() if key != "_name_or_path"}
    if patch is not None:
        config["patch_size"] = [1, patch, patch]
    config["num_layers"] = blocks
    config["num_attention_heads"] *= width
    config["ffn_dim"] *= width
    if config.get("added_kv_proj_dim") is not None:
        config["added_kv_proj_dim"] *= width
    return config


def grow(
    source: str | Path,
    out: str | Path,
    blocks: int | None = None,
    width: int = 1,
    seed: int = 0,
    patch: int | None = None,
) -> Path:
    """Write the transformer folder ``source`` grown to ``blocks`` blocks (default: as many as it has), ``width``
    times wider and, with ``patch`` 1, reading one latent pixel per token, to ``out`` (float32 weights, ``source``'s
    metadata kept); returns ``out``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fourdnex.files import write_safetensors

    if width < 1:
        raise UsageError(f"--width must be at least 1, got {width}")
    if patch not in (None, 1):
        raise UsageError(f"--patch can only be 1 (one latent pixel per token), got {patch}")
    files = weights_files(source)
    if not files:
        raise UsageError(f"{source} holds no transformer weights ({WEIGHTS_FILE})")
    config = read_config(source)
    state, metadata = {}, {}
    for file in files:
        state.update(load_file(file))
        with safe_open(file, "pt") as f:
            metadata.update(f.metadata() or {})
    blocks = config["num_layers"] if blocks is None else blocks
    if patch is not None:
        state = refine(state, config["patch_size"])
    state = deepen(state, config["num_layers"], blocks)
    if width > 1:
        state = widen(state, width, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, state, metadata or None)
    (out / CONFIG_FILE).write_text(json.dumps(grow_config(config, blocks, width, patch), indent=2) + "\n")
    return out


def main(args: argparse.Namespace) -> None:
    """Grow the transformer ``args`` name."""
    out = grow(args.source, args.out, args.blocks, args.width, args.seed, args.patch)
    config = read_config(out)
    print(
        f"wrote a transformer of {config['num_layers']} blocks, {config['num_attention_heads']} heads of "
        f"{config['attention_head_dim']}, patch {tuple(config['patch_size'])} to {out}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.model.grow``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.model.grow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a transformer folder (config.json and its safetensors weights)")
    parser.add_argument("out", help="the folder to write the grown transformer to")
    parser.add_argument(
        "--blocks", type=int, default=None, help="blocks of the grown transformer (default: the source's count)"
    )
    parser.add_argument("--width", type=int, default=1, help="copies of each hidden unit (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the noise that tells the copies apart")
    parser.add_argument(
        "--patch",
        type=int,
        default=None,
        choices=[1],
        help="1: one latent pixel per token (from patch 2; 4x the tokens)",
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
