"""Evaluation of trained encoders: k-NN on frozen features (linear probes, zero-shot and retrieval come next)."""
