"""The method-agnostic engine: training loop, inference, metrics, tracking."""
