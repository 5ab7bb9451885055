"""
A training run's folder and processes, for the drivers (a reader of EBTs need not open this): out_dir and its lock,
checkpoints, the log, torchrun's processes and stopping on a signal; the rules they keep: assets/design.md.
"""
import contextlib
import datetime
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import ebt
import plots
from checks import UsageError
from data.text import tokenizer_from_state

# A stop signal (Ctrl-C, SIGTERM), set by the drivers' handler (cli.stop) while train() listens (Run.listening):
# every rank then ends after the same step, saved. Outside train(), and at a second Ctrl-C, the handler stops at once.
stop_listening = stop_requested = False


def print_flushed(*args):
    print(*args, flush=True)  # flushed: progress shows in files and under nohup


def dist_timeout():
    """Seconds a rank waits for another: NANOEBT_DIST_TIMEOUT, default 300."""
    value = os.environ.get("NANOEBT_DIST_TIMEOUT", "300")
    with contextlib.suppress(ValueError):
        if 0 < float(value) < 10**7:  # NaN fails the comparison
            return float(value)
    raise UsageError(f"NANOEBT_DIST_TIMEOUT={value!r}: must be a number of seconds in 0..10^7 (default 300)")


def leave_process_group(meet=True):
    """Leave the process group (if joined), by default once every rank has come here: gloo's teardown
    aborted a rank (SIGABRT, after a correct run) whose peer had already left, 3 runs in 20 here."""
    if torch.distributed.is_initialized():
        if meet:
            with contextlib.suppress(RuntimeError):  # a peer that has gone already: nothing to wait for
                torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def silent_ranks(wait=2.0):
    """The ranks that do not answer through the rendezvous store within `wait` seconds (every rank that
    is alive arrives here after the same failed collective), or None if the store is gone too."""
    dist = torch.distributed
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"nanoebt/answering/{dist.get_rank()}", "1")
        time.sleep(wait)
        return [r for r in range(dist.get_world_size()) if not store.check([f"nanoebt/answering/{r}"])]
    except Exception:  # the rank that hosts the store is the silent one
        return None


def join_process_group(device):
    """Under torchrun (RANK set) join the process group (gloo; nccl too for CUDA tensors), with a timeout so that a
    rank that stops answering is named instead of waited for for 30 minutes. Returns the device this rank takes."""
    if "RANK" not in os.environ:
        return device
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=dist_timeout()))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def rank():
    """This process's rank in a data-parallel run; 0 alone."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_out_dir(out, flag="--out_dir"):
    """A directory that can be made and written to, checked before any work: no traceback at the end."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a directory; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nanoebt-write-test-{os.getpid()}"  # its own: ranks check at once
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {out} cannot be written ({e.strerror or e}); pass a directory you can write to") from None


@contextlib.contextmanager
def lock_out_dir(out_dir, resume=True):
    """A run owns its folder while it runs (assets/design.md): an OS lock (flock) on out_dir/.lock, held by rank 0
    for every rank. A new run (resume False) never overwrites an earlier run's checkpoint (a run killed before its
    first one left only its log, which a new start replaces); what a crash during a save left behind is removed."""
    out = Path(out_dir)
    check_out_dir(out)
    lock = open(out / ".lock", "a+") if rank() == 0 else None
    with lock or contextlib.nullcontext():  # rank 0's lock, released as the file closes: at the end or on an error
        busy = False
        if lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process holds it
                busy = True
        if Run(out).any(busy):  # every rank decides with rank 0
            holder = (out / ".lock").read_text().strip() if lock else ""  # the pid the owner wrote
            raise UsageError(f"{out} is in use by another run{f' (process {holder})' if holder else ''}; wait for it "
                             "to end, or pass another --out_dir")
        if lock:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
        if not resume and (out / "ckpt.pt").exists():
            raise UsageError(f"{out} already holds a run; continue it with --resume, or pass another --out_dir")
        for stale in out.glob("*.tmp"):
            stale.unlink()
        yield


