"""Code that runs on a compute node: training, evaluation and export of one cell."""
