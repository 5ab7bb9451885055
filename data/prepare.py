"""
Prepare a text corpus once into train.bin, val.bin (the last tenth) and meta.json: token ids that training reads
as random windows of a numpy memmap (nanoGPT's way), so any size trains in the same memory and starts at once.
What a prepared folder holds and promises, and the cache of `train_text.py --data FILE.txt`: assets/corpus.md.

    python data/prepare.py my.txt --out_dir data/my               # a file, a folder (subfolders too), or a glob
    python data/prepare.py "books/**/*.txt" --out_dir data/books --tokenizer gpt2
    python train_text.py --data data/my
"""
import contextlib
import errno
import fcntl
import glob
import gzip
import hashlib
import itertools
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
MAX_CHARS, RARE, UNKNOWN = 256, 10, "\ufffd"  # a vocabulary past MAX_CHARS merges the characters seen < RARE times
LOCK = ".prepare.lock"  # in the folder while a process prepares it (locked)
OURS = ("train.bin", "val.bin", "meta.json", LOCK)  # what preparing writes into a folder


def sources_of(spec, say=print):
    """The text files a --data or prepare argument names (assets/corpus.md, "Which files"), saying how many it skips."""
    path = Path(spec)
    if path.is_file():
        return [path]
    found = (path.rglob("*") if path.is_dir() else map(Path, glob.glob(spec, recursive=True)))
    found = sorted(p for p in found if p.is_file() and not any(
        part.startswith(".") for part in (p.relative_to(path).parts if path.is_dir() else [p.name])))
    files = [p for p in found if is_text(p)]
    if len(files) < len(found):
        skipped = sorted(set(found) - set(files))
        say(f"skipped {len(skipped):,} of {len(found):,} files, empty or not UTF-8 text (the first: {skipped[0]})")
    if not files:
        raise UsageError(f"{spec}: " + ("no text files in it" if found else "a folder with no files" if path.is_dir()
                         else "no such file, folder or glob") + "; pass a text file, a folder of text files or a glob")
    return files


def is_text(path):
    """Whether a file starts with UTF-8 text (its first chunk, no NUL byte): a folder's images are skipped."""
    with contextlib.suppress(UsageError, OSError, EOFError):
        return next(chunks(path), "") != ""
    return False


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


def encoded(files, tokenizer, progress, sources):
    """Token id arrays of the files' text in order; appends each file's size and checksum to sources once read."""
    anywhere = isinstance(tokenizer, CharTokenizer)
    for f in files:
        digest, n, size, held = hashlib.sha256(), 0, f.stat().st_size, ""
        for chunk in itertools.chain(chunks(f), [""]):  # "": the end, where BPE encodes what it held back
            digest.update(chunk.encode("utf-8"))  # of the text as read: as a checkpoint's checksum of a text was
            text, n = held + chunk, n + len(chunk)
            cut = last_safe_cut(text) if chunk and not anywhere else len(text)  # BPE: the rest waits for the next
            ids, held = tokenizer.encode_array(text[:cut]), text[cut:]
            progress.advance(len(chunk))
            yield ids
        if n == 0:
            raise UsageError(f"{f} is empty; pass text files with something in them")
        sources.append({"path": str(f), "bytes": size, "sha256": digest.hexdigest()})


def code_points(text):
    """The code points text holds, some more than once; ASCII text, the common case, at bytes' speed, each once:
    deleting its bytes from all 128 leaves the absent ones."""
    if text.isascii():
        return np.setdiff1d(np.arange(128), np.frombuffer(bytes(range(128)).translate(None, text.encode("ascii")), np.uint8))
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def char_tokenizer(files, total, keep_rare, say):
    """Every character of the files, in code point order; past MAX_CHARS, those outside ASCII seen fewer than RARE
    times read as one unknown character (unless keep_rare): a few rare ones would make the model's vocabulary huge."""
    counts, progress = np.zeros(0x110000, np.int64), rundir.Progress("reading the characters", total)
    for f in files:
        for chunk in chunks(f):
            found = np.bincount(code_points(chunk))  # an ASCII chunk counts each character once: never rare
            counts[:len(found)] += found
            progress.advance(len(chunk))
    seen = np.flatnonzero(counts)
    rare = seen[(counts[seen] < RARE) & (seen >= 128)] if len(seen) > MAX_CHARS else seen[:0]
    if len(rare):
        say(f"warning: {len(rare):,} of the {len(seen):,} characters, outside ASCII, are seen fewer than {RARE} times: "
            + ("--keep_rare keeps them all, each a token the model learns little of" if keep_rare else
            f"they read as one unknown character, {UNKNOWN!r} (--keep_rare keeps them, a vocabulary of {len(seen):,})"))
    if keep_rare or not len(rare):
        return CharTokenizer(chr(p) for p in seen)
    return CharTokenizer(sorted({*(chr(p) for p in np.setdiff1d(seen, rare)), UNKNOWN}), UNKNOWN)


