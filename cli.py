"""
What the drivers share and a reader of EBTs need not read: flags made from the config dataclasses
and their resolution (preset, recipe, checkpoint, flags given), run directories and their log
(progress lines, metrics.jsonl, loss.png), checked reading of text, tokenizers and checkpoints, and
errors as one line with exit code 2.
"""
import argparse
import contextlib
import datetime
import fcntl
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path


def quiet_interrupt(signum, frame):
    """Ctrl-C before run() listens, while torch loads (a second or two): exit 130 as any stop does, no traceback."""
    print("interrupted", file=sys.stderr)
    sys.exit(130)


# the drivers import cli first, so this covers their start-up; for any other importer nothing changes after it
outer = signal.signal(signal.SIGINT, quiet_interrupt) if threading.current_thread() is threading.main_thread() else None
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ebt  # noqa: E402
from ebt import UsageError  # noqa: E402

if outer is not None:
    signal.signal(signal.SIGINT, outer)

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt.gz"  # ships with nanoEBT
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
THINKING_FLAGS = ("think_steps", "landscapes", "step_size", "learn_step_size", "step_size_lr_mult", "init_std",
            "langevin_std", "random_step_size", "random_steps", "truncate", "detach", "replay_size",
            "replay_batch")  # the ModelConfig fields of a model that thinks; with --eval_steps and --recipe, its flags


# -----------------------------------------------------------------------------
# Errors as one line, signals, the process group

def dist_timeout():
    """Seconds a rank waits for another: NANOEBT_DIST_TIMEOUT, default 300."""
    value = os.environ.get("NANOEBT_DIST_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < 10**7:
        raise UsageError(f"NANOEBT_DIST_TIMEOUT={value!r}: must be a number of seconds in 0..10^7 (default 300)")
    return seconds


def run(main):
    """Run a driver's main(): user errors, running out of memory, a failed write and a silent peer rank
    become one line on stderr and exit code 2; Ctrl-C and SIGTERM (how schedulers stop jobs) exit 130,
    training first saving at the end of its step (stop)."""
    handlers, finished = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}, False
    try:
        main()
        finished = True
    except UsageError as e:
        fail(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, OSError) as e:  # a file that cannot be written, a full disk: one line too
        message = failure(e)
        if message is None and not isinstance(e, OSError):
            raise
        fail(message or e)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        # every rank ends together after a finished run or a stop signal; after a failure one may be gone
        leave_process_group(meet=finished or ebt.Stop.requested)


def leave_process_group(meet=True):
    """Leave the process group (if joined), by default once every rank has come here: gloo's teardown
    aborted a rank (SIGABRT, after a correct run) whose peer had already left, 3 runs in 20 here."""
    if torch.distributed.is_initialized():
        if meet:
            with contextlib.suppress(RuntimeError):  # a peer that has gone already: nothing to wait for
                torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(signum, frame):
    """Ctrl-C or SIGTERM. While training listens: ask it to save and end after this step, every rank
    alike (a second Ctrl-C stops at once); otherwise stop at once."""
    if not ebt.Stop.listening or (ebt.Stop.requested and signum == signal.SIGINT):
        raise KeyboardInterrupt
    ebt.Stop.requested = True


def failure(e):
    """The one line for a RuntimeError the user can act on, else None."""
    text = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text:
        return "out of memory; lower the sizes (--batch_size, --block_size, --candidates, --windows)"
    if any(s in text for s in ("PytorchStreamWriter", "unexpected pos", "iostream error", "No space left")):
        return f"writing a file failed ({text.splitlines()[0]}): is the disk full? The previous checkpoint is kept"
    if torch.distributed.is_initialized() and any(s in text for s in ("Timed out", "timeout", "closed by peer",
                                                                       "Connection reset")):
        silent = silent_ranks()
        who = f"rank {', '.join(map(str, silent))}" if silent else "a peer rank"
        ended = [r for r in silent or () if end_if_stopped(r)]
        return (f"{who} stopped answering: no reply within {dist_timeout():g} s (stopped, crashed or far too slow; "
                "NANOEBT_DIST_TIMEOUT sets the wait); the last checkpoint is kept" + (
                    f"; rank {', '.join(map(str, ended))}, stopped (SIGSTOP) on this machine, is ended now"
                    if ended else ""))
    return None


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


