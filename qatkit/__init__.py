"""qatkit: quantization-aware training whose exported files compute exactly what was trained.

The pipeline as functions lives in `qatkit.api` (resolve, load, plan, prepare, train, convert,
export, score), not here: qatkit.plan, qatkit.prepare, qatkit.train and qatkit.export are the
modules of those stages, and a function of the same name here would be shadowed by its module as
soon as that is imported. This module stays light: the version and the error type every stage raises.
"""

__version__ = "0.1.0"


class QatkitError(ValueError):
    """Bad user input: a file, model, plan or setting qatkit cannot take. The CLI prints it in
    one line and exits with code 2."""