def last_safe_cut(text):
    """The last place where BPE may cut text (SAFE_CUT in data/text.py), 0 if none."""
    at = text.rfind("\n", 0, len(text) - 1)
    while at != -1 and text[at + 1].isspace():
        at = text.rfind("\n", 0, at)
    return at + 1


def prepare(spec, out_dir, tokenizer="char", overwrite=False, keep_rare=False, say=print):
    """Tokenize the files spec names into out_dir, refusing while another process prepares it. Returns its meta."""
    out, files = Path(out_dir), sources_of(spec, say)
    inside = lambda a, b: Path(a).resolve().is_relative_to(Path(b).resolve())
    if any(inside(f, out) for f in files) or (Path(spec).is_dir() and inside(out, spec)):
        raise UsageError(f"--out_dir {out} is or holds a source, or is inside {spec}: preparing would read or replace "
                         "its own output; pass an --out_dir outside the sources")
    with locked(out, wait=False):
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if present and not overwrite:
            what = "a prepared corpus" if "meta.json" in present else "files: " + ", ".join(present[:4]) + (
                ", ..." if len(present) > 4 else "")
            raise UsageError(f"{out} already holds {what}; pass --overwrite to replace them (train.bin, val.bin and "
                             "meta.json; other files stay), or another --out_dir")
        return build(files, out, tokenizer, keep_rare, say)