def end_if_stopped(rank):
    """Kill a rank that is stopped (SIGSTOP) on this machine, and say whether it was: it can act on no signal but
    SIGKILL, which torchrun sends only after 30 s. Its host and pid are in the store since it joined."""
    with contextlib.suppress(Exception):  # another machine's rank, or one already gone: left as it is
        host, pid = torch.distributed.distributed_c10d._get_default_store().get(f"nanoebt/pid/{rank}").decode().split()
        if host == socket.gethostname() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            os.kill(int(pid), signal.SIGKILL)
            return True
    return False


def join_process_group(device):
    """Under torchrun (RANK set) join the process group, with a timeout so that a rank that stops answering
    is named (failure) instead of waited for for 30 minutes: gloo for CPU tensors (the flags every rank
    agrees on, Run.any) and, on GPUs, nccl for CUDA tensors. Returns (rank, world size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=dist_timeout()))
        store = dist.distributed_c10d._get_default_store()  # where end_if_stopped finds this rank
        store.set(f"nanoebt/pid/{dist.get_rank()}", f"{socket.gethostname()} {os.getpid()}")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def traced_energy_and_gradient(energy_fn, x, k, create_graph):
    """ebt.energy_and_gradient by torch.func, which torch.compile traces whole (autograd.grad breaks the graph)."""
    def total(x):
        energy = energy_fn(x, k)
        return energy.sum(), energy
    with torch.set_grad_enabled(create_graph):  # without it, no graph to the parameters
        grad, (_, energy) = torch.func.grad_and_value(total, has_aux=True)(x)
    return energy, grad


def compile_model(model, mode=None):
    """torch.compile what pays. A model that does not think: its loss. An EBT: its training step whole
    (learning) and, at inference, each thinking step and, for text, each generated token and the context
    stream. torch.compile cannot trace autograd.grad(create_graph=True), so the compiled EBT takes every
    gradient of the energy by torch.func (traced_energy_and_gradient), in the same think(). mode:
    torch.compile's for the training step and a generated token ("reduce-overhead": CUDA graphs)."""
    if not isinstance(model, ebt.Thinker):
        model.forward = torch.compile(model.forward, mode=mode)
        return model
    model.learn = learning(model, mode)
    model.gradient = torch.compile(traced_energy_and_gradient)
    if isinstance(model, ebt.TextEBT):
        model.trunk.forward = torch.compile(model.trunk.forward)
        model.next_token = torch.compile(model.next_token, mode=mode)  # fixed shapes (ebt.KVCache)
    return model


def learning(model, mode=None):
    """A drop-in for model.learn as one compiled graph: torch.func.grad of the model's loss in training mode
    (forward, through ebt.think) with respect to its parameters; what a graph cannot hold stays out of it:
    the random start (a torch.Generator), the replay buffer's picks and its update."""
    text = isinstance(model, ebt.TextEBT)

    @functools.cache
    def graph(steps):  # one per step count (S2: 2 and 3)
        loss = lambda params, *args, **kw: torch.func.functional_call(model, params, args, {**kw, "steps": steps})
        return torch.compile(torch.func.grad_and_value(loss, has_aux=True), dynamic=False, mode=mode)

    def learn(x, y, weight, steps=None, generator=None):
        kw, fresh, step = {}, len(x), graph(model.step_count(steps))
        if text:
            x, y, kw["y0"] = model.training_starts(x, y, generator)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads, (_, metrics) = step({n: p.detach() for n, p in named}, x, y, **kw)
        for n, p in named:
            p.grad = grads[n] * weight if p.grad is None else p.grad + grads[n] * weight
        final = metrics.pop("final", None)
        if text:
            model.remember(x[:fresh], y[:fresh], final[:fresh])
        return metrics
    return learn


# -----------------------------------------------------------------------------
# Flags

class ArgumentParser(argparse.ArgumentParser):
    """No prefix abbreviations (--max_step is not taken for --max_steps); errors are UsageErrors."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")

    def parse_args(self, argv=None, namespace=None):
        args = super().parse_args(argv, namespace)
        empty = [k for k, v in vars(args).items() if v == "" or v == [""]]
        if empty:  # an empty path or name would silently mean the default
            raise UsageError(f"--{empty[0]} is empty; give a value, or leave the flag out for its default")
        return args


def add_flags(parser, config, names, defaults=None):
    """A flag per config field in names, its help the field's; every default is None, so that what was
    given is known (given()). defaults: name -> what the default is, where it is not the field's."""
    by_name = {f.name: f for f in fields(config)}
    for name in names:
        f = by_name[name]
        shown = (defaults or {}).get(name, f.default)
        kind = {"type": f.type} if f.type is not bool else {"action": argparse.BooleanOptionalAction}
        parser.add_argument(f"--{name}", **kind, help=f"{f.metadata['help']} (default: {shown})")


