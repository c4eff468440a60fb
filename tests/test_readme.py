"""README.md's examples run. Every ```python and ```bash block of README.md is run, each in a folder of its own that
holds only the repository's scripts/ (as a clone would), against a small checkpoint with random weights standing in
for jinaai/jina-embeddings-v4: it sits in an offline hub cache (HF_HOME, HF_HUB_OFFLINE=1), so a block runs as
written and nothing leaves the machine. The rules, which README.md states too:

- `pip install ...` commands are skipped: this environment has the project and its extras installed.
- A line running `jina-v4 serve` is started in the background on 127.0.0.1 with a free port; once GET /health
  answers, the rest of the block runs with 8080 replaced by that port. A block that talks to 127.0.0.1:8080 (or
  localhost:8080) without such a line gets `jina-v4 serve` on the stand-in checkpoint. curl fails on an HTTP error.
- A block whose info string says `norun=REASON`, with REASON one of NORUN, is not run.
A block passes when it exits with status 0 (a Python exception, a failing command or a bad HTTP status fail it).
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from synthetic import DEMO, write_demo_checkpoint

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
NORUN = {
    "install": "changes the environment (CI installs the way it says)",
    "gpu": "needs a GPU",
    "hub": "downloads from the hub or the web",
    "cluster": "needs a Ray cluster or shared storage",
    "long": "minutes of CPU at full width",
    "engine": "needs llama-cpp-python (built from source) or vLLM",
}
HUB_ID = "jinaai/jina-embeddings-v4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVE = re.compile(r"^.*\bjina-v4 serve\b.*$", re.M)
TALKS_TO_SERVER = re.compile(r"(127\.0\.0\.1|localhost):8080")


@dataclass
class Block:
    line: int  # where its fence opens in README.md
    lang: str
    info: str  # the rest of the info string
    code: str

    @property
    def norun(self) -> str | None:
        found = re.search(r"\bnorun=(\S+)", self.info)
        return found.group(1) if found else None

    @property
    def server(self) -> bool:
        return bool(SERVE.search(self.code) or TALKS_TO_SERVER.search(self.code))


def blocks(text: str) -> list[Block]:
    """The fenced ```python and ```bash blocks of a Markdown text."""
    out = []
    for m in re.finditer(r"^```(\w*)([^\n]*)\n(.*?)^```\s*$", text, re.M | re.S):
        if m.group(1) in ("python", "bash"):
            out.append(Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2).strip(), m.group(3)))
    return out


BLOCKS = blocks(README.read_text(encoding="utf-8"))
SLOW = re.compile(r"--ray\b|\bimport ray\b|train_adapter|jina-v4 mteb\b")  # mteb: processes importing MTEB


def params():
    for b in BLOCKS:
        marks = [pytest.mark.slow] if b.server or SLOW.search(b.code) else []
        if b.norun:
            marks.append(pytest.mark.skip(reason=f"README.md:{b.line}: norun={b.norun}"))
        yield pytest.param(b, id=f"line{b.line}-{b.lang}", marks=marks)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds the stand-in checkpoint under jinaai/jina-embeddings-v4, as the hub lays it out."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    write_demo_checkpoint(repo / "snapshots" / COMMIT, DEMO)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def environment(hub: Path, folder: Path) -> dict:
    (folder / ".curlrc").write_text("fail\n")  # curl: an HTTP error status is a failure
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "RAY_ADDRESS"))}
    return {
        **env,
        "HF_HOME": str(hub),
        "HF_HUB_OFFLINE": "1",
        "CURL_HOME": str(folder),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }


def prepare(code: str) -> str:
    """pip install commands become no-ops."""
    return re.sub(r"\b(python3? -m )?pip3? install\b[^\n&;|]*[^\s&;|]", "true", code)


def start_server(command: str, folder: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """`jina-v4 serve ...` in the background on 127.0.0.1 and a free port: (the process, the port), once it answers
    GET /health. Waits for those events, with a bound only against a hang."""
    command = re.sub(r"\s+#.*$", "", command).rstrip(" &")
    log = folder / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {command} --host 127.0.0.1 --port 0"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline, port = time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            port = int(found.group(1))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                    if r.status == 200:
                        return proc, port
            except OSError:
                pass
        time.sleep(0.1)
    stop(proc)
    raise AssertionError(f"`{command}` did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("block", list(params()))
def test_readme_example(block: Block, hub, tmp_path):
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "scripts").symlink_to(ROOT / "scripts")
    env = environment(hub, folder)
    code, server = prepare(block.code), None
    if block.server:
        line = SERVE.search(code)
        command = line.group(0)[line.group(0).index("jina-v4 serve") :] if line else f"jina-v4 serve --model {HUB_ID}"
        code = code.replace(line.group(0), "true") if line else code
        server, port = start_server(command, folder, env)
        code = code.replace("8080", str(port))
    script = folder / ("example.py" if block.lang == "python" else "example.sh")
    script.write_text(code)
    cmd = [sys.executable, script.name] if block.lang == "python" else ["bash", "-e", "-o", "pipefail", script.name]
    try:
        out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if server is not None:
            stop(server)
    assert out.returncode == 0, (
        f"README.md:{block.line} failed:\n{code}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    )


def test_the_rules_cover_every_block():
    """Each block runs or says why not with a known reason; the kinds the rules handle are all there."""
    assert BLOCKS, "no examples found in README.md"
    for b in BLOCKS:
        assert b.norun is None or b.norun in NORUN, f"README.md:{b.line}: norun={b.norun} is not one of {sorted(NORUN)}"
    run = [b for b in BLOCKS if not b.norun]
    assert {b.lang for b in run} == {"python", "bash"} and any(b.server for b in run)


def test_the_extractor_and_the_rules(tmp_path):
    """The parser and the rewriting, on a sample: fences with info strings, pip lines, the serve line."""
    sample = (
        "text\n```bash\necho one\n```\n```python norun=gpu\nx = 1\n```\n```text\nnot code\n```\n"
        '```bash\npip install -e ".[serve]" && jina-v4 serve --port 8080  # a comment\ncurl http://127.0.0.1:8080/\n```\n'
    )
    found = blocks(sample)
    assert [(b.line, b.lang, b.norun, b.server) for b in found] == [
        (2, "bash", None, False),
        (5, "python", "gpu", False),
        (11, "bash", None, True),
    ]
    assert prepare(found[2].code).startswith("true && jina-v4 serve --port 8080")
