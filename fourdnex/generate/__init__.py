"""Generation: ``config`` (a run's settings: inputs, sampling, speed and memory), ``pipeline`` (the sampling loop on
the fused latent), ``acceleration`` (applying the speed and memory settings), ``parallel`` (processes of a torchrun
launch: context parallelism, lines shared out), ``run`` (what inference.py runs: inputs checked, the model loaded
once, every line sampled, alone or in a batch of lines, and written)."""