# What a training step keeps for its backward, in float32 values per token and layer, fitted to bench.py's peaks
# (assets/speed.md, "Memory estimate", says what each term counts)
KEPT = {"backward": {"per width": 5.7, "per key and head": 0, "per vocabulary entry": 3.1},
        "thinking step": {"per width": 16.2, "per key and head": 5, "per vocabulary entry": 7.9},
        "compiled backward": {"per width": 4.0, "per key and head": 0, "per vocabulary entry": 1.9},
        "compiled thinking step": {"per width": 12.2, "per key and head": 3.8, "per vocabulary entry": 5.9}}
# On a CPU a process holds more than its tensors at their peak: torch itself, and what glibc keeps of freed blocks
# (at the GPU preset a resident set 1.56x the allocated peak)
CPU_RESIDENT = {"torch": 2**29, "per byte allocated": 1.7}


def training_memory(cfg, batch_size, compiled=False):
    """The peak memory (bytes) of a training step, estimated term by term (assets/speed.md, "Memory estimate")."""
    text, thinks, D = cfg.model in ebt.TEXT_KINDS, cfg.model in ebt.EBT_KINDS, cfg.n_embd
    blocks = cfg.n_layer * (4 * D * D + 3 * D * cfg.mlp_hidden + (0 if text else 6 * D * D))  # attention, MLP, adaLN
    params = blocks + 2 * D * (cfg.vocab_size if text else cfg.channels * cfg.patch_size ** 2)  # in and out
    tokens = cfg.block_size if text else (cfg.image_size // cfg.patch_size) ** 2
    kept = KEPT[("compiled " if compiled else "") + ("thinking step" if thinks else "backward")]
    alive = cfg.think_steps + cfg.random_steps if thinks and (compiled or not (cfg.detach or cfg.truncate)) else 1
    replayed = thinks and text and cfg.replay_size > 0
    batch_size *= 1 + cfg.replay_batch if replayed else 1
    per_token = alive * cfg.n_layer * (kept["per width"] * (2 * D + cfg.mlp_hidden)
                                       + kept["per key and head"] * cfg.n_head * tokens)
    per_token += alive * kept["per vocabulary entry"] * cfg.vocab_size if text else 0
    replay_buffer = cfg.replay_size * tokens * cfg.vocab_size if replayed else 0
    return 4 * (4 * params + batch_size * tokens * per_token + replay_buffer)


def check_fits(cfg, batch_size, device, compiled=False):
    """Refuse at once, before anything large is allocated, a training step whose estimated peak (training_memory)
    would not fit the device's free memory: on a CPU the kernel would kill it without a word."""
    need = training_memory(cfg, batch_size, compiled)
    if device.startswith("cuda"):  # bf16 autocast, not calibrated yet (assets/speed.md): refused past twice the memory
        free, need = torch.cuda.mem_get_info(torch.device(device))[0], 0.5 * need
    else:  # what the kernel can give (Linux's MemAvailable, else the physical memory) and what the process will hold
        meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
        available = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable")]
        free = available[0] if available else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need = CPU_RESIDENT["torch"] + CPU_RESIDENT["per byte allocated"] * need
    if need > free:
        sample = "--block_size" if cfg.model in ebt.TEXT_KINDS else "--image_size"
        raise UsageError(f"{cfg.n_layer} layers x {cfg.n_embd}, batch {batch_size} cannot fit on {device}: a training "
                         f"step needs about {need / 2**30:,.1f} GiB and {free / 2**30:,.1f} GiB are free; lower "
                         f"--batch_size (--grad_accum keeps the batch), {sample}, --n_layer or --n_embd")


class Run(ebt.Run):
    """Where a driver's ebt.train() runs: this process's part in a torchrun run (alone, rank 0 of 1), and the run's
    folder: ckpt.pt, best.pt, each rank's replay buffer, the log (RunLog). meta: what the checkpoint also records."""

    def __init__(self, out_dir, meta=None, resume=False, say=print_flushed):
        super().__init__()
        dist = torch.distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.out, self.meta, self.resume, self.logbook = Path(out_dir), meta or {}, resume, RunLog(say)
        self.checkpoint = self.out / "ckpt.pt"

    def show(self, record):
        self.logbook(record)

    @contextlib.contextmanager
    def listening(self):
        """While training, a stop signal asks every rank to end after the step (cli.stop), not at once."""
        global stop_listening, stop_requested
        stop_listening, stop_requested = True, False
        try:
            yield
        finally:
            stop_listening = False

    def stop_requested(self):
        return self.any(stop_requested)

    def any(self, flag):
        """Whether flag (a bool or a tensor) holds on any rank, so that every rank takes the same decision."""
        if self.world == 1:
            return bool(flag)
        flag = torch.tensor([float(flag)])  # a CPU tensor: gloo carries it, also beside nccl
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def own_part(self, batch):
        """Each of N ranks takes its slice of one global batch: N processes match one with N times the batch."""
        return (t.chunk(self.world)[self.rank] for t in batch)

    def share_weights(self, model):
        for t in model.state_dict().values() if self.world > 1 else ():
            torch.distributed.broadcast(t, 0)

    def mean(self, t):
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t / self.world

    def average_gradients(self, model):
        """One all-reduce of all gradients, flattened (DDP's hooks can't take an EBT's several backwards)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None] if self.world > 1 else []
        if grads:
            flat = torch.cat([g.flatten() for g in grads]) / self.world
            torch.distributed.all_reduce(flat)
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))

    def save(self, model, optimizer, tc, record, new_best=False):
        """The run at record["step"] (returned) as one set, each file atomic: every other rank's replay buffer
        (replay-rank{r}-step{step}.pt), then rank 0's ckpt.pt, then the older buffers go. new_best: the model
        alone (without what resuming needs) also goes to best.pt."""
        replay, step = model.replay if isinstance(model, ebt.TextEBT) else None, record["step"]
        own = self.out / f"replay-rank{self.rank}-step{step}.pt"
        if replay is not None and self.rank > 0:
            write_atomically(own, lambda tmp: torch.save(replay.kept, tmp))
        self.any(False)  # every buffer is written before the checkpoint that names its step
        state = {"model": model.state_dict(), "model_config": asdict(model.config), "train_config": asdict(tc),
                 "world": self.world, **record, **self.meta}
        if self.rank == 0:
            write_atomically(self.checkpoint, lambda tmp: torch.save({
                **state, "optimizer": optimizer.state_dict(), **({"replay": replay.kept} if replay is not None else {})}, tmp))
            if new_best:
                write_atomically(self.out / "best.pt", lambda tmp: torch.save(state, tmp))
        self.any(False)
        for older in self.out.glob(f"replay-rank{self.rank}-step*.pt") if replay is not None and self.rank > 0 else ():
            if older != own:
                older.unlink()
        return step

    def restore(self, model, optimizer, device):
        """The run as save() left it (the drivers check the files first: load_checkpoint): (step, best loss)."""
        ckpt = torch.load(self.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if isinstance(model, ebt.TextEBT) and model.replay is not None:
            own = self.out / f"replay-rank{self.rank}-step{ckpt['step']}.pt"
            if self.any(self.rank > 0 and not own.exists()):
                raise UsageError(f"{self.out} has no replay buffer of step {ckpt['step']} for every process: the "
                                 "checkpoint and the per-rank files are not one set; resume as it was run, or start a new run")
            model.replay.kept = ckpt["replay"] if self.rank == 0 else torch.load(own, map_location=device, weights_only=True)
        return ckpt["step"], ckpt.get("best_loss", math.inf)


def write_atomically(path, write):
    """write(tmp), then rename tmp to path: a crash leaves the old file or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves the old file and no part of the new one
        tmp.unlink(missing_ok=True)


class RunLog:
    """A driver's log of ebt.train(): progress lines with throughput and time left, out_dir/metrics.jsonl
    (the train and eval records; a resumed run keeps those up to its step) and out_dir/loss.png."""

    def __init__(self, say=print_flushed):
        self.say, self.warned = say, False

    def __call__(self, r):
        getattr(self, "on_" + r["kind"])(r)

    def on_start(self, r):
        self.first, self.last, self.out = r, r, Path(r["out_dir"])
        path = self.out / "metrics.jsonl"
        self.records = [x for x in read_records(path) if x["step"] <= r["step"]] if r["resumed"] else []
        write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(x) + "\n" for x in self.records)))
        if r["resumed"]:
            self.say(f"resumed from {self.out / 'ckpt.pt'} at step {r['step']}" + (
                f"; nothing to train: max_steps is {r['max_steps']} (raise --max_steps to go on)"
                if r["step"] >= r["max_steps"] else ""))
        self.say(f"{r['model']}: {r['parameters'] / 1e6:.2f}M parameters, device {r['device']} x {r['world']}, "
                 f"{r['tokens_per_step']:,} tokens per step")

    def keep(self, r):
        self.records.append(r)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")

    def on_train(self, r):
        """A progress line; the throughput counts the steps since the last line or checkpoint."""
        first, elapsed = self.first, r["time"] - self.first["time"]
        r = {**r, "tokens_per_s": first["tokens_per_step"] * (r["step"] - self.last["step"]) / max(
            r["time"] - self.last["time"], 1e-9), "elapsed_s": elapsed}
        self.keep(r)
        self.last = r
        line = f"step {r['step']}/{first['max_steps']} | loss {r['loss']:.4f}"
        if "loss_first" in r:  # each step's energy on that step's own landscape
            line += (f" (step1 {r['loss_first']:.3f}, last {r['loss_last']:.3f}) | E at step1 {r['energy_first']:.2f},"
                     f" at last {r['energy_last']:.2f} | alpha {r['step_size']:.1f}")
        line += f" | psnr {r['psnr']:.2f}" if "psnr" in r else ""
        line += f" | peak {r['peak_mem_mb'] / 1024:.1f} GB" if "peak_mem_mb" in r else ""
        eta = duration(elapsed / (r["step"] - first["step"]) * (first["max_steps"] - r["step"]))
        pace = f"{r['tokens_per_s'] / 1e3:.1f}k tok/s | ETA {eta}" if r["step"] > 1 else (
            f"first step {elapsed:.1f}s, start-up included")  # compiling too: no pace to read yet
        self.say(f"{line} | {pace}")
        if r.get("step_size", 1) <= 1.001 * ebt.MIN_STEP_SIZE and not self.warned:
            self.warned = True
            self.say(f"warning: alpha sits at its floor, {ebt.MIN_STEP_SIZE:g}: thinking hardly moves the candidate; "
                     "lower --step_size_lr_mult or --lr")

    def on_eval(self, r):
        self.keep(r)
        steps = f" after 1..{len(r['loss_per_step'])} thinking steps:" if "loss_per_step" in r else ""
        psnr = " | PSNR " + " ".join(f"{p:.2f}" for p in r["psnr_per_step"]) if "psnr_per_step" in r else ""
        self.say(f"eval step {r['step']} | val loss{steps} "
                 + " ".join(f"{loss:.4f}" for loss in r.get("loss_per_step", [r["loss"]])) + psnr)

    def on_saved(self, r):
        self.last = r  # the next throughput leaves the evaluation and the save out
        plots.plot_metrics(self.records, self.out / "loss.png")

    def on_message(self, r):
        self.say(r["text"])
        plots.plot_metrics(self.records, self.out / "loss.png")


