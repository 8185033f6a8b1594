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


# Loggers of libraries that talk at import: torchao (pulled in by transformers when the mobile
# extra is installed) announces every CUDA kernel library it cannot load on a CPU machine and the
# missing triton; torch's pytree warns about torchao's enums. None of it concerns a qatkit user.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Raise the loggers in IMPORT_NOISE to ERROR (before the imports that would talk)."""
    import logging

    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def patched(owners, name: str, value):
    """A context manager: attribute `name` of every object in `owners` is `value` inside the
    block (a library function qatkit must replace while it exports or loads), the originals
    after it, whatever happens."""
    import contextlib

    @contextlib.contextmanager
    def block():
        saved = [(o, getattr(o, name)) for o in owners]
        try:
            for o in owners:
                setattr(o, name, value)
            yield
        finally:
            for o, v in saved:
                setattr(o, name, v)

    return block()
