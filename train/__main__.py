"""`accelerate launch -m train CONFIG.yaml [key=value ...]` and `python -m train ...`."""

import sys

from train.main import main

if __name__ == "__main__":
    sys.exit(main())
