"""Several processes (`accelerate launch`, one process per device, on one node or several): the one seam the
pipeline uses to split work, gather results and keep one writer per file.

- `map_shards(n, work)`: work is cut in `n` shards whose size never depends on the number of processes;
  shard i is done by process i mod N (`owner`), and every process gets every result, in shard order. A shard
  carries its own seed, so what it produces does not depend on which process made it, nor on how many there are.
  `map_waves`: the same when one engine, fed by the main process, generates every shard (a wave of N at a time)
  and only what follows (judging) is split.
- `write_once(path, write)`: one writer per file. The main process writes; a node whose filesystem does not
  see that file (each node its own cache, as `TMPDIR` and node-local disks are) writes it once, from its
  local main process.
- `in_turn()`: a block that builds a cache entry without collective calls (the embedded model, tokenized
  data) runs on the main process first, so the others find the entry built.
- `everywhere(flag)`: decisions that lead into collective work ("is this cached?") are taken together, so no
  process skips a step the others enter.
- `receive_weights(model)`: every process holds rank 0's weights before it generates, scores or caches
  anything, and their fingerprints are compared (a mismatch is one line naming the processes).

With one process (or no process group) every function is the plain single-process version.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from prefrun.errors import InputError, PrefrunError
from prefrun.preemption import Preempted

log = logging.getLogger(__name__)

T = TypeVar("T")


class ProcessMismatch(PrefrunError, RuntimeError):
    """Processes of one job disagree on something they must share (weights, a setting)."""


def env_from_job() -> bool:
    """The tasks of a cluster job as torch's ranks, without torchrun: Hydra's submitit launcher with
    `tasks_per_node` > 1 (submitit's own job environment, local or SLURM), or `srun` starting one task per GPU
    (SLURM's step variables). Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first node)
    and MASTER_PORT (from the job id) unless a launcher (accelerate, torchrun) already did. Returns whether it
    set them. (A failed task then stops the others through the process group; with srun add
    `--kill-on-bad-exit=1` so that SLURM ends the step at once.)"""
    env = os.environ
    if "WORLD_SIZE" in env:
        return False
    if "SUBMITIT_EXECUTOR" in env:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks <= 1:
            return False
        # accelerate picks each process's GPU by LOCAL_RANK: every task keeps seeing all of the node's GPUs.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return True
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))  # the step's tasks (srun), not the allocation's
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return False
    per_node = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(tasks)), int(env.get("SLURM_NODEID", "0")))
    env.update({"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "LOCAL_WORLD_SIZE": str(per_node)})
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
    # the step too: two steps of one job at once (`srun ... &` twice) would both listen on the job's port
    step = env.get("SLURM_STEP_ID", "0")
    env.setdefault("MASTER_PORT", str(20_000 + (int(env.get("SLURM_JOB_ID", "0"))
                                                + 7_919 * (int(step) if step.isdigit() else 0)) % 40_000))
    return True


def first_host(node_list: str) -> str:
    """The first host of a SLURM node list: each bracket of its first entry at its first value, the rest of the
    name kept: `gpu[07-09,12],cpu3` -> `gpu07`, `node[1-2]-ib` -> `node1-ib`, `rack[1-2]-n[01-02]` ->
    `rack1-n01`, `node5` -> `node5`."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", node_list)
    if first is None:
        return "127.0.0.1"
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first.group(0))


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """This node's share of SLURM_STEP_TASKS_PER_NODE (`8(x2),4`: 8 on nodes 0 and 1, 4 on node 2)."""
    counts = []
    for entry in tasks_per_node.split(","):
        count, _, repeat = entry.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(node, len(counts) - 1)]


