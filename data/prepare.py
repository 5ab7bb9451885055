"""
Prepare a text corpus once: flat files of token ids that training reads as random windows of a numpy
memmap (nanoGPT's way), so a corpus of any size trains in the same memory and starts at once.

    python data/prepare.py my.txt --out_dir data/my               # a file, a folder of text files, or a glob
    python data/prepare.py "books/*.txt" --out_dir data/books --tokenizer gpt2
    python train_text.py --data data/my

out_dir gets train.bin and val.bin (the last tenth of the tokens), uint16 ids while the vocabulary fits
(else uint32), and meta.json: the tokenizer and its state, the vocabulary size, the token counts, the
split, each source's size and checksum, and an id naming this preparation, which checkpoints record.
It streams: the text is read in chunks (characters: once for the vocabulary, once to encode; BPE:
tiktoken's batch encoder on every core), so memory stays flat whatever the corpus size. meta.json is
written last: a folder without it is not prepared. `train_text.py --data FILE.txt` prepares the file
into a cache (data/cache/, or $NANOEBT_CACHE) on first use, keyed by its path, size and time.
"""
import fcntl
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules
import cli  # noqa: E402  (before numpy: a Ctrl-C while it loads exits quietly)
import numpy as np  # noqa: E402
import rundir  # noqa: E402
from checks import UsageError  # noqa: E402
from data.text import CharTokenizer, GPT2Tokenizer, SHAKESPEARE, SHAKESPEARE_SHA256, tokenizer_from_state  # noqa: E402

CHUNK = 1 << 22  # characters read at a time
VAL_FRACTION = 0.1
CACHE = Path(os.environ.get("NANOEBT_CACHE", Path(__file__).resolve().parent / "cache"))


def sources_of(spec):
    """The text files a --data or prepare argument names: a file, every file in a folder (sorted), or a glob."""
    path = Path(spec)
    files = ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
             if path.is_dir() else sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file()))
    if not files:
        raise UsageError(f"{spec}: " + ("a folder with no files" if path.is_dir() else "no such file, folder or glob")
                         + "; pass a text file, a folder of text files or a glob")
    return files


def chunks(path):
    """The text of a file (a .gz is decompressed) in chunks of CHUNK characters, checked to be text."""
    opened = gzip.open if path.suffix == ".gz" else open
    try:
        with opened(path, "rt", encoding="utf-8") as f:
            while chunk := f.read(CHUNK):
                if "\x00" in chunk:
                    raise UnicodeDecodeError("utf-8", b"\x00", 0, 1, "a NUL byte")
                yield chunk
    except (UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason if isinstance(e, UnicodeDecodeError) else e}): "
                         "binary? pass text files") from None


class Progress:
    """MB read, MB/s, tokens and time left: on a terminal one line on stderr, redrawn at most 5 times a second;
    elsewhere (a log) only the last, through say."""

    def __init__(self, what, total_bytes, say=print):
        self.what, self.total, self.say, self.start, self.shown = what, total_bytes, say, time.time(), 0.0
        self.live = sys.stderr.isatty()

    def __call__(self, done_bytes, tokens, final=False):
        now = time.time()
        if not final and (not self.live or now - self.shown < 0.2):
            return
        self.shown, rate = now, done_bytes / max(now - self.start, 1e-9)
        left = (self.total - done_bytes) / rate if rate else 0
        line = (f"{self.what}: {done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB | {rate / 1e6:,.1f} MB/s | "
                f"{tokens:,} tokens | " + (f"{now - self.start:.1f} s" if final else f"ETA {int(left) // 60}m{int(left) % 60:02d}s"))
        if self.live:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            self.say(line)


