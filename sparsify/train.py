"""`python -m sparsify.train config.yaml`: train SAEs from one config file (`sparsify.cli.train_main`).

Only the `-m` entry point: the training function is `sparsify.train` (`from sparsify import
train`), which importing this module would shadow.
"""

import sys

from sparsify.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