def start(timeout_s: float) -> None:
    """Join the job's process group when launched with several processes (`accelerate launch`, torchrun) and
    nothing has yet: `prefrun generate` has no Accelerator. accelerate's PartialState picks the backend
    (gloo on CPUs, NCCL on GPUs) and this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _active():
        import datetime

        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=timeout_s))


# What gloo and NCCL say when a collective's peer is gone (killed, crashed, its node down) or did not answer in time.
_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused", "remote process exited",
              "ncclRemoteError", "remote worker")
_PEER_LATE = ("Timed out waiting", "Socket Timeout", "wait timeout")


def peer_lost(err: BaseException) -> str | None:
    """The line for a collective that failed because another process of the job is gone or did not answer within
    the process group's timeout (`dist_timeout_s`), as this process saw it; None for any other error. That
    process says why in its own log, if it could."""
    if not isinstance(err, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(err)
    if not isinstance(err, dist.DistError) and not any(k in text for k in ("gloo", "NCCL", "c10d")):
        return None  # another library's error that happens to say "connection refused"
    said = text.split("] ", 1)[-1].split(". This is typically")[0].strip()
    me = f"process {dist.get_rank()} of {dist.get_world_size()}"
    if any(s in text for s in _PEER_LATE):
        return (f"{me}: another process of this job did not answer in time ({said}): one is stuck, or much slower "
                "than the others (then raise trainer.dist_timeout_s, or dist_timeout_s outside training)")
    if any(s in text for s in _PEER_GONE):
        return (f"{me}: another process of this job is gone ({said}): it printed why if it could (a node that "
                "went down says nothing); what was finished is on disk")
    return None


def finish() -> None:
    """Leave the process group together at the end of a command. Left to the interpreter's exit, gloo's threads
    are torn down while a peer may still be closing its connections, and a process that did all its work ends
    in `terminate called without an active exception` (SIGABRT)."""
    if not _active():
        return
    dist.barrier()
    try:
        store, world = _store(), world_size()
    except (AttributeError, RuntimeError, ValueError):  # torch's own store, private: without it, only the barrier
        store = None
    dist.destroy_process_group()
    if store is None:
        return
    # Nobody leaves (closing its sockets) before every process has torn its groups down: a process still in
    # destroy_process_group whose peer had exited still aborted now and then (FSDP2 jobs with engines=main).
    try:
        store.add("prefrun/finished", 1)
        deadline = time.monotonic() + 30
        while store.add("prefrun/finished", 0) < world and time.monotonic() < deadline:
            time.sleep(0.02)
    except (RuntimeError, OSError):  # the store's host left first: everyone else had finished too
        pass


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if _active() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device where no Accelerator chose one (`prefrun generate`, `prefrun eval`): the GPU accelerate
    (or torchrun) assigned it, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if _active():
        dist.barrier()


def owner(shard: int) -> int:
    """The process that does shard `shard` of any `map_shards` call."""
    return shard % world_size()


def gather(value: T) -> list[T]:
    """Every process's `value` (picklable), in rank order, on every process."""
    if not _active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def everywhere(flag: bool) -> bool:
    """True when `flag` holds on every process."""
    return all(gather(bool(flag)))


def together(work: Callable[..., T], *args, **kwargs) -> T:
    """`work(*args, **kwargs)` on every process; a PrefrunError on any of them (a one-line error: bad input, a stale engine)
    is raised on all of them, naming the process, instead of leaving the others waiting in the next collective."""
    if not _active():
        return work(*args, **kwargs)
    try:
        result, error = work(*args, **kwargs), None
    except PrefrunError as err:
        result, error = None, err
    errors = gather(None if error is None else (str(error), getattr(error, "signum", None)))
    failed = [(i, e) for i, e in enumerate(errors) if e is not None]
    stopped = [signum for _, (_, signum) in failed if signum]
    if error is not None and (len(failed) == 1 or getattr(error, "signum", None)):
        raise _printed_by_main(error)
    if stopped:  # a stop signal on another process stops this one too, as one (preemption.py)
        raise Preempted(stopped[0], "with another process")
    if failed:
        i, (message, _) = failed[0]
        raise _printed_by_main(ProcessMismatch(f"process {i}: {message}" if i != rank() else message))
    return result


def _printed_by_main(error: PrefrunError) -> PrefrunError:
    """An error `together` raises on every process: the main process prints it (its own, or "process i: ..."), the
    others need not wait to see it said (`said_by_main`: the main process may take longer than that wait to stop,
    closing its engine)."""
    if not is_main():
        error.printed_by_main = True
    return error


def shared_directory(path: Path, what: str, fix: str) -> None:
    """Refuse, in one line, a directory `path` that is not the same for every process: a node-local disk (or a
    relative path under each node's own working directory) where the run's files must be one (checkpoints,
    rounds: written by one process, read by all). The main process leaves a file there; every process looks."""
    if not _active():
        return
    token = Path(path) / f".shared-{broadcast(os.urandom(8).hex() if is_main() else None)}"
    if is_main():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("")
    barrier()
    seen = gather((token.exists(), socket.gethostname()))
    barrier()

    def verdict() -> None:
        if not is_main():
            return
        token.unlink(missing_ok=True)
        blind = [f"{i} (on {host})" for i, (ok, host) in enumerate(seen) if not ok]
        if blind:
            raise InputError(f"{what} {path} is not the directory the main process writes in, for process(es) "
                             f"{', '.join(blind)}: {fix}")

    together(verdict)


