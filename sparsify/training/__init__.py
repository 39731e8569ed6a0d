"""Training SAEs on a frozen model: the objective of a step (`objective`), the loop (`trainer`),
its batches, state, evaluation, checkpoints and logging. The public entry point is
`sparsify.train` (= `sparsify.training.trainer.train`)."""
