"""Write the arithmetic data sets of the SmolLM2 recipes (deterministic: fixed seed, no network).

Run from the repository root: ``python recipes/data/make_arith.py`` (``--check`` only verifies that the
committed files are what the script writes). Every row is ``{"id", "prompt", "answer", "op", "a", "b",
"phrasing"}``, the format of ``arith1d_*.jsonl`` (the recipes load them with ``type: jsonl, id_field:
id, task: math``; the extra fields go to ``Example.meta``).

In domain, one-digit addition (operands 0-9: 100 ordered pairs) in six phrasings (``ADD_PHRASINGS``).
The split is **by operands, commutation included**: a seeded draw of unordered pairs {a, b} goes to
the test set, with both orders and all six phrasings, until the test set holds ≥ 20 ordered pairs;
no test prompt shares its operands (in either order) with a training prompt, so a test prompt is
never a training prompt in another phrasing either.

* ``arith_add1d_train.jsonl``: the other ordered pairs × 6 phrasings;
* ``arith_add1d_test.jsonl``: the held-out pairs × 6 phrasings (≥ 120 prompts).

Out of domain (never trained on), 120 prompts each, 20 per phrasing, seeded draws without repetition:

* ``arith_sub1d_test.jsonl``: one-digit subtraction a − b with 0 ≤ b ≤ a ≤ 9 (no negative answers);
* ``arith_mul1d_test.jsonl``: one-digit multiplication, operands 0-9;
* ``arith_add2d_test.jsonl``: two-digit addition, operands 10-99, the six addition phrasings.

``general_prompts.jsonl``: ~100 short general instructions without answers (written here, not taken
from any benchmark), for a forgetting measure on the base model's own answers (``answer`` absent:
load with ``answer_field: null``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20250
OUT = Path(__file__).resolve().parent
JUST = " Answer with just the number."

ADD_PHRASINGS = {
    "what": "What is {a} + {b}?",
    "what_num": "What is {a} + {b}?" + JUST,
    "plus": "Compute {a} plus {b}.",
    "add_num": "Add {a} and {b}." + JUST,
    "eq": "{a} + {b} = ?",
    "sum_only": "What is the sum of {a} and {b}? Give only the final number.",
}
SUB_PHRASINGS = {
    "what": "What is {a} - {b}?",
    "what_num": "What is {a} - {b}?" + JUST,
    "minus": "Compute {a} minus {b}.",
    "sub_num": "Subtract {b} from {a}." + JUST,
    "eq": "{a} - {b} = ?",
    "diff_only": "What is {a} minus {b}? Give only the final number.",
}
MUL_PHRASINGS = {
    "what": "What is {a} * {b}?",
    "what_num": "What is {a} × {b}?" + JUST,
    "times": "Compute {a} times {b}.",
    "mul_num": "Multiply {a} and {b}." + JUST,
    "eq": "{a} × {b} = ?",
    "product_only": "What is the product of {a} and {b}? Give only the final number.",
}
OPS = {
    "add": (ADD_PHRASINGS, lambda a, b: a + b),
    "sub": (SUB_PHRASINGS, lambda a, b: a - b),
    "mul": (MUL_PHRASINGS, lambda a, b: a * b),
}

N_TEST_PAIRS = 20  # ordered one-digit addition pairs held out (at least)
N_OOD_PER_PHRASING = 20


def row(op: str, a: int, b: int, phrasing: str, tag: str) -> dict:
    templates, fn = OPS[op]
    return {
        "id": f"{tag}-{a}-{b}-{phrasing}",
        "prompt": templates[phrasing].format(a=a, b=b),
        "answer": str(fn(a, b)),
        "op": op,
        "a": a,
        "b": b,
        "phrasing": phrasing,
    }


def add1d_split(rng: random.Random) -> tuple[list[dict], list[dict]]:
    unordered = [(a, b) for a in range(10) for b in range(a, 10)]
    rng.shuffle(unordered)
    held: set[tuple[int, int]] = set()
    for a, b in unordered:
        if len(held) >= N_TEST_PAIRS:
            break
        held |= {(a, b), (b, a)}
    pairs = [(a, b) for a in range(10) for b in range(10)]
    train = [row("add", a, b, p, "add1d") for a, b in pairs if (a, b) not in held for p in ADD_PHRASINGS]
    test = [row("add", a, b, p, "add1d") for a, b in pairs if (a, b) in held for p in ADD_PHRASINGS]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def ood(rng: random.Random, op: str, pairs: list[tuple[int, int]], tag: str) -> list[dict]:
    templates, _ = OPS[op]
    rows = []
    for p in templates:
        for a, b in rng.sample(pairs, N_OOD_PER_PHRASING):
            rows.append(row(op, a, b, p, tag))
    rng.shuffle(rows)
    return rows


# Short general instructions for a forgetting measure: (category, text). Written for this file.
GENERAL = [
    "Name three colors.",
    "Name three animals that live in the ocean.",
    "List four fruits that are red.",
    "Give a synonym for 'happy'.",
    "Give an antonym for 'cold'.",
    "Name the days of the weekend.",
    "Write one sentence about the sun.",
    "Write a short greeting for a birthday card.",
    "Describe a cat in one sentence.",
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Which planet is closest to the sun?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Name a musical instrument with strings.",
    "Translate 'thank you' into Spanish.",
    "Translate 'good morning' into French.",
    "Spell the word 'necessary' backwards.",
    "What is the plural of 'mouse'?",
    "What is the past tense of 'run'?",
    "Give two examples of vegetables.",
    "Name three kinds of weather.",
    "Write a haiku about rain.",
    "Suggest a name for a pet dog.",
    "Suggest a title for a story about a lost key.",
    "What do bees make?",
    "What is water made of?",
    "Why do we need sleep? Answer in one sentence.",
    "Name two things you can find in a kitchen.",
    "Explain what a noun is in one sentence.",
    "Give an example of a verb.",
    "What season comes after winter?",
    "How many months are in a year?",
    "Name the largest ocean on Earth.",
    "What is the opposite of 'up'?",
    "Write a sentence using the word 'bright'.",
    "Give three tips for staying healthy.",
    "Name a famous painter.",
    "What is the boiling point of water in Celsius?",
    "Describe the taste of a lemon in one word.",
    "List three things people do on holidays.",
    "Name a fruit that is yellow.",
    "What do plants need to grow?",
    "Write a polite way to say no to an invitation.",
    "Give a one-sentence summary of the story of Cinderella.",
    "What is a triangle?",
    "Name three shapes.",
    "What does a thermometer measure?",
    "Name two sports played with a ball.",
    "What is the first letter of the English alphabet?",
    "Rewrite 'the dog is big' in the plural.",
    "Complete the sentence: The early bird ...",
    "Name an animal that can fly.",
    "What is the color of grass?",
    "Give one reason to read books.",
    "What is the freezing point of water in Fahrenheit?",
    "Name a country in South America.",
    "Tell me a fun fact about elephants.",
    "Write a short thank-you note to a teacher.",
    "What do you call a baby cat?",
    "Name three things that are cold.",
    "What is the main language spoken in Brazil?",
    "Suggest a healthy breakfast.",
    "Explain what a rainbow is in one sentence.",
    "Give a word that rhymes with 'cat'.",
]

# GSM8K-like one-step and two-step word problems from templates (no answers are stored).
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea"]
_WORD_TEMPLATES = [
    "{n} has {x} apples and buys {y} more. How many apples does {n} have now?",
    "{n} had {x} stickers and gave {y} to a friend. How many stickers are left?",
    "A box holds {x} pencils. How many pencils are in {y} boxes?",
    "{n} reads {x} pages a day. How many pages does {n} read in {y} days?",
    "There are {x} birds on a tree and {y} fly away. How many birds are still on the tree?",
    "{n} saves {x} dollars each week for {y} weeks, then spends 5 dollars. How much money is left?",
    "A class has {x} girls and {y} boys. How many students are in the class?",
]
N_WORD = 35


def general_prompts(rng: random.Random) -> list[dict]:
    rows = [
        {"id": f"general-{i:03d}", "prompt": text, "kind": "instruction"} for i, text in enumerate(GENERAL)
    ]
    seen: set[str] = set()
    while len(seen) < N_WORD:
        t = rng.choice(_WORD_TEMPLATES)
        x, y = rng.randint(6, 30), rng.randint(2, 5)
        q = t.format(n=rng.choice(_NAMES), x=x, y=y)
        if q not in seen:
            seen.add(q)
            rows.append({"id": f"word-{len(seen) - 1:03d}", "prompt": q, "kind": "word_problem"})
    return rows


def build() -> dict[str, list[dict]]:
    train, test = add1d_split(random.Random(f"{SEED}-add1d"))
    sub_pairs = [(a, b) for a in range(10) for b in range(a + 1)]
    mul_pairs = [(a, b) for a in range(10) for b in range(10)]
    rng2 = random.Random(f"{SEED}-add2d")
    add2d_pairs = sorted({(rng2.randint(10, 99), rng2.randint(10, 99)) for _ in range(400)})
    return {
        "arith_add1d_train.jsonl": train,
        "arith_add1d_test.jsonl": test,
        "arith_sub1d_test.jsonl": ood(random.Random(f"{SEED}-sub1d"), "sub", sub_pairs, "sub1d"),
        "arith_mul1d_test.jsonl": ood(random.Random(f"{SEED}-mul1d"), "mul", mul_pairs, "mul1d"),
        "arith_add2d_test.jsonl": ood(random.Random(f"{SEED}-add2d-rows"), "add", add2d_pairs, "add2d"),
        "general_prompts.jsonl": general_prompts(random.Random(f"{SEED}-general")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="Write (or --check) the arithmetic data sets.")
    ap.add_argument("--check", action="store_true", help="verify the files instead of writing them")
    args = ap.parse_args()
    bad = 0
    for name, rows in build().items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path = OUT / name
        if args.check:
            ok = path.is_file() and path.read_text() == text
            bad += not ok
            print(f"{name}: {'ok' if ok else 'DIFFERS'}")
        else:
            path.write_text(text)
            print(f"{name}: {len(rows)} rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