def broadcast(value: T) -> T:
    """The main process's `value` (picklable) on every process; the others' is ignored."""
    if not _active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scatter(values: list | None) -> Any:
    """`values[rank()]` of the main process's list on every process (one value per process; the others pass
    None): each process receives only its own part, where `broadcast` would send all of it to all."""
    if not _active():
        return values[0]
    box: list[Any] = [None]
    dist.scatter_object_list(box, values if is_main() else None, src=0)
    return box[0]


def from_main(work: Callable[[], T]) -> T:
    """`work()` on the main process only; every process gets its result (a one-line error there stops all)."""
    return broadcast(together(lambda: work() if is_main() else None))


def is_sharded(model) -> bool:
    """True when `model`'s parameters are sharded over the processes (FSDP2 DTensors, DeepSpeed ZeRO-3): its
    forward is then a collective, which every process must run the same number of times. Which collectives a
    forward makes does not depend on its input (each layer gathers its parameters), so processes may forward
    different inputs, as long as they make as many forwards (`map_shards_in_step`)."""
    if model is None:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def map_shards(num_shards: int, work: Callable[[int], T], *, split: bool = True,
               shards: range | None = None) -> list[T]:
    """`[work(0), ..., work(num_shards - 1)]` on every process, each shard computed once, by `owner(shard)`; a
    one-line error in any shard stops every process with it (`together`). `split=False` (the work runs a
    sharded model, `is_sharded`): every process does every shard, in order, so that the model's collective
    forwards line up; the results are the same, the work is not divided. `work` must then write files only on
    the shard's owner. `shards`: only these of the `num_shards` (a wave of `map_waves`), their results in order."""
    todo = range(num_shards) if shards is None else shards
    if not split:
        return together(lambda: [work(shard) for shard in todo])
    mine = together(lambda: {shard: work(shard) for shard in todo if owner(shard) == rank()})
    if not _active():
        return [mine[shard] for shard in todo]
    done: dict[int, T] = {}
    for part in gather(mine):
        done.update(part)
    return [done[shard] for shard in todo]


def map_shards_in_step(num_shards: int, work: Callable[[int], Any], *, steps: Callable[[int], int],
                       idle: Callable[[], None], then: Callable[[int, Any], T] | None = None, model=None) -> list[T]:
    """`map_shards` for work that runs a sharded model (FSDP2, ZeRO-3: each forward is a collective): the shards are
    still split, and a process that has made fewer steps than the busiest makes `idle()` steps until they are
    even, so that every step meets its peers'. A step is a unit of collectives that is the same whatever the
    input: a forward (reference scoring; idle: a token's forward), or a synced model.generate() call, which
    keeps forwarding until every process's call has ended (HF generation; idle: a call that samples one token).
    `steps(shard)` is how many steps `work(shard)` makes, known before any runs (every process must be told
    the same). `then(shard, made)`: the shard's work that makes no step (judging, writing), given what
    `work(shard)` made; a one-line error there, or one `work` raises before its first step (its input refused),
    is held until this process has made all its steps (the rest as idle ones), then stops every process with
    it, as in map_shards, instead of leaving the others waiting in a step it will never make. `model`: the sharded model the steps run; a stop signal then stops every process at
    the same forward of it (`stops_at_shared_forwards`)."""
    mine = [shard for shard in range(num_shards) if owner(shard) == rank()]
    counts = gather(sum(steps(shard) for shard in mine))

    def run() -> dict[int, T]:
        done: dict[int, T] = {}
        failed: PrefrunError | None = None
        with stops_at_shared_forwards(model):
            for shard in mine:
                if failed is not None:
                    for _ in range(steps(shard)):
                        idle()
                    continue
                try:
                    made = work(shard)
                except PrefrunError as err:  # raised before the shard's first step (a generate() call's checks
                    if getattr(err, "signum", None):  # of its input): its steps are made idle, as the shards' after
                        raise  # it. (A stop signal is raised at a forward every process stops at.)
                    failed = err
                    for _ in range(steps(shard)):
                        idle()
                    continue
                try:
                    done[shard] = made if then is None else then(shard, made)
                except PrefrunError as err:
                    failed = err
            for _ in range(max(counts) - counts[rank()]):
                idle()
        if failed is not None:
            raise failed
        return done

    results: dict[int, T] = {}
    for part in gather(together(run)):
        results.update(part)
    return [results[shard] for shard in range(num_shards)]


