"""Evaluation of trained encoders on frozen features.

    features.py   extraction (image folders, shards with .json labels and captions; CLS or patch mean of any
                  block; disk cache)            runs.py   run dirs -> encoder (+ text side for CLIP/SigLIP)
    knn.py        weighted k-NN (DINO's protocol)       probe.py      linear probe (the paper's protocol)
    zeroshot.py   zero-shot classification with prompt templates    retrieval.py  image-text recall@K
    suite.py      `fastenc eval RUN_DIR... --suite` (report.md, results.json, figures)
The embedding pair analysis lives in fastenc.analysis.pairs.
"""
