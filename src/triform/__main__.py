"""``python -m triform``: the command line, also the form ``torchrun ... -m triform train`` launches."""

import sys

from triform.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
