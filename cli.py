"""
The drivers' command line, which a reader of EBTs need not read: flags made from the config dataclasses and their
layering, devices, and invoke(main): errors as one line, signals as an orderly stop. A run's folder: rundir.py.
"""
import argparse
import os
import signal
import sys
import threading
from dataclasses import fields


def quiet_interrupt(signum, frame):
    """Ctrl-C or SIGTERM before invoke() listens, while torch loads (a second or two): one line, exit 130 or 143."""
    print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
    sys.exit(143 if signum == signal.SIGTERM else 130)


# the drivers import cli first, so this covers their start-up; for any other importer nothing changes after it
main_thread = threading.current_thread() is threading.main_thread()
outer = {s: signal.signal(s, quiet_interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
import numpy  # noqa: E402, F401  (before torch, which imports it under a handler that swallows an exit)
import torch  # noqa: E402

import ebt  # noqa: E402
import rundir  # noqa: E402
from checks import ConfigError, UsageError, check_values  # noqa: E402

for s, handler in outer.items():
    signal.signal(s, handler)

# the ModelConfig fields that set how a model thinks (option's "thinking"): with --eval_steps and --recipe, EBT flags
THINKING_FLAGS = tuple(f.name for f in fields(ebt.ModelConfig) if f.metadata["thinking"])
IMAGE_THINKING_FLAGS = tuple(f.name for f in fields(ebt.ModelConfig) if f.metadata["thinking"] == "all")


# -----------------------------------------------------------------------------
# Errors as one line, and signals

def invoke(main):
    """Run a driver's main(): user errors, running out of memory, a failed write and a silent peer rank
    become one line on stderr and exit code 2; Ctrl-C and SIGTERM (how schedulers stop jobs) exit 130,
    training first saving at the end of its step (stop), and SIGTERM before it 143."""
    handlers, finished = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}, False
    try:
        main()
        finished = True
    except KeyboardInterrupt as e:  # stop's carries its signal: SIGTERM before training listens exits 143
        quiet_interrupt(e.args[0] if e.args else signal.SIGINT, None)
    except (UsageError, RuntimeError, OSError) as e:  # a file that cannot be written, a full disk: one line too
        message = str(e) if isinstance(e, UsageError) else explain(e)
        if message is None and not isinstance(e, OSError):
            raise
        print(f"error: {message or e}", file=sys.stderr)
        sys.exit(2)
    finally:
        try:  # every rank ends together after a finished run or a stop signal; after a failure one may be gone
            rundir.leave_process_group(meet=finished or rundir.stop_requested)
        except KeyboardInterrupt:  # a stop signal once the work is done: nothing is left to stop
            sys.exit(0 if finished else 130)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)


def stop(signum, frame):
    """Ctrl-C or SIGTERM. While training listens: ask it to save and end after this step, every rank
    alike (a second Ctrl-C stops at once); otherwise stop at once."""
    if not rundir.stop_listening or (rundir.stop_requested and signum == signal.SIGINT):
        raise KeyboardInterrupt(signum)
    if not rundir.stop_requested and rundir.rank() == 0:  # said at once (a step may take minutes); os.write: safe here
        os.write(2, b"stopping after this step, saving (a second Ctrl-C stops at once)\n")
    rundir.stop_requested = True


def explain(e):
    """The one line for a RuntimeError the user can act on, else None."""
    text = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text:
        return "out of memory; lower the sizes (--batch_size, --block_size, --candidates, --windows)"
    if any(s in text for s in ("PytorchStreamWriter", "unexpected pos", "iostream error", "No space left")):
        return f"writing a file failed ({text.splitlines()[0]}): is the disk full? The previous checkpoint is kept"
    if torch.distributed.is_initialized() and any(s in text for s in ("Timed out", "timeout", "closed by peer",
                                                                       "Connection reset")):
        silent = rundir.silent_ranks()
        who = f"rank {', '.join(map(str, silent))}" if silent else "a peer rank"
        return (f"{who} stopped answering: no reply within {rundir.dist_timeout():g} s (stopped, crashed or far too slow; "
                "NANOEBT_DIST_TIMEOUT sets the wait); the last checkpoint is kept")
    return None


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


def configs(args, layers, ckpt=None, log=print):
    """The ModelConfig and TrainConfig of a run, by one rule for every driver. A new run: the fields' defaults, then
    the layers in order (a preset, a recipe, the data's sizes), the flags given, and ebt.derive_thinking for what is
    still None. A resumed run: the checkpoint's own; a model flag or one of ckpt["started"] (preset, recipe, data)
    given must agree with it, a training flag given overrides it (with a notice)."""
    model_names = [f.name for f in fields(ebt.ModelConfig)]
    train_names = [f.name for f in fields(ebt.TrainConfig) if f.name not in ("out_dir", "device")]  # the driver's
    flags = given(args, model_names + train_names)
    if ckpt is None:
        values = {k: v for layer in [*layers, flags] for k, v in layer.items()}  # each over the ones before
        ebt.derive_thinking(values)
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
    except ConfigError as e:
        if ckpt is None or e.name in flags:
            raise UsageError(f"--{e.name} {e.value}: {e.why}") from None
        raise UsageError(f"{args.out_dir}/ckpt.pt records {e.name}={e.value!r}, which {e.why.replace('must', 'should')}: "
                         "no nanoEBT run writes it; start a new run in another --out_dir") from None
    except TypeError as e:  # a field this nanoEBT does not have
        raise UsageError(f"{args.out_dir}/ckpt.pt records a configuration this nanoEBT cannot read ({e}); start a new "
                         "run in another --out_dir") from None
    if cfg.replay_size and round(cfg.replay_batch * tc.batch_size) > cfg.replay_size:
        raise UsageError(f"--replay_batch {cfg.replay_batch}: {round(cfg.replay_batch * tc.batch_size)} replayed "
                         f"sequences a batch, more than the buffer's {cfg.replay_size} (--replay_size)")
    # a warning line for each value that is legal but almost surely a mistake
    if tc.warmup_steps >= tc.max_steps:
        log(f"warning: --warmup_steps {tc.warmup_steps:g} is not below --max_steps {tc.max_steps}: the learning "
            "rate never reaches --lr")
    if "replay_batch" in flags and not cfg.replay_size:
        log("warning: --replay_batch does nothing without a replay buffer (--replay_size 0)")
    if "step_size_lr_mult" in flags and not cfg.learn_step_size:
        log("warning: --step_size_lr_mult does nothing: alpha is not learned (--no-learn_step_size)")
    return cfg, tc


def refuse_thinking(args, model, names=THINKING_FLAGS + ("eval_steps", "recipe")):
    """An EBT option given for a model that does not think is an error, not silently dropped."""
    if model not in ebt.EBT_KINDS and given(args, names):
        raise UsageError(f"--{next(iter(given(args, names)))} is an EBT option; the {model} model does not think")


def check_flags(args, limits):
    """One-line UsageError for the first flag in limits whose value (one, a list of them, or None: not given) is not
    of its type or outside its limits (name -> (type, least, most), as check_values reads them)."""
    for name in limits:
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            try:
                check_values("--", {name: v}, limits)
            except ConfigError as e:
                raise UsageError(f"--{name} {v}: {e.why}") from None


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                        "(default: %(default)s)")


def pick_device(name):
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


