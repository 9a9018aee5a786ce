"""rerun_vis: not implemented yet."""

import sys

if __name__ == "__main__":
    sys.exit("rerun_vis.py: not implemented yet")
