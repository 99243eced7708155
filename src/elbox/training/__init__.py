"""Training: objectives, the trainer, its checkpoint state, and the fit/resume workflows behind the public API."""
