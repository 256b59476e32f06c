"""The run directory and everything a run leaves in it: the layout (fastenc.run.layout), the metrics
(fastenc.run.metrics), the controlled fingerprint (fastenc.run.fingerprint) and the exported weights
(fastenc.run.weights). The engine writes a run through this package; the study runner, evaluation and analysis read
it through this package, never through the engine."""

from fastenc.run.layout import RunDir, load_config_or_run

__all__ = ["RunDir", "load_config_or_run"]