def given(args, names):
    """The flags among names that were given."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def configs(args, layers, ckpt=None, derive=None, log=print):
    """The ModelConfig and TrainConfig of a run, by one rule for every driver. A new run: the fields'
    defaults, then the layers in order (a preset, a recipe, the data's sizes), then the flags given,
    then derive(values) for what is still None. A resumed run: the checkpoint's own; a model flag
    given must agree with it, a training flag given overrides it (with a notice), and a flag of
    ckpt["started"] (preset, recipe, data) must agree with what the run started from."""
    model_names = [f.name for f in fields(ebt.ModelConfig)]
    train_names = [f.name for f in fields(ebt.TrainConfig) if f.name not in ("out_dir", "device")]  # the driver's
    if ckpt is None:
        values = {k: v for layer in layers for k, v in layer.items()}
        values.update(given(args, model_names + train_names))
        if derive:
            derive(values)
        model = {k: v for k, v in values.items() if k in model_names}
        train = {k: v for k, v in values.items() if k in train_names}
    else:
        model, train = dict(ckpt["model_config"]), dict(ckpt["train_config"])
        started = ckpt.get("started", {})
        for k, v in {**given(args, model_names), **given(args, started)}.items():
            saved = model[k] if k in model_names else started[k]
            if saved != v:
                raise UsageError(f"--{k} {v} conflicts with the run in {args.out_dir}, which has {saved}; resume "
                                 "without it, or start a new run in another --out_dir")
        for k, v in given(args, train_names).items():
            if train[k] != v:
                log(f"notice: --{k} {v} overrides the checkpoint's {train[k]}")
                train[k] = v
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if ckpt.get("world", world) != world:  # each process takes batch_size: the global batch changes with them
            log(f"notice: {world} process{'es' * (world > 1)} resume a run of {ckpt['world']}: the global batch "
                f"changes from {ckpt['world'] * train['batch_size']} to {world * train['batch_size']} sequences")
    try:
        cfg, tc = ebt.ModelConfig(**model), ebt.TrainConfig(**train)
    except ebt.ConfigError as e:
        if ckpt is None or e.name in given(args, model_names + train_names):
            raise UsageError(f"--{e.name} {e.value}: {e.why}") from None
        raise UsageError(f"{args.out_dir}/ckpt.pt records {e.name}={e.value!r}, which {e.why.replace('must', 'should')}: "
                         "no nanoEBT run writes it; start a new run in another --out_dir") from None
    except TypeError as e:  # a field this nanoEBT does not have
        raise UsageError(f"{args.out_dir}/ckpt.pt records a configuration this nanoEBT cannot read ({e}); start a new "
                         "run in another --out_dir") from None
    if cfg.replay_size and round(cfg.replay_batch * tc.batch_size) > cfg.replay_size:
        raise UsageError(f"--replay_batch {cfg.replay_batch}: {round(cfg.replay_batch * tc.batch_size)} replayed "
                         f"sequences a batch, more than the buffer's {cfg.replay_size} (--replay_size)")
    warn_unlikely(cfg, tc, given(args, model_names + train_names), log)
    return cfg, tc


def warn_unlikely(cfg, tc, given, log):
    """One warning line for each value that is legal but almost surely a mistake."""
    if tc.warmup_steps >= tc.max_steps:
        log(f"warning: --warmup_steps {tc.warmup_steps:g} is not below --max_steps {tc.max_steps}: the learning "
            "rate never reaches --lr")
    if "replay_batch" in given and not cfg.replay_size:
        log("warning: --replay_batch does nothing without a replay buffer (--replay_size 0)")
    if "step_size_lr_mult" in given and not cfg.learn_step_size:
        log("warning: --step_size_lr_mult does nothing: alpha is not learned (--no-learn_step_size)")


def refuse_thinking(args, model, names=THINKING_FLAGS + ("eval_steps", "recipe")):
    """An EBT option given for a model that does not think is an error, not silently dropped."""
    if model not in ebt.EBT_KINDS and given(args, names):
        raise UsageError(f"--{next(iter(given(args, names)))} is an EBT option; the {model} model does not think")


def check_sampling(args):
    """sample.py's values: those for ebt.generate within its limits (ebt.SAMPLING_LIMITS), and its own."""
    limits = {**ebt.SAMPLING_LIMITS, "windows": (int, 1, 10**6), "seed": (int, 0, ebt.MAX_SEED - 1)}
    check_flags({name: getattr(args, name) for name in limits}, limits)


def check_flags(values, limits):
    """One-line UsageError for the first flag value (name -> a value, a list of them, or None: not given) not of
    its type or outside its limits (name -> (type, least, most), as ebt.check_values reads them)."""
    for name, value in values.items():
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            try:
                ebt.check_values("--", {name: v}, limits)
            except ebt.ConfigError as e:
                raise UsageError(f"--{name} {v}: {e.why}") from None


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                        "(default: %(default)s)")


