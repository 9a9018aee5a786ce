"""Training data: ``sources`` (finding and reading 4DNeX-10M clips), ``prepare`` (frames, crop, pointmap
normalization), ``cache`` (the cache's layout, writers and reader), ``build`` (the build), ``synthetic`` (procedural
scenes written in every 4DNeX-10M layout)."""
