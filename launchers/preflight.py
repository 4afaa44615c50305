"""Checks a launcher runs before it starts anything (no torch import: well under a second).

    python launchers/preflight.py (--nproc N | --hostfile FILE) [--node-rank K] [--master-addr A]
                                  [--master-port P] [--ssh] RECIPE [section.key=value ...]

- the hostfile parses: every line ``HOST slots=N`` (N >= 1, a trailing ``# comment`` allowed),
  no host twice, at least one host (DeepSpeed itself trains on this machine alone, with a log
  warning, when the hostfile is missing);
- the recipe and overrides load and pass dsvit's own checks for that world size (the batch divides
  world size x grad_accum, the eval batch divides the world size ...); the timm model name is left
  to the ranks (importing timm takes ~10 s);
- the master: MASTER_ADDR resolves; on node 0 (and one node) MASTER_PORT is free here; on node K > 0
  a TCP connect to MASTER_ADDR:MASTER_PORT, only warned about when it fails (node 0 may start later);
- the ssh path: every host resolves (a warning: it may be an ssh alias) and ``.deepspeed_env`` files
  (~ and .) hold only ``VAR=value`` lines (DeepSpeed 0.19.8 crashes on a blank one);
- on GPUs (DS_ACCELERATOR, else ``nvidia-smi -L``), this node has a GPU for each of its ranks.

On success prints shell assignments for the launcher on stdout (WORLD, NODES, LOCAL_SLOTS, PORT);
messages go to stderr. Exit status 2 and one ``error:`` line on a bad input.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # dsvit from this checkout

LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")


class Bad(Exception):
    pass


def say(msg: str) -> None:
    print(f"dsvit launch: {msg}", file=sys.stderr)


def parse_hostfile(path: str) -> dict[str, int]:
    p = Path(path)
    if not p.is_file():
        raise Bad(f"hostfile '{path}' does not exist (DeepSpeed would train on this machine alone)")
    hosts: dict[str, int] = {}
    for i, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            raise Bad(f"hostfile {path}, line {i}: '{line}' is not 'HOST slots=N'")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise Bad(f"hostfile {path}, line {i}: {host} has slots={slots}; give at least 1")
        if host in hosts:
            raise Bad(f"hostfile {path}, line {i}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise Bad(f"hostfile {path} lists no host ('HOST slots=N' lines)")
    return hosts


def check_config(recipe: str, overrides: list[str], world: int, where: str) -> None:
    from dsvit import config as C
    C.check_model_name = lambda name: None   # the ranks check it; importing timm here costs ~10 s
    try:
        cfg = C.load_config(recipe, overrides)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        raise Bad(str(e)) from None
    try:
        C.validate(cfg, world)
    except (C.ConfigError, ValueError) as e:
        raise Bad(f"{where}: {e}") from None
    t = cfg.train
    say(f"recipe {recipe}: global batch {t.batch_size} = {world} rank(s) x "
        f"{t.batch_size // (world * t.grad_accum)} per micro-batch x grad_accum {t.grad_accum}")


def resolve(addr: str, port: int) -> str:
    try:
        return socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        raise Bad(f"MASTER_ADDR '{addr}' does not resolve ({e}); give node 0's address or a name "
                  f"every node resolves") from None


def port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise Bad(f"MASTER_PORT {port} is in use on this machine ({e.strerror}); pick another "
                      f"MASTER_PORT") from None


def is_local(ip: str) -> bool:
    if ipaddress.ip_address(ip).is_loopback:
        return True
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def check_master(addr: str, port: int, node_rank: Optional[int], nodes: int) -> None:
    """``node_rank`` None: the ssh path, started from any machine (only the name is checked)."""
    ip = resolve(addr, port)
    say(f"master {addr} -> {ip}, port {port}")
    if nodes > 1 and ipaddress.ip_address(ip).is_loopback:
        say(f"warning: MASTER_ADDR {addr} is a loopback address: only nodes on this machine reach it")
    if node_rank is None:
        return
    if node_rank == 0:
        if not is_local(ip):
            say(f"warning: node 0 hosts the master, but {ip} is not an address of this machine")
        port_free(port)
        return
    try:
        with socket.create_connection((ip, port), timeout=2):
            say(f"master {ip}:{port} accepts connections")
    except OSError as e:
        say(f"warning: master {ip}:{port} not reachable yet ({e.strerror or e}); fine if node 0 "
            f"has not started, else check MASTER_ADDR, MASTER_PORT and the firewall")


def check_deepspeed_env() -> None:
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in (Path.home(), Path(".")):
        f = folder / name
        if not f.is_file():
            continue
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            if "=" not in line or not line.split("=", 1)[0].strip():
                raise Bad(f"{f}, line {i}: '{line}' is not VAR=value (DeepSpeed's launcher fails on "
                          f"it, blank lines included)")
        say(f"{f} forwards to every node: {', '.join(v.split('=', 1)[0] for v in lines)}")


def gpus() -> int:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``), no torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return out.stdout.count("GPU ") if out.returncode == 0 else 0


def check_accelerator(local: Optional[int]) -> None:
    """cuda or cpu as DeepSpeed picks it (DS_ACCELERATOR, else CUDA when a GPU is present); on
    GPUs each of the ``local`` ranks this node starts must get one (None: not checked here)."""
    count = gpus()
    accel = os.environ.get("DS_ACCELERATOR") or ("cuda" if count else "cpu")
    if accel == "cuda" and local is not None and local > count:
        raise Bad(f"this node starts {local} rank(s) but has {count} GPU(s) visible")
    say(f"accelerator {accel}" + (f", {count} GPU(s) visible" if count else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--nproc", type=int)
    where.add_argument("--hostfile")
    ap.add_argument("--node-rank", type=int)
    ap.add_argument("--master-addr")
    ap.add_argument("--master-port", type=int, default=29500, help="0: pick a free one")
    ap.add_argument("--ssh", action="store_true", help="the launcher ssh-es into the hosts")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        if a.hostfile:
            hosts = parse_hostfile(a.hostfile)
            world, nodes = sum(hosts.values()), len(hosts)
            say(f"hostfile {a.hostfile}: {nodes} node(s), world size {world} "
                f"({', '.join(f'{h}:{n}' for h, n in hosts.items())})")
            if a.node_rank is not None and not 0 <= a.node_rank < nodes:
                raise Bad(f"node rank {a.node_rank} is outside the hostfile's {nodes} node(s) "
                          f"(0..{nodes - 1})")
            local = list(hosts.values())[a.node_rank or 0]
            where_ = f"world size {world} (the hostfile's slots)"
        else:
            if a.nproc is None or a.nproc < 1:
                raise Bad(f"the process count must be an integer >= 1, got {a.nproc}")
            world, nodes, local = a.nproc, 1, a.nproc
            where_ = f"{world} process(es) on this node"
            say(where_)
        if a.master_port == 0 and a.nproc:
            a.master_port = free_port()
        if not 1 <= a.master_port <= 65535:
            raise Bad(f"MASTER_PORT must be 1..65535, got {a.master_port}")
        check_config(a.recipe, a.overrides, world, where_)
        if a.master_addr:
            check_master(a.master_addr, a.master_port, a.node_rank, nodes)
        elif a.nproc:
            port_free(a.master_port)
        if a.ssh:
            for host in hosts:
                try:
                    socket.getaddrinfo(host, None)
                except (socket.gaierror, UnicodeError):
                    say(f"warning: host {host} does not resolve here (fine if it is an ssh alias)")
            check_deepspeed_env()
        check_accelerator(None if a.ssh else local)   # ssh: the ranks run on the other hosts
    except Bad as e:
        say(f"error: {e}")
        return 2
    print(f"WORLD={world} NODES={nodes} LOCAL_SLOTS={local} PORT={a.master_port}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
