"""The server under measurement: a free port, waiting for /health, a Prometheus metric
(`metric`; with labels, `labelled`), nearest-rank percentiles, `softprompt serve`
started in a subprocess for a benchmark (`serving`), its output in a log file, and the CPU
time each of its threads has used (`thread_cpu`)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url`/health until it answers 200; RuntimeError if `alive()` turns false first
    (the server process exited) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            raise RuntimeError("the server exited before it answered /health")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
        time.sleep(0.2)


def metric(text: str, name: str) -> float | None:
    """The value of Prometheus metric `name` (a line ``name value``) in a /metrics `text`."""
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else None


def labelled(text: str, name: str) -> dict[tuple[str, ...], float]:
    """Every sample of Prometheus metric `name` with labels (lines ``name{a="x",b="y"} value``)
    in a /metrics `text`, by its label values in their order (``("x", "y")``)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            out[tuple(re.findall(r'="((?:[^"\\]|\\.)*)"', labels))] = float(value)
    return out


def event_loop() -> str:
    """The event loop `softprompt serve` runs on in this environment: uvicorn's ``loop="auto"``
    takes uvloop where it is installed (the ``serve`` extra has it), else asyncio's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        return "asyncio"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of process `pid` has used so far, summed by
    thread name (Linux: /proc/PID/task/TID/stat; {} elsewhere). The engine's worker is
    ``softprompt-batc`` (names are cut to 15 characters), the event loop the process's
    main thread (named after the program); the others are PyTorch's, CUDA's and the
    tokenizer's pools. Two readings around a phase give each thread's cores in use: where
    the event loop's and the worker's sum reaches 1, the two Python threads hold the GIL
    in turn all the time, and they, not the GPU, set the pace."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return {}
    main = (tasks.parent / "comm").read_text().strip()
    used: dict[str, float] = {}
    for task in tasks.iterdir():
        try:
            name, seconds = _stat(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        name = "event loop" if task.name == str(pid) else ("batcher" if name.startswith("softprompt-batc") else name)
        if name == main:
            name = f"{main} (other)"
        used[name] = used.get(name, 0.0) + seconds
    return used


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds (user + system) of process `pid`, or of its thread `thread` (/proc)."""
    return _stat(Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"))[1]


def _stat(path: Path) -> tuple[str, float]:
    """(name, CPU seconds: user + system) of a process or thread from its /proc stat file."""
    stat = path.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


@contextmanager
def serving(model: str, prompts: str, options: list[str], log_path: Path,
            timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """`softprompt serve --model MODEL --prompts PROMPTS OPTIONS` on a free loopback port,
    its output in `log_path` (a file, not a pipe: a chatty server cannot block on a full
    pipe); yields (its URL, its process) once /health answers, and stops it after.

    Raises:
        SystemExit: the server did not start (the tail of its log in the message).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", model, "--prompts",
                                   prompts, "--port", str(port), *options],
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            try:
                wait_healthy(url, timeout, alive=lambda: server.poll() is None)
            except RuntimeError as e:
                raise SystemExit(f"the server did not start ({e}); its log, {log_path}:\n"
                                 f"{log_path.read_text()[-3000:]}") from None
            yield url, server
        finally:
            server.terminate()
            server.communicate(timeout=60)
