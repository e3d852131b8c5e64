"""``triform launch [torchrun options] COMMAND [flags]``: PyTorch's own launcher (``torchrun``,
i.e. ``torch.distributed.run`` and its elastic agent) with triform as the module it starts, plus
one sentence, instead of a traceback, for what can go wrong around the ranks: a rendezvous endpoint
that cannot be reached, a rank that exits with an error or is killed.

    triform launch --nproc-per-node 2 train --data corpus.txt --out runs/ddp
    # the same as: torchrun --nproc-per-node 2 -m triform train --data corpus.txt --out runs/ddp
"""

from __future__ import annotations

import socket
import sys
import time

LAUNCHABLE = ("train", "pretrain", "finetune", "train-vision")
DEFAULT_JOIN_TIMEOUT_S = 600.0  # torchrun's own default for joining a rendezvous

USAGE = """usage: triform launch [torchrun options] {train,pretrain,finetune,train-vision} [command flags]

Runs the triform command on every process torchrun starts (see `python -m torch.distributed.run --help`
for the options). One machine, 2 processes:
    triform launch --nproc-per-node 2 train --data corpus.txt --out runs/ddp
Two machines (run on each; the endpoint is the first machine's address):
    triform launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 train ...
"""


def _say(msg: str) -> None:
    print(f"triform launch: error: {msg}", file=sys.stderr)


def _join_timeout(rdzv_conf: str) -> float:
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "join_timeout":
            try:
                return float(value)
            except ValueError:
                return DEFAULT_JOIN_TIMEOUT_S
    return DEFAULT_JOIN_TIMEOUT_S


def _is_local(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1", "", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    if address.startswith("127."):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False


def _reachable(host: str, port: int, timeout_s: float) -> str | None:
    """None once HOST:PORT accepts a TCP connection within ``timeout_s`` (the first node may start
    later than this one), else why not."""
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return reason
        try:
            with socket.create_connection((host, port), timeout=min(5.0, left)):
                return None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _failure_sentence(failures: dict) -> str:
    parts = []
    for rank, f in sorted(failures.items()):  # keyed by global rank
        if f.exitcode is not None and f.exitcode < 0:
            parts.append(f"rank {rank} was killed by {f.signal_name()}")
        else:
            parts.append(f"rank {rank} exited with code {f.exitcode}")
    return "; ".join(parts) + " (each rank's own message is above)."


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    at = next((i for i, a in enumerate(argv) if a in LAUNCHABLE), None)
    if at is None:
        _say(f"give the triform command to run after the torchrun options ({', '.join(LAUNCHABLE)}), "
             "e.g. triform launch --nproc-per-node 2 train --data corpus.txt.")
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "triform launch"

    def error(message: str) -> None:
        _say(f"{message} (see triform launch --help).")
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]
    try:
        args = parser.parse_args([*argv[:at], "-m", "triform", *argv[at:]])
    except SystemExit as exc:
        return int(exc.code or 0)
    endpoint = args.rdzv_endpoint
    if endpoint and args.rdzv_backend != "static" and not getattr(args, "standalone", False):
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "29400")
        host = host.strip("[]")
        if not _is_local(host):
            timeout = _join_timeout(args.rdzv_conf)
            why = _reachable(host, int(port), timeout)
            if why is not None:
                _say(f"cannot reach the rendezvous endpoint {host}:{port} within {timeout:.0f} s ({why}); start "
                     "the first node, check the address and port, or raise --rdzv-conf join_timeout=SECONDS.")
                return 2
    try:
        run(args)
    except ChildFailedError as exc:
        _say(_failure_sentence(exc.failures))
        return 1
    except RendezvousError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _say(f"the rendezvous at {endpoint or 'the default endpoint'} failed: {first}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted.")
        return 130
    return 0