def pick_device(name="auto"):
    """The --device named, checked to exist here (ebt.best_device resolves auto)."""
    if name == "auto":
        return ebt.best_device()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    count = {"cpu": 1, "mps": int(ebt.best_device() == "mps"), "cuda": torch.cuda.device_count()}[kind]
    if int(index or 0) >= count or (kind == "cpu" and index):
        raise UsageError(f"device {name!r} is not available on this machine ({count} {kind} device"
                         f"{'s' * (count != 1)}); use --device auto or cpu")
    return name


# -----------------------------------------------------------------------------
# Run directories and their log

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
def owned(out_dir):
    """While a run runs, it owns its folder: another training process into it (a new run or --resume) refuses
    in one line, touching nothing. The claim is an OS lock (flock) on out_dir/.lock, so it ends with the process
    that holds it, kill -9 included; under torchrun rank 0 holds it for every rank of the run."""
    out, dist = Path(out_dir), torch.distributed
    check_out_dir(out)
    lock = open(out / ".lock", "a+") if not dist.is_initialized() or dist.get_rank() == 0 else None
    busy = False
    if lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it
            busy = True
    if Run(out).any(busy):  # every rank decides with rank 0
        holder = ""
        if lock:
            lock.seek(0)
            holder = lock.read().strip()  # the pid the owner wrote
            lock.close()
        raise UsageError(f"{out} is in use by another run{f' (process {holder})' if holder else ''}; wait for it to end, "
                         "or pass another --out_dir")
    if lock:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    try:
        yield
    finally:
        if lock:
            lock.close()


def prepare_out_dir(out, resume):
    """Never overwrite an earlier run's checkpoint (a run killed before its first one left only its log,
    which a new start replaces); remove what a crash during a save left behind."""
    out = Path(out)
    check_out_dir(out)
    if not resume and (out / "ckpt.pt").exists():
        raise UsageError(f"{out} already holds a run; continue it with --resume, or pass another --out_dir")
    for stale in out.glob("*.tmp") if out.is_dir() else ():
        stale.unlink()


