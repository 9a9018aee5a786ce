"""pm_registration: not implemented yet."""

import sys

if __name__ == "__main__":
    sys.exit("pm_registration.py: not implemented yet")
