"""bench/bench_conv3d.py: its shapes and FLOP counts against torch's own counter, and its run on small shapes."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from bench.bench_conv3d import CHUNK, REAL_SHAPES, build_parser, conv_flops, main
from bench.common import REAL_VAE


def test_the_six_shapes_are_the_real_encoder_s_largest_and_their_flops_its_own():
    """One 81 x 480 x 720 video through the real-size AutoencoderKLWan encoder on the meta device: every 3 x 3 x 3
    convolution's FLOPs by torch's counter, summed by (C_in, C_out, H, W); the bench's six are the six largest, with
    their TFLOP to the two decimals it keeps, and 96 % of the whole encode that torch's counter gives."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**REAL_VAE, temperal_downsample=[False, True, True])
    by_shape = Counter()

    def count(module, inputs, output):
        if tuple(module.kernel_size) == (3, 3, 3):
            key = (module.in_channels, module.out_channels, *output.shape[-2:])
            by_shape[key] += conv_flop_count(inputs[0].shape, module.weight.shape, output.shape, False) / 1e12

    for module in vae.encoder.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(count)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.empty(1, 3, 81, 480, 720, device="meta"))
    largest = dict(by_shape.most_common(len(REAL_SHAPES)))
    assert set(largest) == {shape for shape, _ in REAL_SHAPES}
    for shape, tflop in REAL_SHAPES:
        assert largest[shape] == pytest.approx(tflop, abs=0.006), shape
    share = sum(t for _, t in REAL_SHAPES) / (counter.get_total_flops() / 1e12)
    assert 0.96 <= share < 0.97


def test_a_call_s_flops_are_torch_s_count():
    x, w = torch.randn(1, 5, CHUNK + 2, 9, 11), torch.randn(7, 5, 3, 3, 3)
    with FlopCounterMode(display=False) as counter:
        F.conv3d(x, w)
    assert conv_flops(5, 7, CHUNK, 7, 9) == counter.get_total_flops()


def test_the_small_run_times_each_variant_against_the_plain_convolution(tmp_path, capsys):
    out = tmp_path / "conv3d.json"
    result = main(build_parser().parse_args(["--tiny", "--variants", "cudnn", "autotune", "--repeats", "1",
                                             "--json", str(out)]))  # fmt: skip
    assert [(r["c_in"], r["variant"]) for r in result["rows"]] == [(8, "cudnn"), (8, "autotune")] * 2
    assert all(r["seconds"] > 0 and r["max_dev_over_std"] < 1e-5 for r in result["rows"])
    assert json.loads(out.read_text()) == result
    assert "one video's 2.0 TFLOP in these convolutions" in capsys.readouterr().out
