"""`softprompt serve --ray` as a user runs it (the Ray Serve replicas themselves are tested
in test_serve_ray.py, in-process): a subprocess on loopback that starts its own local Ray
cluster, answers as the single-process server does, and stops with its cluster on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from bench.harness.load import wait_healthy
from softprompt.base_models import load_base
from softprompt.serve import PromptBank, create_app

from serving import Server, free_port
from test_cli_train import invoke
from test_serve_ray import BASE, REQUESTS, _answer, _same, store  # noqa: F401 (fixture)


def test_serve_ray_from_the_command_line(store, tmp_path):  # noqa: F811
    """`softprompt serve --ray --replicas 2`: a completion equals the one the replicas of
    the Python entry give (same engine), and options for the single-process server only are
    refused by name."""
    model_dir, prompts = store
    r = invoke("serve", "--model", model_dir, "--prompts", prompts, "--ray", "--lazy")
    assert r.exit_code == 1 and "--prompt, --lazy and --max-in-memory are for the single-process" in r.output
    port = free_port()
    log = tmp_path / "serve.log"  # a file, not a pipe: Ray's replica logs would fill a pipe and block the server
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(model_dir),
                                   "--prompts", str(prompts), "--ray", "--replicas", "2", "--port", str(port)],
                                  stdout=out, stderr=out, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, 240, alive=lambda: server.poll() is None)
        except RuntimeError as e:
            raise AssertionError(f"{e}: {log.read_text()[-3000:]}") from None
        body = REQUESTS[0][2]
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        base, tok = load_base(str(model_dir))
        bank = PromptBank.from_directory(base, tok, prompts, lazy=True)
        with Server(create_app(bank)) as single:
            alone = httpx.post(f"{single.url}/v1/completions", json=body, timeout=60)
        _same(_answer(r), _answer(alone))
        models = sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"])
        assert models == sorted(["other", "sentiment", BASE, "writer"])
        deadline = time.time() + 60  # the proxy may answer before `serve.run` has returned and said so
        while "with 2 replica(s) on Ray Serve" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    err = log.read_text()
    assert "with 2 replica(s) on Ray Serve" in err, err[-3000:]
