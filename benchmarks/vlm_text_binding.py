"""Can a vision-language run's LM bind an answer it is told to its option letter? Text-only probe.

    python benchmarks/vlm_text_binding.py RUN_DIR [--n 150]

Asks `n` text-only multiple-choice questions on images no stage trained on (indices 7000+, seed 0 world). Each
question states the attributes in words first (fastenc.datatools.synth_vqa.text_only_record). The prediction is
the letter with the highest likelihood (fastenc.eval.vqa's scoring), and the script prints its accuracy against
chance (25 %). A model at chance here cannot map a known answer to its letter, so the paper's letter-likelihood
protocol cannot show what its vision tower gives it. results/vlm_recipe_cpu/README.md has the numbers.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=150)
    args = p.parse_args(argv)
    import numpy as np

    from fastenc.datatools.synth import render_sample
    from fastenc.datatools.synth_vqa import LETTERS, text_only_record
    from fastenc.eval.vqa import _conversations, sequence_logliks
    from fastenc.run.weights import load_vlm

    vlm = load_vlm(args.run_dir)
    enc = _conversations(vlm)
    rng = np.random.default_rng(5)
    right = 0
    for i in range(7000, 7000 + args.n):
        turns = text_only_record(render_sample(i)[1], rng)["conversations"]
        human, answer = turns[0]["value"], turns[1]["value"]
        rows = [enc({"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": letter}]},
                    has_image=False) for letter in LETTERS]
        ll = sequence_logliks(vlm.model, rows, None)
        right += LETTERS[int(np.argmax(ll))] == answer
    print(f"text-only letter binding: {100 * right / args.n:.1f}% of {args.n} (chance 25.0%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
