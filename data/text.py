"""
Text and its tokens, read with one-line errors: Tiny Shakespeare (shipped, compressed), a text file, the
character and GPT-2 tokenizers, and training's batches, random windows of token ids (a memmap reads only these).
"""
import os
import re
from pathlib import Path

import numpy as np
import torch

from checks import UsageError

SHAKESPEARE = Path(__file__).resolve().parent / "tinyshakespeare.txt.gz"  # ships with nanoEBT; data/prepare.py reads it
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SAFE_CUT = re.compile(r"\n(?=\S)")  # GPT-2's pre-tokenizer ends a piece here: BPE may cut a text here, its ids the same


def read_text(path, flag):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path} " + ("is a directory" if path.is_dir() else "does not exist")
                         + f"; pass a text file with {flag}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path} is not readable UTF-8 text ({e})") from None
    if not text:
        raise UsageError(f"{flag} {path} is empty; pass a text file with {flag}")
    return text


class CharTokenizer:
    """One id per character, in the order given. unknown: the character (in chars) that every other one reads as (the
    rare characters data/prepare.py merges); None: another character is an error."""

    def __init__(self, chars, unknown=None):
        self.chars, self.unknown = list(chars), unknown
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size, none = len(self.chars), self.index.get(unknown, -1)
        points = [ord(c) for c in self.chars]  # code point -> id, `none` for none (also the last, past them all)
        self.table = np.full(max(points, default=0) + 2, none, np.int32)
        self.table[points] = np.arange(len(points))
        self.ascii_ids = bytes(self.index.get(chr(b), none % 256) if self.vocab_size < 255 else 255 for b in range(256))

    def encode(self, text):
        return self.encode_array(text).tolist()

    def encode_array(self, text):
        """The ids of a text as an array, at numpy's speed: each code point looked up in a table; ASCII text and a
        vocabulary under 255, the common case, at bytes' speed (bytes.translate, 255 for none)."""
        if text.isascii() and self.vocab_size < 255:
            ids = np.frombuffer(text.encode("ascii").translate(self.ascii_ids), np.uint8)
        else:
            ids = self.table[np.minimum(np.frombuffer(text.encode("utf-32-le"), np.uint32), len(self.table) - 1)]
        if (ids == (255 if ids.dtype == np.uint8 else -1)).any():
            raise UsageError(f"characters not in the vocabulary: {''.join(sorted(set(text) - set(self.index)))!r}")
        return ids

    def decode(self, ids):  # an id past the characters (a padded --vocab_size) reads as U+FFFD
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids)

    def state(self):
        return {"kind": "char", "chars": "".join(self.chars), **({"unknown": self.unknown} if self.unknown else {})}


class GPT2Tokenizer:
    def __init__(self):
        try:
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its BPE files on first use
            raise UsageError(f"could not load the gpt2 tokenizer through tiktoken ({type(e).__name__}: {e}); "
                             "it needs its files cached or network access, or use --tokenizer char") from None
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_array(self, text, piece=1 << 16):
        """encode() of a long text as an array, on every core: cut into pieces of about `piece` characters where
        GPT-2's pre-tokenizer cuts too (SAFE_CUT), so the ids are the whole's."""
        pieces, start = [], 0
        while start < len(text):
            cut = SAFE_CUT.search(text, start + piece - 1)
            end = cut.end() if cut else len(text)
            pieces.append(text[start:end])
            start = end
        batches = self.enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
        return np.concatenate([np.asarray(ids, np.int64) for ids in batches]) if batches else np.zeros(0, np.int64)

    def decode(self, ids):
        return self.enc.decode([i if i < self.vocab_size else self.enc.eot_token for i in ids])

    def state(self):
        return {"kind": "gpt2"}


def tokenizer_from_state(state, where="the checkpoint"):
    """The tokenizer a meta.json or a checkpoint (where) records, or one line if it is none this nanoEBT writes."""
    kind, chars = (state.get("kind"), state.get("chars")) if isinstance(state, dict) else (None, None)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(chars, str) and len(set(chars)) == len(chars) > 0 and state.get("unknown") in (
            None, *chars):
        return CharTokenizer(chars, state.get("unknown"))
    raise UsageError(f"{where} records a tokenizer this nanoEBT does not write ({str(state)[:80]}): not char with its "
                     "characters, nor gpt2; prepare or train it again")


def random_windows(ids, length, count, generator):
    """count random windows of 1-D token ids (a memmap reads only these): inputs, targets, each (count, length)."""
    start = torch.randint(len(ids) - length, (count,), generator=generator)
    chunk = torch.as_tensor(np.asarray(ids[(start[:, None] + torch.arange(length + 1)).numpy()], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]


class TextData:
    """Train and validation token ids (1-D arrays or memmaps); a batch is random windows and their targets."""

    def __init__(self, train, val, block_size, source="text"):
        if min(len(train), len(val)) < block_size + 1:
            raise UsageError(f"{source} has {len(train):,} training and {len(val):,} validation tokens: too few for "
                             f"block size {block_size} (each needs {block_size + 1}); use more text or a smaller --block_size")
        self.split = {"train": train, "val": val}
        self.block_size = self.tokens_per_sample = block_size

    def batch(self, split, batch_size, generator):
        return random_windows(self.split[split], self.block_size, batch_size, generator)
