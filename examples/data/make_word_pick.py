"""Writes `word_pick.jsonl`, the data of `make demo-llm` (examples/finetune_llm.py): seeded, so the same file
on every machine. CC0-1.0, like the rest of this folder (see LICENSE).

Each example asks for the word at one position of a short list of common English words; the answer is
that word alone, e.g. {"prompt": "Which word is third in: lamp, river, cold, seven?", "answer": "cold",
"split": "train"}. A small instruct model tends to answer another word or a sentence; exact match of the
greedy answer is the metric.

    python examples/data/make_word_pick.py [--out examples/data/word_pick.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import random

WORDS = (
    "apple river stone cloud lamp chair bread music garden window horse winter candle paper silver ocean "
    "forest pencil mirror basket rabbit tiger planet bottle jacket button ladder carpet doctor engine "
    "farmer hammer island kettle lemon monkey number orange pepper rocket saddle tomato valley wallet yellow "
    "anchor bridge castle desert feather ginger harbor jungle kitten meadow needle parrot rabbit sunset "
    "thunder violin walnut zebra cotton dragon falcon helmet marble pillow shadow spider summer turtle"
).split()
POSITIONS = {"first": 0, "second": 1, "third": 2, "fourth": 3, "last": -1}
TEMPLATES = ("Which word is {pos} in: {words}?", "Give the {pos} word of this list: {words}.",
             "In the list {words}, what is the {pos} word?")
SPLITS = {"train": 1200, "test": 100}
SEED = 21


def examples(rng: random.Random, n: int, split: str) -> list[dict[str, str]]:
    words = sorted(set(WORDS))
    out = []
    for _ in range(n):
        chosen = rng.sample(words, rng.choice((4, 5)))
        pos = rng.choice(tuple(POSITIONS))
        prompt = rng.choice(TEMPLATES).format(pos=pos, words=", ".join(chosen))
        out.append({"prompt": prompt, "answer": chosen[POSITIONS[pos]], "split": split})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "word_pick.jsonl"))
    args = parser.parse_args()
    rng = random.Random(SEED)
    rows = [row for split, n in SPLITS.items() for row in examples(rng, n, split)]
    held_out = {r["prompt"] for r in rows if r["split"] == "test"}
    rows = [r for r in rows if r["split"] == "test" or r["prompt"] not in held_out]  # no test prompt in train
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{args.out}: {sum(r['split'] == 'train' for r in rows)} train, {len(held_out)} test")


if __name__ == "__main__":
    main()