@contextlib.contextmanager
def locked(out, wait, flag="--out_dir"):
    """An OS lock (flock) on a file in the folder out, made if need be, while preparing it: another process refuses in
    one line, or waits (wait=True: the cache, which runs and torchrun's ranks share); kill -9 ends it too."""
    while True:  # until the lock is in the folder at out now, not in one that another prepare swapped away meanwhile
        rundir.check_out_dir(out, flag)
        fd = os.open(out / LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(BlockingIOError, FileNotFoundError):
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if os.path.samestat(os.fstat(fd), os.stat(out / LOCK)):
                break
        os.close(fd)
        if not wait:
            raise UsageError(f"{out} is being prepared by another process; wait for it to end, or pass another "
                             "--out_dir")
    try:
        for stale in out.parent.glob(glob.escape(f".{out.name}.") + "*-[0-9]*"):  # what a process killed mid-way left
            carry_over(stale, out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # left as found: the lock file goes (one still ours, not swapped)
            if os.path.samestat(os.fstat(fd), os.stat(out / LOCK)):
                os.unlink(out / LOCK)
        os.close(fd)


def build(files, out, tokenizer, keep_rare, say, record=None):
    """Prepare files into a hidden sibling of out (locked), then swap it in by renames: out is the old corpus or the
    new one, never a part of either."""
    total, start = sum(f.stat().st_size for f in files), time.time()
    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("prepare", "old"))
    try:
        tmp.mkdir()
        meta = write_corpus(files, total, tmp, tokenizer, keep_rare, say, record)
        os.rename(out, old)
        os.rename(tmp, out)
        carry_over(old, out)
    except OSError as e:  # numpy's tofile on a full disk says only "N requested and M written"
        need, free = 2.2 * total, shutil.disk_usage(out.parent).free  # ids of 2 bytes a character, the split's copy
        if e.errno != errno.ENOSPC and free > need:
            raise
        raise UsageError(f"no space left on {out.parent.resolve()} ({need / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB "
                         f"free); free some, or prepare elsewhere; {out} is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # a swap cut between its renames (Ctrl-C): the old corpus back
            os.rename(old, out)
    seconds = time.time() - start
    say(f"prepared {out} from {len(files):,} file{'s' * (len(files) > 1)}, {total / 1e6:,.1f} MB in {seconds:.2f} s "
        f"({total / 1e6 / max(seconds, 1e-9):,.1f} MB/s): {meta['tokens']['train']:,} training and "
        f"{meta['tokens']['val']:,} validation tokens ({meta['dtype']}), vocabulary {meta['vocab_size']:,}")
    return meta


def carry_over(old, out):
    """Move what is not ours (another tool's files) from the folder old into out, and ours too if only old holds a
    corpus (a swap that a kill -9 cut in half), then remove old."""
    whole = ".old-" in old.name and (old / "meta.json").exists() and not (out / "meta.json").exists()
    for p in old.iterdir():
        if (whole or p.name not in OURS) and not (out / p.name).exists():
            os.rename(p, out / p.name)
    shutil.rmtree(old, ignore_errors=True)


def write_corpus(files, total, out, tokenizer, keep_rare, say, record):
    """train.bin, val.bin and then meta.json (with record's fields) in the empty folder out. Returns the meta."""
    tok = char_tokenizer(files, total, keep_rare, say) if tokenizer == "char" else GPT2Tokenizer()
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    all_ids, sources = out / "train.bin", []
    with open(all_ids, "wb") as f:
        for ids in encoded(files, tok, rundir.Progress(f"tokenizing ({tokenizer})", total), sources):
            ids.astype(dtype).tofile(f)
    n = all_ids.stat().st_size // dtype.itemsize
    n_val = int(n * VAL_FRACTION)
    with open(all_ids, "rb") as f, open(out / "val.bin", "wb") as val:  # by blocks (a memmap's pages count in memory)
        f.seek((n - n_val) * dtype.itemsize)
        shutil.copyfileobj(f, val, 1 << 24)
    os.truncate(all_ids, (n - n_val) * dtype.itemsize)
    meta = {"format": "nanoebt-tokens-1", "tokenizer": tok.state(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "tokens": {"train": n - n_val, "val": n_val}, "val_fraction": VAL_FRACTION, "sources": sources}
    content = {**meta, "sources": [s["sha256"] for s in sources]}  # the same text prepared anywhere: the same id
    meta["id"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    (out / "meta.json").write_text(json.dumps({**meta, **(record or {})}, indent=1) + "\n")
    return meta


class Corpus:
    """A prepared folder: meta (its record), train and val (numpy memmaps of token ids), the tokenizer; meta.json
    checked against the files before the first batch (assets/corpus.md), a fault one line naming the file."""

    def __init__(self, folder):
        self.folder = folder = Path(folder)
        path = folder / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{folder} is not a prepared corpus (no meta.json, or its preparing was interrupted); "
                             f"prepare it: python data/prepare.py SOURCE --out_dir {folder} --overwrite") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is damaged ({type(e).__name__}: {e}); prepare it again with --overwrite") from None

        def need(ok, what, where=path):
            if not ok:
                raise UsageError(f"{where}: {what}; prepare the corpus again with --overwrite")
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        need(isinstance(meta, dict) and meta.get("format") == "nanoebt-tokens-1", "not a nanoEBT corpus format")
        tokens, dtype, vocab = meta.get("tokens"), meta.get("dtype"), meta.get("vocab_size")
        need(isinstance(tokens, dict) and all(count(tokens.get(s)) for s in ("train", "val")),
             f"token counts {tokens!r}, not two whole numbers >= 0")
        need(dtype in ("uint16", "uint32"), f"dtype {dtype!r}, not uint16 or uint32")
        need(count(vocab) and 0 < vocab <= np.iinfo(dtype).max + 1, f"a vocabulary of {vocab!r} does not fit its "
             f"token dtype {dtype}")
        need(isinstance(meta.get("id"), str) and isinstance(meta.get("sources"), list), "no id or sources")
        self.tokenizer = tokenizer_from_state(meta.get("tokenizer"), path)
        need(self.tokenizer.vocab_size == vocab, f"vocab_size {vocab:,}, its tokenizer's {self.tokenizer.vocab_size:,}")
        for s in ("train", "val"):
            ids, expected = folder / f"{s}.bin", tokens[s] * np.dtype(dtype).itemsize
            size = ids.stat().st_size if ids.is_file() else 0
            need(ids.is_file() and size == expected, f"missing or truncated ({size:,} bytes, {expected:,} expected)", ids)
        self.meta, self.id, self.name = meta, meta["id"], str(folder)
        self.train, self.val = (np.memmap(folder / f"{s}.bin", dtype, "r") if tokens[s] else np.zeros(0, dtype)
                                for s in ("train", "val"))
        for s, ids in (("train", self.train), ("val", self.val)):
            largest = max((int(ids[i:i + 4096].max()) for i in range(0, len(ids), max(len(ids) // 64, 4096))), default=0)
            need(largest < vocab, f"holds id {largest:,}, past meta.json's vocabulary of {vocab:,}", folder / f"{s}.bin")

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


def source_key(path, tokenizer):
    """What tells that a text file is the one prepared: its size, times (ctime cannot be set back), inode, a hash of
    its first, middle and last MB (a rewrite of the same size), and the tokenizer."""
    stat, digest = path.stat(), hashlib.sha256()
    with open(path, "rb") as f:
        for at in (0, stat.st_size // 2, max(stat.st_size - (1 << 20), 0)):
            f.seek(at)
            digest.update(f.read(1 << 20))
    return {"size": stat.st_size, "mtime": stat.st_mtime_ns, "ctime": stat.st_ctime_ns, "inode": stat.st_ino,
            "content": digest.hexdigest()[:16], "tokenizer": tokenizer}


def corpus(data=None, tokenizer=None, say=print):
    """The corpus of train_text.py --data: a prepared folder (its own tokenizer); or a text file (None: Tiny
    Shakespeare), prepared with tokenizer (default char) into the cache once, and again whenever it changes."""
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
    cache = os.environ.get("NANOEBT_CACHE", Path(__file__).resolve().parent / "cache")  # data/cache/ by default
    if cache == "":
        raise UsageError("NANOEBT_CACHE is set but empty; set it to a folder for the prepared texts, or unset it "
                         "(data/cache/)")
    key, named = source_key(path, tokenizer), f"{path.resolve()}|{tokenizer}"
    folder = Path(cache) / f"{path.name}-{hashlib.sha256(named.encode()).hexdigest()[:16]}"
    with locked(folder, wait=True, flag="the cache (NANOEBT_CACHE)"):  # one process prepares; the others wait
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = None
            recorded = json.loads((folder / "meta.json").read_text()).get("source")
        if recorded != key:
            changed = [k for k in key if (recorded or {}).get(k) != key[k]] if isinstance(recorded, dict) else None
            say(f"{path} changed since it was prepared ({', '.join(changed)}): preparing it again" if changed else
                f"preparing {path} into {folder} (once; python data/prepare.py does it by hand)")
            meta = build(sources_of(path), folder, tokenizer, False, say, {"source": key})
            if path == SHAKESPEARE and meta["sources"][0]["sha256"] != SHAKESPEARE_SHA256:
                (folder / "meta.json").unlink()
                raise UsageError(f"{path} does not hold Tiny Shakespeare (checksum); restore it from git, or pass --data")
    prepared = Corpus(folder)
    prepared.name = str(data or "Tiny Shakespeare")
    return prepared


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("sources", help="a text file, a folder of text files (subfolders too), or a glob (quoted; ** recurses)")
    p.add_argument("--out_dir", required=True, help="the prepared folder (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), default="char", help="(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared corpus, or token files, in out_dir")
    p.add_argument("--keep_rare", action="store_true", help=f"char: keep every character, also past {MAX_CHARS} of "
                   f"them those seen fewer than {RARE} times (default: they read as one unknown character)")
    args = p.parse_args(argv)
    prepare(args.sources, args.out_dir, args.tokenizer, args.overwrite, args.keep_rare)


if __name__ == "__main__":
    cli.invoke(main)
