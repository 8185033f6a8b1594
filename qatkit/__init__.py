"""qatkit: quantization-aware training whose exported files compute exactly what was trained."""

__version__ = "0.1.0"


class QatkitError(ValueError):
    """Bad user input: a file, model, plan or setting qatkit cannot take. The CLI prints it in
    one line and exits with code 2."""
