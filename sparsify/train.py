"""`python -m sparsify.train config.yaml`: train SAEs from one config file (`sparsify.cli.train_main`).

Only the `-m` entry point. Imported instead of run, this module stands aside for the training
function, so that `sparsify.train` is always the function `train` (`from sparsify import
train`), never a module shadowing it.
"""

import sys

if __name__ == "__main__":
    from sparsify.cli import train_main

    sys.exit(train_main())
else:
    from sparsify.training.trainer import train

    # the import system binds `sparsify.train` to whatever stands in sys.modules under this name
    sys.modules[__name__] = train  # type: ignore[assignment]
