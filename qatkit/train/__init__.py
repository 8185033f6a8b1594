"""Training: the data and the loop of a QAT run."""