def encoded(files, tokenizer, progress, sources):
    """Token id arrays of the files' text in order; appends each file's size and checksum to sources once read."""
    done, tokens, anywhere = 0, 0, isinstance(tokenizer, CharTokenizer)
    for f in files:
        digest, n, size, held = hashlib.sha256(), 0, f.stat().st_size, ""
        for chunk in chunks(f):
            digest.update(chunk.encode("utf-8"))  # of the text as read: as a checkpoint's checksum of a text was
            text, n = held + chunk, n + len(chunk)
            cut = len(text) if anywhere else last_safe_cut(text)  # BPE: the rest waits for the next chunk
            ids, held = tokenizer.encode_array(text[:cut]), text[cut:]
            tokens += len(ids)
            progress(done + min(size, n), tokens)
            yield ids
        if n == 0:
            raise UsageError(f"{f} is empty; pass text files with something in them")
        if held:
            ids = tokenizer.encode_array(held)
            tokens += len(ids)
            yield ids
        done += size
        sources.append({"path": str(f), "bytes": size, "sha256": digest.hexdigest()})
    progress(done, tokens, final=True)


def code_points(text):
    """The code points text holds, some more than once; ASCII text, the common case, at bytes' speed: deleting its
    bytes from all 128 leaves the absent ones."""
    if text.isascii():
        return np.setdiff1d(np.arange(128), np.frombuffer(bytes(range(128)).translate(None, text.encode("ascii")), np.uint8))
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def last_safe_cut(text):
    """The last place where BPE may cut text (safe_cut), 0 if none."""
    at = text.rfind("\n", 0, len(text) - 1)
    while at != -1 and text[at + 1].isspace():
        at = text.rfind("\n", 0, at)
    return at + 1


