"""Training on several processes or machines with PyTorch's own stack: ``torchrun`` launches the
processes, ``torch.distributed`` joins them into a process group (gloo on CPU, NCCL on CUDA),
``DistributedDataParallel`` or FSDP2's ``fully_shard`` wraps the model, and the state-dict API of
``torch.distributed.checkpoint`` gathers sharded weights and optimizer state for saving.

How a step is split. Every rank draws the *same* global batch from the run's seeded stream (the
batch_size rows of one optimizer step, as grad_accum x world_size micro-batches) and keeps its own
grad_accum of them: rank r takes micro-batches r*grad_accum ... (r+1)*grad_accum - 1. The counts
that normalise each loss part are the whole step's, known on every rank without communication, so
the averaged gradient equals the gradient of one process accumulating all the micro-batches, and a
run resumed at another world size continues the same stream of batches. What each rank draws but
does not keep costs host time only (index and mask arithmetic).

Seeds. The batch stream is shared (seeded by ``seed``); the global torch generator, which drives
dropout, is rank 0's own stream on rank 0 and a stream derived from (seed, rank, step) elsewhere.

This module owns the process group's lifetime (joined on first use, left with a barrier at exit:
FSDP2 under gloo can abort in ``destroy_process_group`` without one) and turns a lost rank into one
sentence naming it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from triform.errors import ConfigError, TriformError

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
FSDP_SMALL = 20_000_000  # below this many parameters FSDP saves little memory and costs communication
HEARTBEAT_S = 0.5  # each rank bumps its counter in the rendezvous store this often
FAILURE_WINDOW_S = 3.0  # a rank whose counter has not moved for this long after a failure is gone


class RankFailure(TriformError):
    """Another rank died or lost its connection; the run cannot go on."""


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment variable {name} must be an integer, got {value!r}.") from None


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 outside torchrun."""
    size = env_int("WORLD_SIZE", 1)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE must be at least 1, got {size}.")
    return size


def env_rank() -> int:
    return env_int("RANK", 0)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that prints, logs and writes files."""
    return env_rank() == 0


def print_main(msg: str) -> None:
    """Print a progress message to stderr from rank 0 only."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, world size, and how the model is parallelised."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def _endpoint() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def setup(parallel: str = "auto", backend: str = "auto", *, device: torch.device, timeout_s: float = 300.0) -> World:
    """Join the process group torchrun's environment describes (once per process) and return this
    process's World. Outside torchrun (WORLD_SIZE unset or 1) nothing is joined."""
    global _WORLD
    size, rank, local = env_world_size(), env_rank(), env_int("LOCAL_RANK", 0)
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}.")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend nccl needs CUDA GPUs and none is visible; use --backend gloo (the default on CPU).")
    if size == 1:
        _WORLD = World()
        return _WORLD
    if parallel == "none":
        raise ConfigError(f"--parallel none cannot train under torchrun with {size} processes; use ddp or fsdp "
                          "(or launch a single process).")
    mode = "ddp" if parallel == "auto" else parallel
    chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError("backend nccl runs on CUDA devices; this run's device is the CPU (use --backend gloo).")
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"could not join the process group at {_endpoint()} as rank {rank} of {size} "
                              f"within {timeout_s:.0f}s ({first}).") from None
        atexit.register(shutdown)
    _WORLD = World(rank=rank, size=size, local_rank=local, parallel=mode, backend=chosen)
    _start_heartbeat(rank)
    return _WORLD


_BEAT: dict[str, Any] = {}


def _start_heartbeat(rank: int) -> None:
    """A daemon thread that bumps ``triform/beat/RANK`` in the rendezvous store (held by torchrun's
    agent, so it outlives any worker) while this process lives, so the survivors of a failure can
    tell which rank is gone."""
    import threading

    if _BEAT.get("thread") is not None:
        return
    store = _store()
    if store is None:
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                store.add(f"triform/beat/{rank}", 1)
            except Exception:  # noqa: BLE001 (the store is gone: nothing to report to)
                return
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="triform-heartbeat", daemon=True)
    thread.start()
    _BEAT.update(thread=thread, stop=stop)


def _stop_heartbeat() -> None:
    stop, thread = _BEAT.pop("stop", None), _BEAT.pop("thread", None)
    if stop is not None:
        stop.set()
    if thread is not None:
        thread.join(timeout=2 * HEARTBEAT_S)


def current() -> World:
    return _WORLD if _WORLD is not None else World()


def shutdown(ok: bool = True) -> None:
    """Leave the process group: a barrier first (so no rank tears down gloo while another still uses
    it), then ``destroy_process_group``. After a failure (``ok`` False) the barrier is skipped."""
    global _WORLD
    import torch.distributed as dist

    _stop_heartbeat()
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (a peer already gone: nothing left to tidy)
            pass
    _WORLD = None


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU (its local rank) when training on CUDA."""
    if world.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def micro_batches(world: World, grad_accum: int) -> tuple[int, int]:
    """The slice [start, stop) of a step's grad_accum x world_size micro-batches this rank keeps."""
    return world.rank * grad_accum, (world.rank + 1) * grad_accum


