"""
Multi-digit addition as characters: a task with one right answer, for the character tokenizer.

One problem a line, the sum written least significant digit first (--ordinary: as usual):

    123+45=861        (123 + 45 = 168, reversed)
    7+8=51            (15)

Reversed, each answer digit depends on the two operand digits at its place and the carry just written; in
the ordinary order the first answer digit already depends on every carry, so one forward pass must resolve
the whole chain (the harder task, on purpose: results.py --part ordinary). Every answer character (the
digits after '=' and the newline) has one correct value given what precedes it; each operand's digit count
is drawn uniformly from a range, then the number uniformly among those with that many digits.

    python data/addition.py                 # data/addition/{train,val,ood}.txt
    python data/addition.py --ordinary --digits 3 --out_dir data/addition-ordinary
    python train_text.py --data data/addition/train.txt

train.txt and val.txt: operands of 1 to DIGITS digits (different seeds); ood.txt: DIGITS+1 to DIGITS+2
digits, in the same 13 characters. How DIGITS 5 was calibrated: data/README.md.
"""
import argparse
import os
import random


def problems(n, seed, digits, ordinary=False):
    """n problems (a string, one a line) with operands of digits = (lo, hi) digits, from a seed; the sum
    reversed, or most significant digit first (ordinary)."""
    rng = random.Random(seed)
    number = lambda d: rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
    lines = []
    for _ in range(n):
        a, b = number(rng.randint(*digits)), number(rng.randint(*digits))
        lines.append(f"{a}+{b}={str(a + b)[::1 if ordinary else -1]}\n")
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


def carry_chains(a, b):
    """Per digit of a + b, least significant first, how far the carry into it has come: 0, none; 1, made at
    the place below; k, made k places below and passed on by the k - 1 places between, whose digits sum to 9."""
    chains, run = [], 0
    for i in range(len(str(a + b))):
        chains.append(run)
        place = a // 10**i % 10 + b // 10**i % 10
        run = 1 if place >= 10 else run + 1 if place == 9 and run else 0
    return chains


def write(out_dir, digits=5, n_train=200_000, n_eval=2_000, seed=0, ordinary=False):
    """train.txt and val.txt (operands of 1 to `digits` digits), ood.txt (digits + 1 to digits + 2)."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": (n_train, seed, (1, digits)), "val": (n_eval, seed + 1, (1, digits)),
              "ood": (n_eval, seed + 2, (digits + 1, digits + 2))}
    for name, (n, split_seed, operand_digits) in splits.items():
        path = os.path.join(out_dir, f"{name}.txt")
        with open(path + ".tmp", "w") as f:  # renamed when whole: an interrupted write leaves no split
            f.write(problems(n, split_seed, operand_digits, ordinary))
        os.replace(path + ".tmp", path)
        print(f"{path}: {n} problems, operands of {operand_digits[0]} to {operand_digits[1]} digits")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "addition"))
    parser.add_argument("--digits", type=int, default=5, help="training operands have 1 to this many digits")
    parser.add_argument("--n_train", type=int, default=200_000)
    parser.add_argument("--n_eval", type=int, default=2_000, help="problems in val.txt and in ood.txt")
    parser.add_argument("--seed", type=int, default=0, help="train uses seed, val seed + 1, ood seed + 2")
    parser.add_argument("--ordinary", action="store_true", help="write each sum most significant digit first")
    args = parser.parse_args()
    write(args.out_dir, args.digits, args.n_train, args.n_eval, args.seed, args.ordinary)
