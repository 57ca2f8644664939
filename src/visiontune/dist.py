"""Data-parallel training on torchrun: the process group and the few collectives the job uses.

``visiontune train --nproc-per-node N`` (or ``torchrun -m visiontune train``) starts one
process per device; each runs the same training job. This module is all they need to agree:

* :func:`setup` joins the process group torchrun described in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ...): NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU,
  with a timeout on every collective so a stuck rank fails the job instead of hanging it.
  Host-side agreement (stop flags, small objects) goes over a gloo group, so it never waits on
  the GPU stream.
* :class:`Group` holds rank and world size and the collectives: every one of them is the
  identity in a single process, so the training loop calls them unconditionally and a
  one-process run does exactly what it always did.
* :class:`ShardedBatches` deals fixed batches round-robin to ranks and :meth:`Group.gather_batches`
  puts the results back in order, so a sharded evaluation sees the very batches a single
  process would and its metrics are bit-identical.
* :func:`launch` runs torchrun in-process and turns a failed child into its one-line error;
  :func:`report_failure` is the child's half of that.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from torch.utils.data import Sampler

T = TypeVar("T")

# Set by `visiontune train --nproc-per-node`: children leave printing their error to it.
LAUNCHED_ENV = "VISIONTUNE_LAUNCHED"


class PeerFailed(RuntimeError):
    """Another rank failed or stopped answering; this rank stops too (not the root cause)."""


@dataclass
class Group:
    """This process's place in the job. A default ``Group()`` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: > 0 after torchrun restarted the group
    control: Any = None  # gloo group for host-side agreement (None: the default group)
    owns_init: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- agreement on host values (control group, no GPU sync)
    def barrier(self) -> None:
        if self.distributed:
            _dist().barrier(group=self.control)

    def agree_max(self, value: int) -> int:
        """The largest ``value`` any rank holds (stop signals, skip flags)."""
        if not self.distributed:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.control)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return bool(self.agree_max(int(bool(flag))))

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _dist().all_gather_object(out, obj, group=self.control)
        return out

    def first(self, value: T | None) -> T | None:
        """The first non-``None`` value in rank order (a stop reason set on one rank)."""
        if not self.distributed:
            return value
        return next((v for v in self.all_gather(value) if v is not None), None)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        Used for what reads or writes the run directory (which may exist on rank 0's machine
        only). When ``fn`` fails on rank 0, the other ranks raise :class:`PeerFailed`.
        """
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                value = fn()
            except BaseException as e:
                with contextlib.suppress(Exception):
                    self.broadcast(("error", _one_line(e)))
                raise
            return self.broadcast(("ok", value))[1]
        kind, value = self.broadcast(None)
        if kind == "error":
            raise PeerFailed(f"rank 0 failed: {value}")
        return value

    # ---- reductions of device tensors (default group: NCCL on GPUs)
    def sum_values(self, *values: torch.Tensor | float) -> list[float]:
        """The job-wide sums of per-rank running totals (one collective for all of them)."""
        if not self.distributed:
            return [float(v.item()) if torch.is_tensor(v) else float(v) for v in values]
        device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
        # On the tensors' device (a GPU under NCCL), in float64 so counts stay exact.
        t = torch.stack(
            [
                v.detach().to(device, torch.float64)
                if torch.is_tensor(v)
                else torch.tensor(float(v), dtype=torch.float64, device=device)
                for v in values
            ]
        )
        _dist().all_reduce(t)
        return t.tolist()

    def gather_batches(
        self, tensors: Sequence[torch.Tensor], sizes: list[int], num_batches: int
    ) -> list[torch.Tensor]:
        """Reassemble per-batch results dealt by :class:`ShardedBatches`, in the global order.

        Args:
            tensors: this rank's results, concatenated over its batches (first dimension).
            sizes: the number of rows each of this rank's batches contributed.
            num_batches: batches over all ranks.
        """
        if not self.distributed:
            return list(tensors)
        parts = self.all_gather(([t.cpu() for t in tensors], sizes))
        chunks = [[t.split(rank_sizes) for t in rank_tensors] for rank_tensors, rank_sizes in parts]
        out = []
        for i, ref in enumerate(tensors):
            pieces = [
                chunks[k % self.world_size][i][k // self.world_size] for k in range(num_batches)
            ]
            out.append(torch.cat(pieces) if pieces else ref[:0].cpu())
        return out

    def close(self) -> None:
        if self.owns_init and _dist().is_initialized():
            with contextlib.suppress(Exception):
                _dist().destroy_process_group()


def _dist():
    import torch.distributed as dist

    return dist


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def env_world_size() -> int:
    """The world size torchrun gave this process (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of a torchrun job."""
    return _env_int("RANK", 0) == 0


def job_id() -> str | None:
    """Who runs this process: torchrun's run id, its machine and its agent's pid (what a
    restarted group shares with the attempt before it); ``None`` outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    if run_id not in ("", "none"):
        return run_id
    # A static rendezvous without --rdzv-id: the agent process (our parent) is the job.
    return f"{socket.gethostname()}:{os.getppid()}"


def setup(device: torch.device, timeout_s: float = 1800.0) -> Group:
    """Join the process group torchrun described in the environment (or none: one process).

    Args:
        device: what the job trains on; ``cuda`` selects NCCL and ``cuda:LOCAL_RANK``.
        timeout_s: how long a collective waits for the other ranks before failing the job.
    """
    world = env_world_size()
    group = Group(
        rank=_env_int("RANK", 0),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
    )
    if world <= 1:
        return group
    dist = _dist()
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = device.type == "cuda"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if cuda:
            torch.cuda.set_device(group.local_rank)
            kwargs["device_id"] = torch.device("cuda", group.local_rank)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=_attempt_store(group, timeout),
            rank=group.rank,
            world_size=world,
            timeout=timeout,
            **kwargs,
        )
        group.owns_init = True
    if dist.get_backend() != "gloo":
        group.control = dist.new_group(backend="gloo", timeout=timeout)
    return group


