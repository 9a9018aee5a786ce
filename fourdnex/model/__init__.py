"""The model: ``transformer`` (Wan's transformer with the domain embedding and the shared RoPE), ``attention``
(FlashAttention-4 as a diffusers attention backend, and the choice of backend), ``fusion`` (RGB | XYZ latents, the
condition and its mask, the latent normalizations, ``encode_latents``), ``adapters`` (the released and the fourdnex
adapter formats), ``loading`` (the one loader of a Wan2.1-I2V folder, and what model and transformer folders hold),
``presets`` (small models built from the real classes: the tests' tiny one and the demo's), ``grow`` (a trained
transformer made deeper or wider without changing what it computes, so training goes on from it)."""
