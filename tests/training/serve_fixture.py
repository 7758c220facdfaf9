"""A tiny served model for the serving tests and benchmark: the Llama fixture (vocabulary 256)
with a tokenizer that maps id 0 to end-of-document, ids 1..96 to newline and printable ASCII
and the rest to one letter each, so any ASCII prompt (and the default chat template) encodes
and every id decodes to exactly one character."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tokenizers import Tokenizer, decoders, models as tok_models

from tests.multirank import REPO_ROOT

LLAMA = REPO_ROOT / "tests" / "fixtures" / "hf" / "llama"
SERVE = str(REPO_ROOT / "training" / "serve.py")
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def write_ascii_tokenizer(path: Path, size: int = 256) -> Path:
    vocab = {"<|endoftext|>": 0}
    for i in range(1, size):
        vocab[CHARS[i - 1] if i <= len(CHARS) else chr(0x100 + i)] = i
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(str(path))
    return path


def make_model_dir(root: Path) -> Path:
    d = root / "tiny"
    shutil.copytree(LLAMA, d)
    write_ascii_tokenizer(d / "tokenizer.json")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class ServerProcess:
    """``training/serve.py`` in a subprocess on a free port; ``url`` = ``http://host:port``."""

    def __init__(self, model_dir: Path, *args: str, log: Path, ready_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "GLOG_v": "3", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, SERVE, str(model_dir), "--port",
                                      str(self.port), *args], cwd=REPO_ROOT, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                if get_json(self.url + "/health")["status"] == "ok":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {ready_timeout} s:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