def _attempt_store(group: Group, timeout: datetime.timedelta):
    """torchrun's store, under a prefix of its own for each restart of the group.

    torchrun keeps one store server across restarts; without a prefix, a restarted rank can
    read the address a dead rank of the previous attempt published there and wait forever to
    connect to it.
    """
    dist = _dist()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=group.world_size,
        is_master=not agent_store and group.rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    # Also one prefix per job in this process (train() called again, e.g. by a notebook).
    _INITS.append(group.restart_count)
    return dist.PrefixStore(f"visiontune/attempt_{group.restart_count}/{len(_INITS)}/", store)


_INITS: list[int] = []


def rank_device(group: Group, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA job, else ``device``."""
    if device.type == "cuda" and group.distributed:
        return torch.device("cuda", group.local_rank)
    return device


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``--batch-size`` is the global batch; each rank takes an equal share of it."""
    from visiontune.errors import UserError

    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} is the global batch and does not split evenly over "
            f"{world_size} processes; give a multiple of {world_size}"
        )
    return batch_size // world_size


def wrap(module: torch.nn.Module, group: Group, device: torch.device, *, sync_bn: bool = False,
         broadcast_buffers: bool = True) -> torch.nn.Module:  # fmt: skip
    """``module`` under DistributedDataParallel (itself in a single process).

    Only parameters that require gradients are reduced, so a frozen backbone inside
    ``module`` costs no communication. ``sync_bn`` turns the trainable batch-norm layers into
    SyncBatchNorm (statistics over the global batch; CUDA only).
    """
    if not group.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        _sync_trainable_batchnorm(module)
    import inspect

    # torch >= 2.14 renamed broadcast_buffers (per-forward buffer sync) to forward_sync_buffers.
    params = inspect.signature(DistributedDataParallel).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        **{sync: broadcast_buffers},
    )


