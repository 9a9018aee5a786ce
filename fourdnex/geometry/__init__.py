"""Geometry and result files: ``cameras`` (every camera convention and formula), ``registration`` (cameras and depth
from a pointmap video), ``results`` (the result and registration file formats), ``legacy`` (the reference's pickled
results, read safely), ``exports`` (PLY, COLMAP, nerfstudio, depth), ``viewer`` (Rerun logging), ``paths`` and
``render`` (novel views)."""