def prepare(spec, out_dir, tokenizer="char", overwrite=False, say=print):
    """Tokenize the files spec names into out_dir (see the module's docstring). Returns the folder's meta."""
    out, files = Path(out_dir), sources_of(spec)
    if (out / "meta.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a prepared corpus; pass --overwrite to replace it, or another --out_dir")
    rundir.check_out_dir(out)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the folder is not a prepared corpus
    if tokenizer == "char":  # the vocabulary first: every character of the corpus, in code point order
        seen, total = np.zeros(0x110000, bool), sum(f.stat().st_size for f in files)  # one flag per code point
        progress, done = Progress("reading the characters", total, say), 0
        for f in files:
            for chunk in chunks(f):
                seen[code_points(chunk)] = True
                progress(done, 0)
            done += f.stat().st_size
        progress(done, 0, final=True)
        tok = CharTokenizer(chr(p) for p in np.flatnonzero(seen))
    else:
        tok = GPT2Tokenizer()
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    all_ids, sources = out / "tokens.bin.tmp", []
    with open(all_ids, "wb") as f:
        for ids in encoded(files, tok, Progress(f"tokenizing ({tokenizer})", sum(f.stat().st_size for f in files), say),
                           sources):
            ids.astype(dtype).tofile(f)
    n = all_ids.stat().st_size // np.dtype(dtype).itemsize
    n_val = int(n * VAL_FRACTION)
    rundir.write_atomically(out / "val.bin", lambda tmp: copy_tail(all_ids, (n - n_val) * np.dtype(dtype).itemsize, tmp))
    os.truncate(all_ids, (n - n_val) * np.dtype(dtype).itemsize)
    os.replace(all_ids, out / "train.bin")
    meta = {"format": "nanoebt-tokens-1", "tokenizer": tok.state(), "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "tokens": {"train": n - n_val, "val": n_val}, "val_fraction": VAL_FRACTION,
            "sources": sources}
    content = {**meta, "sources": [s["sha256"] for s in sources]}  # the same text prepared anywhere: the same id
    meta["id"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    rundir.write_atomically(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    say(f"prepared {out}: {n - n_val:,} training and {n_val:,} validation tokens ({np.dtype(dtype).name}), "
        f"vocabulary {tok.vocab_size:,}")
    return meta


def copy_tail(source, offset, target):
    """source's bytes from offset on into target, a block at a time (a memmap's pages would count in memory)."""
    with open(source, "rb") as f, open(target, "wb") as out:
        f.seek(offset)
        shutil.copyfileobj(f, out, 1 << 24)


def split(ids):
    """A token array held in memory, split as prepare() splits its files: (train, val), the last tenth validating."""
    ids = np.asarray(ids)
    n_val = int(len(ids) * VAL_FRACTION)
    return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


class Corpus:
    """A prepared folder, checked: meta (its record), train and val (numpy memmaps of token ids), the tokenizer."""

    def __init__(self, folder):
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            counts, dtype, vocab = meta["tokens"], np.dtype(meta["dtype"]), int(meta["vocab_size"])
            meta["id"], meta["tokenizer"]
        except FileNotFoundError:
            raise UsageError(f"{folder} is not a prepared corpus (no meta.json, or its preparing was interrupted); "
                             f"prepare it: python data/prepare.py SOURCE --out_dir {folder} --overwrite") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{folder}/meta.json is damaged ({type(e).__name__}: {e}); prepare it again with "
                             "--overwrite") from None
        if dtype not in (np.uint16, np.uint32) or vocab > np.iinfo(dtype).max + 1:
            raise UsageError(f"{folder}/meta.json: a vocabulary of {vocab:,} does not fit its token dtype {dtype.name}; "
                             "prepare it again with --overwrite")
        for split in ("train", "val"):
            path, expected = folder / f"{split}.bin", counts[split] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise UsageError(f"{path} is missing or truncated ({path.stat().st_size if path.is_file() else 0:,} bytes, "
                                 f"{expected:,} expected); prepare the corpus again with --overwrite")
        self.folder, self.meta, self.id, self.name = folder, meta, meta["id"], str(folder)
        self.train, self.val = (np.memmap(folder / f"{s}.bin", dtype, "r") if counts[s] else np.zeros(0, dtype)
                                for s in ("train", "val"))
        self.tokenizer = tokenizer_from_state(meta["tokenizer"])

    def check_trained_on(self, ckpt, name, hint):
        """Refuse a checkpoint that another corpus trained: by the id of its preparation (a checkpoint from before
        prepared corpora: by its text's checksum); a check of meta.json, no corpus read again."""
        recorded = ckpt.get("data") or {}
        same = recorded.get("id") == self.id if "id" in recorded else recorded.get("sha256") in (
            None, *(s["sha256"] for s in self.meta["sources"][:1] if len(self.meta["sources"]) == 1))
        if not same:
            then = recorded.get("path") or "Tiny Shakespeare"
            raise UsageError(f"{self.name} is not the corpus {name} was trained on ({then}, as prepared then: "
                             f"another text or tokenizer); {hint}")


def corpus(data=None, tokenizer=None, say=print):
    """The corpus of train_text.py --data: a prepared folder (its own tokenizer); a text file, prepared with
    tokenizer (default char) into the cache on first use; None, Tiny Shakespeare (shipped) likewise."""
    path = Path(data) if data else SHAKESPEARE
    if data and path.is_dir():
        prepared = Corpus(path)
        if tokenizer not in (None, prepared.meta["tokenizer"]["kind"]):
            raise UsageError(f"--tokenizer {tokenizer} conflicts with {path}, prepared with "
                             f"{prepared.meta['tokenizer']['kind']}; leave it out, or prepare the text again")
        return prepared
    tokenizer = tokenizer or "char"
    if not path.is_file():
        raise UsageError(f"--data {data} does not exist; pass a text file or a folder prepared by data/prepare.py")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tokenizer}".encode()).hexdigest()[:16]
    folder = CACHE / f"{path.name}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "w")
    except OSError as e:
        raise UsageError(f"the cache {folder} cannot be written ({e.strerror or e}); set NANOEBT_CACHE to a folder you "
                         "can write to, or prepare the corpus with data/prepare.py") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares (a torchrun rank, another run); the others wait
        if not (folder / "meta.json").exists():
            say(f"preparing {path} into {folder} (once; python data/prepare.py does it by hand)")
            meta = prepare(path, folder, tokenizer, overwrite=True, say=say)
            if path == SHAKESPEARE and meta["sources"][0]["sha256"] != SHAKESPEARE_SHA256:
                (folder / "meta.json").unlink()
                raise UsageError(f"{path} does not hold Tiny Shakespeare (checksum); restore it from git, or pass --data")
    prepared = Corpus(folder)
    prepared.name = str(data or "Tiny Shakespeare")
    return prepared


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("sources", help="a text file, a folder of text files, or a glob (quoted)")
    p.add_argument("--out_dir", required=True, help="the prepared folder (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), default="char", help="(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared corpus already in out_dir")
    args = p.parse_args(argv)
    prepare(args.sources, args.out_dir, args.tokenizer, args.overwrite)


if __name__ == "__main__":
    cli.invoke(main)
