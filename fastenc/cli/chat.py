"""`fastenc chat RUN_DIR --image X "question"`: a trained vision-language run's greedy answer (a first check), and
`--score RECORDS.json --images DIR` for its exact-match accuracy on records with known answers."""

from __future__ import annotations

import argparse
import json


def add_chat_args(p: argparse.ArgumentParser) -> None:
    # The words after `chat` are parsed by chat_parser() with intermixed options (`RUN --image X "question"`), which
    # argparse cannot do inside a subcommand.
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="RUN_DIR [--image IMG] QUESTION | RUN_DIR --score R",
                   help="see `fastenc chat -- --help`")


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastenc chat", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished llava run (stage 1 or 2)")
    p.add_argument("question", nargs="?", help="what to ask about the image")
    p.add_argument("--image", default=None, help="the image file (omit for a text-only question)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--score", default=None, metavar="RECORDS.json",
                   help="instead of one question: the exact-match accuracy on every question of a LLaVA records file")
    p.add_argument("--images", default=".", metavar="DIR", help="the image folder of --score's records")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    return p


def run_chat(args: argparse.Namespace) -> int:
    from fastenc.eval.chat import answer, score_records
    from fastenc.run.weights import load_vlm

    args = chat_parser().parse_intermixed_args([a for a in args.argv if a != "--"])
    if (args.question is None) == (args.score is None):
        print("fastenc chat: give a question, or --score RECORDS.json (one of the two)")
        return 2
    try:
        vlm = load_vlm(args.run_dir)
    except FileNotFoundError as e:
        print(f"fastenc chat: {e}")
        return 2
    if args.score:
        print(json.dumps(score_records(vlm, args.score, args.images, limit=args.limit), indent=1))
    else:
        print(answer(vlm, args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0