def seed_rank(world: World, seed: int, step: int) -> None:
    """Give ranks other than 0 their own torch stream (dropout), derived from seed, rank and step."""
    if world.rank > 0:
        torch.manual_seed((seed + 1_000_003 * world.rank + 7919 * step) % (2**63))


def _blocks(model: nn.Module) -> list[nn.Module]:
    from triform.layers.block import Block

    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, Block) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def wrap(model: nn.Module, world: World, device: torch.device, *, find_unused: bool = True,
         say: Any = print_main) -> nn.Module:
    """The model as the training step calls it: ``model`` itself in one process, a
    DistributedDataParallel wrapper, or ``model`` sharded in place with FSDP2 (every shared block,
    then the root, on a device mesh of all ranks). ``find_unused``: some parameter gets no gradient,
    so DDP must look for them every step."""
    if not world.active:
        return model
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   forward_sync_buffers=False, find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n = sum(p.numel() for p in model.parameters())
    if n < FSDP_SMALL:
        say(f"warning: FSDP shards a {n / 1e6:.1f}M-parameter model over {world.size} ranks; at this size it saves "
            "little memory and adds communication every layer, so --parallel ddp is usually faster.")
    import warnings

    # our objectives read a model's outputs without modifying them in place, which is what this warns of
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world.size,))
    blocks = _blocks(model)
    encoder = getattr(getattr(model, "cfg", None), "share_layers", False)
    if not encoder:  # ALBERT's one block runs n times per forward: shard it with the root instead
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module underneath a DDP wrapper (an FSDP2 module is its own)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def all_reduce_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not world.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def full_norm(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor (FSDP2's clip returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- state for checkpoints -------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
    """Full model and optimizer state dicts, in the single-process format (parameters numbered in
    optimizer order), on rank 0; (None, None) on other ranks. Every rank must call it (FSDP
    gathers shards)."""
    if world.parallel != "fsdp" or not world.active:
        base = unwrap(model)
        if not world.is_main:
            return None, None
        return base.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not world.is_main:
        return None, None
    order = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: value for name, value in osd["state"].items()}
    groups = []
    for g in osd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]})
    return msd, {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], world: World) -> None:
    """Load a single-process optimizer state dict into ``optimizer`` (sharding it under FSDP)."""
    if world.parallel != "fsdp" or not world.active:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _param_names(model, optimizer)
    state = {order[int(i)]: value for i, value in saved["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[int(i)] for i in g["params"]]}
              for g in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))  # unused parameters have no state


# ---- failures ---------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops the other workers this way when one of them fails)."""


_STOPPING = {"now": False}


def stopping() -> None:
    """From here on this process is on its way out: a further SIGTERM is ignored."""
    _STOPPING["now"] = True


@contextmanager
def terminate_as_exception(world: World) -> Iterator[None]:
    """While training under torchrun, turn SIGTERM into ``Terminated`` so the rank can say why it
    stops. The handler stays in place if training fails (torchrun's SIGTERM may arrive while the
    failure is being reported, and is then ignored)."""
    if not world.active or sys.platform == "win32":
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not _STOPPING["now"]:
            _STOPPING["now"] = True
            raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    yield
    signal.signal(signal.SIGTERM, previous)


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the process group losing a peer (not a bug in the step)."""
    import torch.distributed as dist

    if isinstance(exc, Terminated):
        return True
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("Connection closed", "Connection reset", "gloo", "Gloo", "NCCL", "Broken pipe",
                                  "timed out", "Timed out", "connection", "Socket"))


def _store() -> Any:
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


def missing_ranks(world: World, window_s: float = FAILURE_WINDOW_S) -> list[int] | None:
    """After a failure, the other ranks whose heartbeat counter did not move within ``window_s``;
    None when the store cannot be reached (it went with the node that hosted it)."""
    store = _store()
    if store is None:
        return None
    try:
        others = [r for r in range(world.size) if r != world.rank]
        before = {r: store.add(f"triform/beat/{r}", 0) for r in others}
        deadline = time.monotonic() + window_s
        moving: set[int] = set()
        while time.monotonic() < deadline and len(moving) < len(others):
            time.sleep(HEARTBEAT_S / 2)
            moving |= {r for r in others if r not in moving and store.add(f"triform/beat/{r}", 0) != before[r]}
        return [r for r in others if r not in moving]
    except Exception:  # noqa: BLE001
        return None


def failure_message(world: World, step: int, last_checkpoint: str | None, *, terminated: bool = False) -> str:
    """One sentence: which rank was lost (found from the heartbeats), at which step, and what still
    loads. ``terminated``: this rank itself was sent SIGTERM."""
    missing = missing_ranks(world)
    keep = (f"; the last checkpoint ({last_checkpoint}) still loads" if last_checkpoint
            else "; no checkpoint had been written yet")
    if terminated and not missing:
        return f"stopped by SIGTERM at step {step}{keep}."
    if missing:
        who = ("rank " + ", ".join(str(r) for r in missing)) + f" of {world.size}"
        what = f"{who} stopped (its process died or lost its connection)"
    elif missing == []:
        what = f"a collective failed although all {world.size} ranks are alive (it timed out, or a rank was stopped)"
    else:
        what = f"another rank of {world.size} stopped (its process died or lost its connection)"
    return f"training stopped at step {step}: {what}{keep}."