def check_fits(cfg, batch_size, tokens, device):
    """Refuse at once a model whose training state (weights, gradients, AdamW's two moments), or a batch
    whose largest single tensor (activations, logits, or the EBT's explicit attention scores), would
    alone outgrow the device: a lower bound, passing it promises nothing."""
    weights = cfg.n_layer * (4 * cfg.n_embd ** 2 + 3 * cfg.n_embd * cfg.mlp_hidden) + 2 * cfg.vocab_size * cfg.n_embd
    sizes = {"activations": batch_size * tokens * cfg.n_embd, "logits": batch_size * tokens * cfg.vocab_size,
             "weights, gradients and optimizer state": 4 * weights}
    if cfg.model in ebt.EBT_KINDS:
        sizes["attention scores"] = batch_size * cfg.n_head * tokens * tokens
    what, largest = max(sizes.items(), key=lambda kv: kv[1])
    memory = (torch.cuda.get_device_properties(torch.device(device)).total_memory if device.startswith("cuda")
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # CPU: physical memory
    if 4 * largest > memory:
        raise UsageError(f"{cfg.n_layer} layers x {cfg.n_embd}, batch {batch_size} x {tokens} tokens cannot fit "
                         f"on {device}: the {what} alone take {4 * largest / 2**30:,.0f} GiB of "
                         f"{memory / 2**30:,.0f}; lower --batch_size (--grad_accum keeps the batch), "
                         "--block_size, --n_layer or --n_embd")


def printed(*args):
    print(*args, flush=True)  # flushed: progress shows in files and under nohup


class Run(ebt.Run):
    """Where a driver's ebt.train() runs: this process's part in a data-parallel run (under torchrun, after
    join_process_group; alone, rank 0 of 1), and the run's folder: out_dir/ckpt.pt and best.pt, each other
    rank's replay buffer, and the log (RunLog). meta: what the checkpoint also records (tokenizer, data)."""

    def __init__(self, out_dir, meta=None, resume=False, say=printed):
        dist = torch.distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.group = dist.group.WORLD if self.world > 1 else None  # its CPU side (gloo) carries any()
        self.out, self.meta, self.resume, self.log = Path(out_dir), meta or {}, resume, RunLog(say)
        self.checkpoint = self.out / "ckpt.pt"

    def __call__(self, record):
        self.log(record)

    def any(self, flag):
        """Whether flag (a bool or a tensor) holds on any rank: one small all-reduce, on the CPU, so that every
        rank takes the same decision."""
        if self.group is None:
            return bool(flag)
        flag = torch.tensor([float(flag)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
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

    def __init__(self, say=printed):
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
        eta = int(elapsed / (r["step"] - first["step"]) * (first["max_steps"] - r["step"]))
        self.say(line + f" | {r['tokens_per_s'] / 1e3:.1f}k tok/s | ETA " + (
            f"{eta // 3600}h{eta // 60 % 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"))
        if r.get("step_size", 1) <= 1.001e-3 and not self.warned:  # ebt.Thinker.step_size's floor
            self.warned = True
            self.say("warning: alpha sits at its floor, 0.001: thinking hardly moves the candidate; "
                     "lower --step_size_lr_mult or --lr")

    def on_eval(self, r):
        self.keep(r)
        steps = f" after 1..{len(r['loss_per_step'])} thinking steps:" if "loss_per_step" in r else ""
        psnr = " | PSNR " + " ".join(f"{p:.2f}" for p in r["psnr_per_step"]) if "psnr_per_step" in r else ""
        self.say(f"eval step {r['step']} | val loss{steps} "
                 + " ".join(f"{loss:.4f}" for loss in r.get("loss_per_step", [r["loss"]])) + psnr)

    def on_saved(self, r):
        self.last = r  # the next throughput leaves the evaluation and the save out
        plot_metrics(self.records, self.out / "loss.png")

    def on_message(self, r):
        self.say(r["text"])
        plot_metrics(self.records, self.out / "loss.png")


def is_record(record):
    """A metrics.jsonl record as the log and its plots read it: a kind, a step, and a train or eval record's
    loss (an eval's loss after each thinking step, if it has them) as numbers."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return (isinstance(record, dict) and isinstance(record.get("kind"), str) and isinstance(record.get("step"), int)
            and not isinstance(record["step"], bool) and record["step"] >= 0
            and (record["kind"] not in ("train", "eval") or number(record.get("loss")))
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


def figure(**kw):
    """A matplotlib Figure (no pyplot state) that Jupyter shows as a picture by itself."""
    import io
    from matplotlib.figure import Figure
    fig = Figure(**kw)

    def png():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()
    fig._repr_png_ = png
    return fig


def plot_metrics(records, path):
    """Loss curve PNG from the metrics log: the training loss smoothed (raw, faint), and the validation
    loss (an EBT's after 1, the trained and the most evaluated thinking steps)."""
    fig = figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train, val = ([r for r in records if r["kind"] == kind] for kind in ("train", "eval"))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="C0", alpha=0.25, lw=0.8)
        smooth = list(itertools.accumulate(losses, lambda avg, loss: 0.9 * avg + 0.1 * loss))
        ax.plot(steps, smooth, color="C0", label="train loss (smoothed; raw faint)")
    K = len(val[0].get("loss_per_step", [])) if val else 0
    trained = val[0]["loss_per_step"].index(val[0]["loss"]) if K else None  # evaluate() took "loss" from there
    for k in sorted({0, trained, K - 1}) if K else []:
        ax.plot([r["step"] for r in val], [r["loss_per_step"][k] for r in val], marker="o",
                label=f"val loss, {k + 1} thinking step{'s' if k else ''}{' (as trained)' if k == trained else ''}")
    if val and not K:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
    images = any(r["kind"] == "start" and r.get("model", "").startswith("image_") for r in records)
    ax.set(xlabel="optimizer step", ylabel="loss (smooth L1 on pixels in [-1, 1])" if images else "loss (nats per token)",
           title=f"training: {Path(path).parent.name}")
    if ax.get_legend_handles_labels()[0]:  # nothing yet when stopped before the first log
        ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


# -----------------------------------------------------------------------------
# Text, tokenizers and checkpoints, read with one-line errors

def read_text(path, flag="--data"):
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; pass a text file with {flag}")
    if not path.is_file():
        raise UsageError(f"{flag} {path} does not exist; pass an existing text file with {flag}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path} is not readable UTF-8 text ({e})") from None
    if not text:
        raise UsageError(f"{flag} {path} is empty; pass a text file with {flag}")
    return text


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shakespeare():
    """Tiny Shakespeare, from the compressed copy in data/ (checked against its checksum)."""
    try:
        raw = gzip.decompress(SHAKESPEARE.read_bytes())
    except OSError as e:
        raise UsageError(f"{SHAKESPEARE} is missing or damaged ({e}); restore it from git, or pass --data") from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise UsageError(f"{SHAKESPEARE} does not hold Tiny Shakespeare (checksum); restore it from git, or pass --data")
    return raw.decode("utf-8")


def text_or_shakespeare(path=None):
    return read_text(path) if path else shakespeare()


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        points = [ord(c) for c in self.chars]  # code point -> id, -1 for none (also the last, past them all)
        self.table = np.full(max(points, default=0) + 2, -1, np.int32)
        self.table[points] = np.arange(len(points))
        self.ascii_ids = bytes(self.index.get(chr(b), 255) if self.vocab_size < 255 else 255 for b in range(256))

    @classmethod
    def fit(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise UsageError(f"characters not in the vocabulary: {''.join(missing)!r}")
        return [self.index[c] for c in text]

    def encode_array(self, text):
        """encode() of a long text as an array, at numpy's speed: each code point looked up in a table; ASCII text
        and a vocabulary under 255, the common case, at bytes' speed (bytes.translate, 255 for none)."""
        if text.isascii() and self.vocab_size < 255:
            ids = np.frombuffer(text.encode("ascii").translate(self.ascii_ids), np.uint8)
        else:
            ids = self.table[np.minimum(np.frombuffer(text.encode("utf-32-le"), np.uint32), len(self.table) - 1)]
        if (ids == (255 if ids.dtype == np.uint8 else -1)).any():
            self.encode(text)  # names the missing characters
        return ids

    def decode(self, ids):  # an id past the characters (a padded --vocab_size) reads as U+FFFD
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids)

    def state(self):
        return {"kind": "char", "chars": "".join(self.chars)}


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
        GPT-2's pre-tokenizer cuts too (after a newline that a non-space follows), so the ids are the whole's."""
        pieces, start = [], 0
        while start < len(text):
            end = safe_cut(text, start + piece)
            pieces.append(text[start:end])
            start = end
        batches = self.enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
        return np.concatenate([np.asarray(ids, np.int64) for ids in batches]) if batches else np.zeros(0, np.int64)

    def decode(self, ids):
        return self.enc.decode([i if i < self.vocab_size else self.enc.eot_token for i in ids])

    def state(self):
        return {"kind": "gpt2"}


def safe_cut(text, start=0):
    """The first place at or after start where BPE may cut text without changing its tokens: just after a
    newline that a non-space follows (GPT-2's pre-tokenizer ends a piece there); len(text) if none."""
    match = re.compile(r"\n(?=\S)").search(text, max(start - 1, 0))
    return match.end() if match else len(text)


def tokenizer_from_state(state):
    return CharTokenizer(state["chars"]) if state["kind"] == "char" else GPT2Tokenizer()


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


RESUMABLE = ("model", "model_config", "optimizer", "train_config", "step")


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
    model, tokenizer = load_model(ckpt, device, **overrides), tokenizer_from_state(ckpt["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids past the model's would index nothing
        raise UsageError(f"checkpoint {path}: its tokenizer has {tokenizer.vocab_size} tokens, its model "
                         f"{model.config.vocab_size}; they were not trained together")
    return model, tokenizer


def require_ebt(model, what):
    if not isinstance(model, ebt.Thinker):
        raise UsageError(f"{what} needs an EBT; this checkpoint holds a {model.config.model!r} model")
