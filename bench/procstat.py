"""CPU time and children of a process, read from /proc: the measure the bench scripts share.

cpu_seconds(pid)                  # utime + stime of every thread of the process
cpu_seconds(pid, reaped=True)     # ... plus the children it has waited for
child_pids(pid)                   # its live children (every thread's)
"""

from __future__ import annotations

import os
import signal
import subprocess

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of a process, all its threads, in seconds; with `reaped`, also the CPU of
    the children it has waited for (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime, stime, cutime, cstime: fields 14-17.
    return sum(int(x) for x in fields[11 : 15 if reaped else 13]) / TICK


def child_pids(pid: int) -> list[int]:
    """The live children of a process (those of every thread of it)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server the benchmark started: SIGTERM (a graceful stop), SIGKILL after 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
