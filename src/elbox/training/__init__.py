"""Training: settings (config), objectives, the trainer, its checkpoint state, and the fit/resume/evaluate
workflows behind the public API."""
