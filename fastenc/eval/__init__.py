"""Evaluation of trained encoders on frozen features, and of the vision-language models built on them.

    features.py   extraction (image folders, shards with .json labels and captions; CLS or patch mean of any
                  block; disk cache)            runs.py   run dirs -> encoder (+ text side for CLIP/SigLIP)
    knn.py        weighted k-NN (DINO's protocol)       probe.py      linear probe (the paper's protocol)
    zeroshot.py   zero-shot classification with prompt templates    retrieval.py  image-text recall@K
    vqa.py        multiple-choice VQA in VMCBench's format (likelihood or greedy answers), `fastenc eval vqa`
    chat.py       a vision-language run's answer to one question; exact-match scoring of LLaVA records
    suite.py      `fastenc eval RUN_DIR... --suite` (report.md, results.json, figures)
    results.py    what their results files share: NAME=SOURCE, strict JSON, portable paths
The embedding pair analysis lives in fastenc.analysis.pairs.
"""
