"""evaluate: the worker that answers, the scorers, the metrics, the gate and its decision."""