def _sync_trainable_batchnorm(module: torch.nn.Module) -> None:
    """SyncBatchNorm for the batch-norm layers that train; frozen ones keep their statistics."""
    from torch import nn

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            trains = any(p.requires_grad for p in child.parameters(recurse=False))
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and trains:
                sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                sync.train(child.training)
                setattr(parent, name, sync)


# --------------------------------------------------------------------------------------------
# Sharding


def shard(order: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``order``, padded as DistributedSampler pads.

    The list is padded with its own head to a multiple of ``world_size`` and dealt
    round-robin, so consecutive runs of ``world_size * b`` entries form one global batch of
    which each rank holds ``b``: the global batches are those of a single process.
    """
    if world_size == 1:
        return order
    total = math.ceil(len(order) / world_size) * world_size
    padded = list(order)
    while len(padded) < total:
        padded += order[: total - len(padded)]
    return padded[rank::world_size]


class ShardedBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` consecutive indices over ``range(n)``; batch ``k`` goes to
    rank ``k % world_size``. With one process: plain sequential batching."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size

    @property
    def num_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _mine(self) -> range:
        return range(self.rank, self.num_batches, self.world_size)

    @property
    def num_samples(self) -> int:
        return sum(min(self.batch_size, self.n - k * self.batch_size) for k in self._mine())

    def __iter__(self) -> Iterator[list[int]]:
        for k in self._mine():
            yield list(range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self._mine())


class BatchSizes:
    """Iterate ``(inputs, labels, n_bad)`` batches and record how many rows each gave."""

    def __init__(self, batches):
        self.batches, self.sizes = batches, []

    def __iter__(self):
        for batch in self.batches:
            self.sizes.append(len(batch[1]))
            yield batch


# --------------------------------------------------------------------------------------------
# Failures: the child's one line, and the launcher's choice of the root cause


def _one_line(e: BaseException) -> str:
    from visiontune.errors import UserError

    text = str(e).strip()
    # gloo prefixes its messages with a source location: "[.../pair.cc:545] Read error ..."
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    first = text.splitlines()[0] if text else ""
    if isinstance(e, UserError | OSError | PeerFailed):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def is_peer_failure(e: BaseException) -> bool:
    """True when ``e`` says another rank died or stopped answering (not this rank's fault)."""
    if isinstance(e, PeerFailed):
        return True
    dist = _dist()
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out")
    )


def report_failure(e: BaseException, group_rank: int | None = None) -> NoReturn:
    """End a rank of a torchrun job that failed with ``e``: one line, recorded for the launcher.

    The message goes into torchrun's per-worker error file (``TORCHELASTIC_ERROR_FILE``), where
    ``visiontune train --nproc-per-node`` finds it and prints the root cause once. Run under
    plain torchrun, each rank prints its own line. Bugs keep their traceback.
    """
    import traceback

    from visiontune.errors import UserError

    rank = _env_int("RANK", 0) if group_rank is None else group_rank
    peer = is_peer_failure(e)
    if peer:
        message = f"rank {rank} stopped because another rank failed ({_one_line(e)})"
    else:
        message = f"rank {rank}: {_one_line(e)}"
    bug = not peer and not isinstance(e, UserError | OSError)
    if bug:
        traceback.print_exception(e)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump(
                {"message": message, "timestamp": int(time.time()),
                 "visiontune": {"peer": peer, "time": time.time()}},
                f,
            )  # fmt: skip
    if not os.environ.get(LAUNCHED_ENV):
        print(f"error: {message}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    # A broken process group can abort in its destructors; leave without running them.
    os._exit(e.exit_code if isinstance(e, UserError) else 1)


def root_cause(failures: dict[int, Any]) -> str:
    """The one line to show for a failed job, from torchrun's per-rank failures: a rank's own
    error first, then a rank killed by a signal (SIGTERM last: torchrun itself sends it to the
    ranks still running once one has died), then any other exit; ranks that only saw another
    rank fail come last."""

    def rank_of(item) -> tuple[int, float, int]:
        rank, f = item
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        info = data.get("visiontune")
        if info is not None:
            kind = 4 if info.get("peer") else 0
            return kind, float(info.get("time", f.timestamp)), rank
        if f.exitcode < 0:
            return (2 if -f.exitcode == signal.SIGTERM else 1), float(f.timestamp), rank
        return 3, float(f.timestamp), rank

    rank, f = min(failures.items(), key=rank_of)
    data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
    if "visiontune" in data:
        return str(f.message)
    if f.exitcode < 0:
        return f"rank {rank} was killed by {f.signal_name()}"
    return f"rank {rank} exited with code {f.exitcode} (its output is above)"


# --------------------------------------------------------------------------------------------
# The launcher


def launch(
    argv: list[str],
    *,
    nproc_per_node: str,
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "visiontune",
    max_restarts: int = 0,
) -> int:
    """Run ``python -m visiontune *argv`` as a torchrun job; return the exit code.

    One machine: a private rendezvous on localhost. Several: ``rdzv_endpoint`` is HOST:PORT of
    the rendezvous; with ``node_rank`` it is the static one PyTorch calls master_addr/port
    (node 0 runs it), without it torchrun's c10d rendezvous (nodes may join in any order).

    Raises:
        UserError: a bad launcher option (``gpu`` without GPUs, a malformed endpoint).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from visiontune.errors import UserError

    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes),
            "--max-restarts", str(max_restarts)]  # fmt: skip
    if rdzv_endpoint is None:
        if nnodes != "1":
            raise UserError("several machines (--nnodes) need --rdzv-endpoint HOST:PORT")
        args += ["--standalone"]
    elif node_rank is not None:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--rdzv-endpoint must be HOST:PORT, got {rdzv_endpoint!r}")
        args += ["--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    else:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    args += ["-m", "visiontune", *argv]
    try:
        nproc = torchrun.determine_local_world_size(str(nproc_per_node))
    except ValueError as e:
        raise UserError(
            f"--nproc-per-node {nproc_per_node}: {e} (give a number, or gpu on a GPU machine)"
        ) from None
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1; a CPU job is better off sharing the cores out.
        from visiontune.device import available_cores

        os.environ["OMP_NUM_THREADS"] = str(max(1, available_cores() // max(1, nproc)))
    os.environ[LAUNCHED_ENV] = "1"
    quiet = not os.environ.get("VISIONTUNE_DEBUG")
    levels = {}
    notice = _RestartNotice()
    agent_log = logging.getLogger("torch.distributed.elastic.agent.server.api")
    for name in ("torch.distributed.elastic", "torch.distributed.run", agent_log.name):
        levels[name] = logging.getLogger(name).level
    if quiet:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
        agent_log.setLevel(logging.INFO)  # its restart notice, reworded by the filter
        agent_log.addFilter(notice)
    try:
        torchrun.run(torchrun.parse_args(args))
        return 0
    except ChildFailedError as e:
        print(f"error: {root_cause(e.failures)}", file=sys.stderr)
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        return max(codes) if codes else 1
    except SignalException as e:  # rank 0 said where its checkpoint is
        return 128 + int(e.sigval)
    finally:
        agent_log.removeFilter(notice)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        os.environ.pop(LAUNCHED_ENV, None)


class _RestartNotice(logging.Filter):
    """Drop the agent's log lines but say in one line when torchrun restarts the group."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if "attempts left" in str(record.msg) and len(args) == 4:
            print(
                f"a rank failed on {socket.gethostname()}; restarting the group "
                f"({args[2]} of {args[3]} restarts left), resuming from the last checkpoint",
                file=sys.stderr,
            )
        return False
