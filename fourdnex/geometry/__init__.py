"""Geometry and result files: ``cameras`` (every camera convention and formula), ``registration`` (cameras and depth
from a pointmap video), ``results`` (the result and registration file formats), ``legacy`` (the reference's pickled
results, read safely), ``exports`` (PLY, COLMAP, nerfstudio, depth), ``viewer`` (Rerun logging), ``paths`` and
``render`` (novel views), ``figure`` (one picture of a result: its videos over its registered point cloud and
cameras)."""