def duration(seconds):
    """A time to read at a glance: 7m05s, 2h13m."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """For work that may run long: from `after` seconds on, a line on stderr every `every` seconds with how far it
    is and about how long it has left at its pace so far (work that ends sooner says nothing); call advance() often."""

    def __init__(self, what, total, after=5.0, every=15.0):
        self.what, self.total, self.done, self.every = what, total, 0, every
        self.start = time.time()
        self.due = self.start + after

    def advance(self, amount=1):
        self.done += amount
        if time.time() >= self.due:
            self.due, elapsed, share = time.time() + self.every, time.time() - self.start, min(self.done / self.total, 1)
            left = f"about {duration(elapsed / share * (1 - share))} left" if share else "time left not known yet"
            print(f"[{self.what}: {100 * share:.0f}% in {duration(elapsed)}, {left}]", file=sys.stderr, flush=True)


def is_record(record):
    """A metrics.jsonl record as the log and its plots read it: a kind, a step, and a train or eval record's
    loss (an eval's loss after each thinking step, if it has them) as numbers."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return (isinstance(record, dict) and isinstance(record.get("kind"), str) and type(record.get("step")) is int
            and record["step"] >= 0 and (record["kind"] not in ("train", "eval") or number(record.get("loss")))
            and (record["kind"] != "eval" or "loss_per_step" not in record or (
                isinstance(record["loss_per_step"], list) and len(record["loss_per_step"]) > 0
                and all(map(number, record["loss_per_step"])))))


