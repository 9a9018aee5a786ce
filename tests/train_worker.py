"""finetune.py's training with every block's self-attention output and feed-forward pre-activation kept and the block
inputs and kept tensors parked in host memory: what ``--activation_memory attention+ffn`` does on CUDA, here on a CPU
(where the flag parks nothing, host memory being the device's).

    python tests/train_worker.py FINETUNE_FLAGS...
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> None:
    import finetune
    from fourdnex.train.loop import train
    from fourdnex.train.memory_policy import RecomputePlan

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = finetune.config_from_args(finetune.build_parser().parse_args(argv))
    everything = RecomputePlan(attention=True, ffn=True, park_inputs=True, park_attention=True, park_ffn=True)
    train(cfg, plan=everything)


if __name__ == "__main__":
    main(sys.argv[1:])
