"""Writes ``mixed_lengths.csv``: question/answer rows whose lengths spread as instruction data's do.

Each row's length (question plus answer, in SmolLM2 tokens) is drawn from a log-normal distribution (median
90 tokens, sigma 0.8), redrawn outside 20-400 tokens: most rows are short, a long tail reaches 400, so a batch
of eight padded to its longest row is about half padding. About a fifth of a row is its question. The text is
sentences of common words, nearly all one token each with its leading space, so a row's length is about its
number of words and punctuation marks; SmolLM2's chat template adds 33 tokens to every row. A fixed seed: the
same file every time.

    python benchmarks/data/make_mixed_lengths.py                     # rewrites mixed_lengths.csv beside it
    python benchmarks/data/make_mixed_lengths.py --check MODEL_DIR    # also prints the lengths under a tokenizer
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path

OUTPUT = Path(__file__).with_name("mixed_lengths.csv")
ROWS = 320
MEDIAN, SIGMA, SHORTEST, LONGEST = 90, 0.8, 20, 400
QUESTION_SHARE = 0.2
SEED = 16

ADJECTIVES = "small large old new red green cold warm dark bright quiet busy simple early late long short".split()
NOUNS = (
    "river city garden engine market teacher farmer window model table letter bridge forest student system "
    "village machine report planet kitchen"
).split()
VERBS = "move hold find build open follow change show keep join turn need".split()  # each takes a plain -s
PLACES = "in near under over behind after before with".split()
OPENERS = ["How", "Why", "When", "Where"]


def length(generator: random.Random) -> int:
    """One row's tokens, question and answer together."""
    while True:
        drawn = round(math.exp(generator.gauss(math.log(MEDIAN), SIGMA)))
        if SHORTEST <= drawn <= LONGEST:
            return drawn


def sentences(generator: random.Random, tokens: int) -> list[str]:
    """``tokens`` tokens of sentences such as "The old river holds the city near the dark garden." """
    pick = generator.choice
    words: list[str] = []
    while len(words) < tokens:
        words += ["The", pick(ADJECTIVES), pick(NOUNS), pick(VERBS) + "s", "the", pick(NOUNS), pick(PLACES)]
        words += ["the", pick(ADJECTIVES), pick(NOUNS), "."]
    return words[: tokens - 1] + ["."] if tokens else []


def question(generator: random.Random, tokens: int) -> str:
    """Context sentences, then an eight-token question such as "Why does the river hold the city?" """
    pick = generator.choice
    asked = [pick(OPENERS), "does", "the", pick(NOUNS), pick(VERBS), "the", pick(NOUNS), "?"]
    return " ".join(sentences(generator, tokens - len(asked)) + asked).replace(" .", ".").replace(" ?", "?")


def rows(count: int = ROWS, seed: int = SEED) -> list[dict[str, str]]:
    generator = random.Random(seed)
    made = []
    for _ in range(count):
        tokens = length(generator)
        asked = max(8, round(tokens * QUESTION_SHARE))
        answer = " ".join(sentences(generator, tokens - asked)).replace(" .", ".")
        made.append({"question": question(generator, asked), "answer": answer})
    return made


def check(model_dir: str, path: Path) -> None:
    """Print the rows' lengths as a job trains on them, and how much of padded batches of eight is padding."""
    import statistics

    from transformers import AutoTokenizer

    from qubrid_lab.data.columns import ColumnPlan
    from qubrid_lab.data.csv_ingest import read_rows
    from qubrid_lab.data.formatting import build_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = ColumnPlan("qa", question="question", answer="answer")
    lengths = [len(example["input_ids"]) for example in build_examples(read_rows(path), plan, tokenizer, 512).examples]
    ordered = sorted(lengths)
    deciles = [ordered[len(ordered) * share // 10] for share in range(1, 10)]
    print(f"{len(lengths)} rows, {min(lengths)}-{max(lengths)} tokens, median {statistics.median(lengths)}")
    print(f"deciles {deciles}")
    padded = sum(8 * max(lengths[start : start + 8]) for start in range(0, len(lengths) - 7, 8))
    real = sum(lengths[: len(lengths) // 8 * 8])
    print(f"padded batches of 8, in file order: {real / padded:.0%} of their tokens are the rows'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", metavar="MODEL_DIR", help="print the lengths under this model's tokenizer")
    args = parser.parse_args()
    with args.output.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows())
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    if args.check:
        check(args.check, args.output)


if __name__ == "__main__":
    main()
