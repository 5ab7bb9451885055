"""
Multi-digit addition as characters: a task with one right answer, for the character tokenizer.

One problem a line, the sum written least significant digit first:

    123+45=861        (123 + 45 = 168, reversed)
    7+8=51            (15)

Why reversed: a causal model writes the answer left to right, and carries travel from the low
digits up. Written in the ordinary order, the first answer digit already depends on every carry;
reversed, each digit depends on the two operand digits at its place and the carry just written
(measured, Transformer++ at --preset cpu, 2000 steps, operands of 1 to 3 digits: 99.9% of answer
tokens and 99.5% of answers right reversed, 92.8% and 76.5% in the ordinary order).
Every answer character (the digits after '=' and the newline that ends them) has exactly one
correct value given what precedes it; the operands are random. Each operand's digit count is
drawn uniformly from a range, then the number uniformly among those with that many digits.

    python data/addition.py                 # data/addition/{train,val,ood}.txt
    python train_text.py --data data/addition/train.txt

train.txt and val.txt: operands of 1 to DIGITS digits (different seeds; short problems repeat,
there are only 100 one-digit pairs); ood.txt: operands of DIGITS+1 to DIGITS+2 digits, more than any
training problem, in the same 13 characters. DIGITS 5 (the default) was calibrated on the
Transformer++ baseline at --preset cpu, 2000 steps: about 60% of answer tokens right in
distribution (3 digits: 99.9%, 6: 47%), 19% out of distribution.
"""
import argparse
import os
import random


def problems(n, seed, digits):
    """n problems (a string, one a line) with operands of digits = (lo, hi) digits, from a seed."""
    rng = random.Random(seed)
    number = lambda d: rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
    lines = []
    for _ in range(n):
        a, b = number(rng.randint(*digits)), number(rng.randint(*digits))
        lines.append(f"{a}+{b}={str(a + b)[::-1]}\n")
    return "".join(lines)


def answer_spans(text):
    """(start, end) character spans of the answers: text[start:end] is what follows a '=' up to and
    including its newline. Position i in a span is an answer token: predict text[i] from text[:i]."""
    spans, start = [], None
    for i, c in enumerate(text):
        if c == "=":
            start = i + 1
        elif c == "\n" and start is not None:
            spans.append((start, i + 1))
            start = None
    return spans


def answer_positions(text):
    """Every answer token's character position, in order."""
    return [i for start, end in answer_spans(text) for i in range(start, end)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "addition"))
    parser.add_argument("--digits", type=int, default=5, help="training operands have 1 to this many digits")
    parser.add_argument("--n_train", type=int, default=200_000)
    parser.add_argument("--n_eval", type=int, default=2_000, help="problems in val.txt and in ood.txt")
    parser.add_argument("--seed", type=int, default=0, help="train uses seed, val seed + 1, ood seed + 2")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    splits = {"train": (args.n_train, args.seed, (1, args.digits)),
              "val": (args.n_eval, args.seed + 1, (1, args.digits)),
              "ood": (args.n_eval, args.seed + 2, (args.digits + 1, args.digits + 2))}
    for name, (n, seed, digits) in splits.items():
        path = os.path.join(args.out_dir, f"{name}.txt")
        with open(path, "w") as f:
            f.write(problems(n, seed, digits))
        print(f"{path}: {n} problems, operands of {digits[0]} to {digits[1]} digits")
