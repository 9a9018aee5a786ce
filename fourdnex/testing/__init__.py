"""Test ground truth: ``scenes`` (a small ray-cast room seen by a moving camera, with exact cameras and depth),
``corrupted`` (results made from ground truth plus noise, a stand-in model with a known error) and ``flash4``
(FlashAttention-4's interface computed by plain math on the CPU)."""
