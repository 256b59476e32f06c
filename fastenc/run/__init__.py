"""The run directory and everything a run leaves in it: the layout (fastenc.run.layout, which every layer may
import), the recorded config (fastenc.run.configs), the metrics (fastenc.run.metrics), the controlled fingerprint
(fastenc.run.fingerprint) and the exported weights (fastenc.run.weights). The engine writes a run through this
package; the study runner, evaluation and analysis read it through this package, never through the engine."""
