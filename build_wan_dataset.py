"""build_wan_dataset: not implemented yet."""

import sys

if __name__ == "__main__":
    sys.exit("build_wan_dataset.py: not implemented yet")