def read_records(path):
    """The records of a metrics.jsonl: one JSON object per line (is_record); anything else (a line torn by a
    crash mid-write, stray bytes, a record without what the plots read) is skipped."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; move it away (training writes its log there)")
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if is_record(record):
                records.append(record)
    return records


def load_checkpoint(path, device="cpu", needs=("model", "model_config")):
    """A checkpoint, checked to be one and to hold `needs` (to resume: the optimizer, configs and step too)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a directory; pass the ckpt.pt file inside it")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a nanoEBT checkpoint")
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise UsageError(f"checkpoint {path} holds no {', '.join(missing)}: it cannot be resumed; start a new run "
                         "in another --out_dir")
    step = ckpt.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not all(
            isinstance(ckpt.get(k, {}), dict) for k in ("model_config", "train_config", "model")):
        raise UsageError(f"checkpoint {path} records step {step!r} or configs that no run writes (a step is a whole "
                         "number >= 0); start a new run in another --out_dir")
    return ckpt


def checkpoint_to_resume(out_dir, kinds):
    """out_dir/ckpt.pt, checked to be resumable and to hold a model of one of kinds (the driver's)."""
    ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt", needs=("model", "model_config", "optimizer", "train_config", "step"))
    kind = ckpt["model_config"].get("model")
    if kind not in kinds:
        driver = "train_image.py" if kind in ebt.IMAGE_KINDS else "train_text.py"
        raise UsageError(f"{out_dir}/ckpt.pt holds a {kind!r} model; resume it with {driver}")
    return ckpt


