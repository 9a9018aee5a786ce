"""finetune: not implemented yet."""

import sys

if __name__ == "__main__":
    sys.exit("finetune.py: not implemented yet")
