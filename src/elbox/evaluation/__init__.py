"""Using a trained model: the evaluator, per-example inference (sample, score, encode), encoder tightening, anomaly
scores and out-of-distribution detection, and evaluating a run."""
