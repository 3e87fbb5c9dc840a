"""The ML lifecycle (datasets, training, evaluation, model installation); never imported by the runtime."""