@contextmanager
def stops_at_shared_forwards(model) -> Iterator[None]:
    """Inside: work in which every process makes the same forwards of `model` at once (a sharded policy: each forward
    is a collective; `map_shards_in_step`). A stop signal raised at once (outside training it is) would leave this
    process in the error exchange while the others wait in a forward's collective (a hang, or gloo's collective
    mismatch). Here it waits for the next forward, where the processes ask each other (one max-reduce of the
    caught signal: HF's synced generation makes one such reduce per token already) and all stop at once; one
    caught after the last forward stops this process on leaving (`preemption.at_step_boundaries`), every process
    then learning it from `together`. A no-op with one process or without a model."""
    if model is None or not _active():
        yield
        return
    from prefrun import preemption

    def ask(module, args) -> None:
        flag = torch.tensor([preemption.caught() or 0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = preemption.shared(int(flag.item()))
        if stop is not None:
            raise stop

    base = model.get_base_model() if hasattr(model, "peft_config") else model  # (PEFT's generate skips its wrapper)
    handle = base.register_forward_pre_hook(ask)
    try:
        with preemption.at_step_boundaries("the next forward, with the other processes"):
            yield
    finally:
        handle.remove()


def map_waves(num_shards: int, make: Callable[[list[int]], dict[int, Any]], work: Callable[[int, Any], T]) -> list[T]:
    """`map_shards` for work whose first part is done for all processes by one engine that the main process
    feeds (a vLLM engine with generator.engines=main): the shards go in waves of one per process;
    `make(wave)` runs on every process at once (its engine calls are shared: the same result everywhere) and
    returns {shard: input}, then `work(shard, input)` runs on the shard's owner, as in map_shards. A wave
    is the unit of loss when the job is killed, as a shard is in map_shards."""
    results: list[T] = []
    for first in range(0, num_shards, world_size()):
        wave = range(first, min(num_shards, first + world_size()))
        made = make(list(wave))
        results += map_shards(num_shards, lambda shard, made=made: work(shard, made.get(shard)), shards=wave)
    return results


def num_shards(num_items: int, shard_size: int) -> int:
    return -(-num_items // shard_size)


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of shard `shard` of a job seeded with `seed`: fixed by the shard's position, so the
    shard samples the same whichever process makes it, and a resumed job samples what an uninterrupted one would."""
    return seed + 7919 * shard


def write_once(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` by one process per filesystem: the main process, then the local main process of a node
    that does not see the file the main process wrote (a node-local disk). Every process returns after the
    file exists where it can see it."""
    path = Path(path)
    together(lambda: write(path) if is_main() else None)  # a full disk there is one line everywhere
    together(lambda: write(path) if not is_main() and local_rank() == 0 and not path.exists() else None)


@contextmanager
def in_turn() -> Iterator[None]:
    """The block runs on the main process first, then on the local main process of every other node, then on
    the rest: a cache entry the block builds (the embedded model, a tokenized data set) has one writer per
    filesystem, and the others find it built. No collective call may happen inside the block."""
    turn = 0 if is_main() else 1 if local_rank() == 0 else 2
    for _ in range(turn):
        barrier()
    try:
        yield
    finally:  # an error in the block still lets the others take their turn (and meet the same error)
        for _ in range(turn, 2):
            barrier()


def receive_weights(model: torch.nn.Module, fingerprint: Callable[[torch.nn.Module], str],
                    what: str = "policy") -> str | None:
    """Give every process rank 0's parameters and buffers (in place), then check that all processes hold the
    same weights. Under FSDP with `fsdp_cpu_ram_efficient_loading` transformers loads real weights on local
    rank 0 only and zeros elsewhere; `prepare()` would broadcast them, but generation, scoring and caches come
    before training. `fingerprint` hashes a model's weights (prefrun.model.fingerprint). Returns the weights'
    fingerprint (None with one process)."""
    if not _active():
        return None
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "meta":
                raise ProcessMismatch(f"process {rank()}: the {what}'s weights are on the meta device (not loaded); "
                                      "load them on every process (fsdp_cpu_ram_efficient_loading keeps zeros, "
                                      "which is fine)")
            if tensor.device == device():
                dist.broadcast(tensor.data, src=0)
            else:  # a model in host memory until FSDP shards it: NCCL sends device tensors, one at a time here
                sent = tensor.data.to(device())
                dist.broadcast(sent, src=0)
                tensor.data.copy_(sent)
    prints = gather(fingerprint(model))
    if len(set(prints)) > 1:
        odd = [i for i, p in enumerate(prints) if p != prints[0]]
        raise ProcessMismatch(f"the {what}'s weights differ between processes (process 0 vs {odd}) after they were "
                              "sent from process 0: stop, and report it with the accelerate config")
    return prints[0]


def save_pretrained(model, path, **kwargs) -> None:
    """`model.save_pretrained(path, ...)` from whichever process prefrun chose to write it. transformers >= 5
    silently writes nothing from a process whose torch.distributed rank is not 0 (it would leave a directory
    without config.json: a node's own cache, or the weights a process pushes into its own engine); here the
    caller has already picked the writer, so that check is lifted for this call. transformers also sets the
    config's dtype to the weights' (config.json says what the files hold); the config in memory keeps the dtype
    the model was loaded in (`prefrun.model.loaded_dtype`: weights held in fp32 are still sampled and served in it)."""
    config = getattr(model, "config", None)
    loaded = getattr(config, "dtype", None)
    lifted = hasattr(type(model), "should_save_on_this_rank")
    if lifted:
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        if lifted:
            del model.should_save_on_this_rank
        if loaded is not None:
            config.dtype = loaded


_STOPPED = "prefrun/stopped/"  # + rank: "<exit status> <line>" of a process that stopped with a line of its own


def _store():
    return dist.distributed_c10d._get_default_store()  # torch's own, private: without it, every process speaks


def said_by_main(line: str, code: int = 2, wait_s: float = 3.0, *, known: bool = False) -> bool:
    """For a process that stops with a one-line error: posts the line in the process group's store (for
    `stopped_peer`), and returns True when this is not the main process and the main process stops with the same
    line (a bad input every process reads alike, or one `together` shared), which the main process prints: every
    process printed it before. Another process waits a few seconds for the main process's line, and prints its own
    when the main process says something else or nothing (it still runs: the line is this process's alone).
    `known`: the main process prints it (`together` raised it on every process), after closing what it holds (an
    engine: it may take longer than `wait_s`); this process waits for it longer (60 s), since the launcher stops the
    job when the first process exits, and prints nothing whatever it sees."""
    if not _active():  # no process group yet (plan=true): a line every process stops with is the main one's to say
        return known and int(os.environ.get("RANK", "0")) != 0
    try:
        store = _store()
        store.set(f"{_STOPPED}{rank()}", f"{code} {line}")
        if is_main():
            return False
        import datetime

        try:
            store.wait([f"{_STOPPED}0"], datetime.timedelta(seconds=60 if known else wait_s))
        except Exception:  # noqa: BLE001 - nothing from the main process in time
            return known
        # (the main process may name this one: "process 1: ...")
        return known or store.get(f"{_STOPPED}0").decode().split(" ", 1)[1].endswith(line)
    except Exception:  # noqa: BLE001 - no store, or nothing from the main process: the line is printed
        return False


def stopped_peer() -> tuple[int, int, str] | None:
    """(rank, exit status, line) of another process that stopped with a line of its own (`said_by_main`), as the
    job's store holds it; None when none did or the store is gone with its host."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = _store()
        for other in range(dist.get_world_size()):
            key = f"{_STOPPED}{other}"
            if other != dist.get_rank() and store.check([key]):
                code, line = store.get(key).decode().split(" ", 1)
                return other, int(code), line
    except Exception:  # noqa: BLE001 - the store's host went down too
        return None
    return None


def quiet_other_processes() -> None:
    """Only the main process prints and writes the run's log: the others keep errors on the console and
    write nothing into the run directory (Hydra's file handler would give train.log one writer per process)."""
    if is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.ERROR)
    try:  # transformers' and datasets' progress bars (loading weights, mapping a data set): the main process's only
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