def load_model(ckpt, device="cpu", **overrides):
    """The model a checkpoint holds, in eval mode. overrides: config fields to change (e.g. init_std)."""
    try:
        model = ebt.build_model(ebt.ModelConfig(**{**ckpt["model_config"], **overrides}))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"the checkpoint does not fit its own config ({str(e).splitlines()[0]})") from None
    if not all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point()):
        raise UsageError("the checkpoint's weights are not all finite (NaN or infinite): it cannot think or sample")
    return model.to(device).eval()


def load_text_model(path, device="cpu", **overrides):
    """(model in eval mode, tokenizer) from a text checkpoint."""
    ckpt = load_checkpoint(path, device)
    if "tokenizer" not in ckpt:
        raise UsageError(f"checkpoint {path} holds no tokenizer: it is not a text model")
    model, tokenizer = load_model(ckpt, device, **overrides), tokenizer_from_state(ckpt["tokenizer"], f"checkpoint {path}")
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids past the model's would index nothing
        raise UsageError(f"checkpoint {path}: its tokenizer has {tokenizer.vocab_size} tokens, its model "
                         f"{model.config.vocab_size}; they were not trained together")
    if tokenizer.vocab_size < model.config.vocab_size:  # a padded vocabulary: ids without a token, masked (ebt.TextEBT)
        model.padded = torch.arange(model.config.vocab_size, device=device) >= tokenizer.vocab_size
    return model, tokenizer


def require_ebt(model, what):
    if not isinstance(model, ebt.Thinker):
        raise UsageError(f"{what} needs an EBT; this checkpoint holds a {model.config.model!r} model")
