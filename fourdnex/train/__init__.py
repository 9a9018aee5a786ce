"""Fine-tuning (``finetune.py``), one concept per module:

* ``config``: TrainConfig, every setting with the paper's defaults, and its checks;
* ``loss``: the flow-matching objective (noise levels, the transformer's inputs, the weighted loss), pure functions;
* ``engine``: accelerate + DeepSpeed, the learning-rate schedule, the Trainer's optimizer step, the trained adapter;
* ``checkpoints``: training checkpoints (write, resume, list; ``python -m fourdnex.train.checkpoints`` exports one);
* ``loop``: the sample stream, the model prepared for training, ``train()``, validation samples;
* ``memory_policy``: ``--activation_memory``, what gradient checkpointing keeps for this machine;
* ``block_recompute``: the block recompute that keeps attention outputs and feed-forward pre-activations and
  parks tensors in host memory;
* ``vae``: training a small Wan VAE on RGB and XYZ videos (``python -m fourdnex.train.vae``, for the demo model).
"""
