"""Test ground truth: ``scenes`` (a small ray-cast room seen by a moving camera, with exact cameras and depth) and
``corrupted`` (results made from ground truth plus noise, a stand-in model with a known error)."""
