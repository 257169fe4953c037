"""Command line for synthesising data, training, evaluating and predicting (``python -m training``)."""
