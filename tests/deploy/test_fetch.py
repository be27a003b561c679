"""Getting models in: the prepare stage's fetch script and wait step, run here.

deploy/k8s/prepare/fetch/fetch_model.py is what Job rlhf-fetch runs (from a
ConfigMap); it is run here as that Job runs it, against local folders, a local
HTTP server and, for the Hugging Face hub and S3 (offline here), against
stand-ins for the `hf` and `aws` commands that record how they were called and
copy from a local folder. The wait step of the SFT and reward-model Jobs is
the shell script in the rendered manifest, run with sh.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from rendered import K8S, command, one, pod, render, volumes_of

SCRIPT = K8S / "prepare" / "fetch" / "fetch_model.py"
SOURCES = K8S / "prepare" / "fetch" / "sources.txt"


def fetch(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def model_dir(path: pathlib.Path, marker: str = "a") -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"marker": marker}))
    (path / "model.safetensors").write_bytes(os.urandom(3 << 20))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return path


def same_tree(a: pathlib.Path, b: pathlib.Path) -> bool:
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


def leftovers(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.rglob(".*.fetch-*")]


@contextlib.contextmanager
def http_server(root: pathlib.Path, truncate: set[str] = frozenset()):
    """A local HTTP server of `root`; paths in `truncate` promise more bytes than they send."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.lstrip("/") in truncate:
                self.send_response(200)
                self.send_header("Content-Length", str(10 << 20))
                self.end_headers()
                self.wfile.write(b"x" * (1 << 20))
                return  # the connection closes 9 MiB short
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the script


def test_the_job_runs_this_script_with_this_list():
    """What the tests below run is what the Job runs: the ConfigMap holds these
    very files, mounted where the command line names them, and the list's DESTs
    land on the models volume, mounted writable."""
    for hardware in ("gpu", "cpu"):
        docs = render(f"overlays/{hardware}/prepare")
        p = pod(docs, "rlhf-fetch")
        assert command(p.main, p).kind == "script"
        script, args = p.main["command"][1], dict(a.removeprefix("--").split("=", 1) for a in p.main["args"])
        mounts = {m["mountPath"]: m for m in p.main["volumeMounts"]}
        cm = volumes_of(p.spec)[mounts[str(pathlib.PurePosixPath(script).parent)]["name"]]["configMap"]["name"]
        data = one(docs, "ConfigMap", cm)["data"]
        assert data[pathlib.PurePosixPath(script).name] == SCRIPT.read_text()
        assert data[pathlib.PurePosixPath(args["list"]).name] == SOURCES.read_text()
        root = mounts[args["root"]]
        assert not root.get("readOnly")
        assert volumes_of(p.spec)[root["name"]]["persistentVolumeClaim"]["claimName"] == "rlhf-models"
        # The images run offline; this pod alone goes out.
        assert {e["name"]: e["value"] for e in p.main["env"]}["HF_HUB_OFFLINE"] == "0"


def test_copies_folders_and_files_from_mounted_paths(tmp_path):
    src = model_dir(tmp_path / "src" / "model")
    (tmp_path / "src" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    root = tmp_path / "models"
    listing = tmp_path / "sources.txt"
    listing.write_text(f"# comment line\n\nsft   file://{src}\ndata/prompts.jsonl   {tmp_path}/src/prompts.jsonl  # a file\n")
    out = fetch("--list", listing, "--root", root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert same_tree(src, root / "sft")
    assert (root / "data" / "prompts.jsonl").read_text() == '{"prompt": "hi"}\n'
    assert not leftovers(root)


def test_keeps_what_is_there_and_says_so(tmp_path):
    root = tmp_path / "models"
    model_dir(root / "sft", marker="mine")
    out = fetch(f"file://{model_dir(tmp_path / 'other', marker='theirs')}", root / "sft")
    assert out.returncode == 0
    assert json.loads((root / "sft" / "config.json").read_text())["marker"] == "mine"
    assert "there already: kept" in out.stdout


def test_downloads_files_and_unpacks_archives_over_http(tmp_path):
    served = tmp_path / "served"
    src = model_dir(tmp_path / "build" / "reward-model")
    served.mkdir()
    with tarfile.open(served / "reward.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="reward-model")  # one top folder: its contents become DEST
    with tarfile.open(served / "flat.tar", "w") as tar:
        for f in src.iterdir():
            tar.add(f, arcname=f.name)
    (served / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    root = tmp_path / "models"
    with http_server(served) as url:
        listing = tmp_path / "sources.txt"
        listing.write_text(f"reward {url}/reward.tar.gz\nbase {url}/flat.tar\ndata/prefs.jsonl {url}/prefs.jsonl?X-Amz-Signature=abc\n")
        out = fetch("--list", listing, "--root", root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert same_tree(src, root / "reward") and same_tree(src, root / "base")
    assert (root / "data" / "prefs.jsonl").read_text().startswith('{"prompt"')
    assert not leftovers(root)


def test_an_archive_cannot_write_outside_its_destination(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with http_server(served) as url:
        out = fetch(f"{url}/evil.tar", tmp_path / "models" / "x")
    assert out.returncode == 2 and "unsafe archive" in out.stdout, out.stdout + out.stderr
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "models" / "x").exists()


def test_a_cut_download_leaves_nothing_that_looks_finished(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    root = tmp_path / "models"
    with http_server(served, truncate={"big.tar.gz"}) as url:
        out = fetch(f"{url}/big.tar.gz", root / "sft")
    assert out.returncode == 1, out.stdout + out.stderr  # worth a retry
    assert not (root / "sft").exists() and not leftovers(root)


def test_what_a_killed_attempt_left_is_cleared(tmp_path):
    root = tmp_path / "models"
    stale = model_dir(root / ".sft.fetch-oldpod-12")
    src = model_dir(tmp_path / "src")
    out = fetch(src, root / "sft")
    assert out.returncode == 0
    assert not stale.exists() and same_tree(src, root / "sft")


@pytest.mark.parametrize("line, message", [
    ("sft gs://bucket/model", "unknown source"),
    ("sft", "expected `DEST SOURCE`"),
    ("/etc/passwd file:///x", "inside the models volume"),
    ("../up file:///x", "inside the models volume"),
    ("sft hf://only-one-part", "expected hf://"),
])
def test_a_bad_list_fails_with_exit_2_before_any_download(tmp_path, line, message):
    src = model_dir(tmp_path / "src")
    listing = tmp_path / "sources.txt"
    listing.write_text(f"first file://{src}\n{line}\n")
    out = fetch("--list", listing, "--root", tmp_path / "models")
    assert out.returncode == 2 and message in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "models" / "first").exists(), "a bad line must stop the run before it copies anything"


def test_the_shipped_list_is_refused_until_it_is_edited(tmp_path):
    out = fetch("--list", SOURCES, "--root", tmp_path)
    assert out.returncode == 2 and "lists nothing" in out.stdout


def test_a_missing_source_or_http_404_is_not_retried(tmp_path):
    out = fetch(f"file://{tmp_path}/nope", tmp_path / "models" / "sft")
    assert out.returncode == 2 and "no such file" in out.stdout
    with http_server(tmp_path) as url:
        out = fetch(f"{url}/missing.tar.gz", tmp_path / "models" / "sft")
    assert out.returncode == 2 and "HTTP 404" in out.stdout


# ---------------------------------------------------------------- hub and S3, through their CLIs


def stand_in(bin_dir: pathlib.Path, name: str, body: str) -> pathlib.Path:
    """An executable `name` that logs its argv (JSON, one call a line) and runs `body` (Python)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport json, os, pathlib, shutil, sys\n"
                    f"with open(os.environ['STAND_IN_LOG'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def calls(log: pathlib.Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def hub(tmp_path):
    """`hf download REPO [FILE] ... --local-dir DIR` copying from a local folder of repositories."""
    repos = tmp_path / "hub"
    model_dir(repos / "acme" / "tiny-sft")
    (repos / "acme" / "prefs" / "data").mkdir(parents=True)
    (repos / "acme" / "prefs" / "data" / "train.jsonl").write_text('{"prompt": "p"}\n')
    stand_in(tmp_path / "bin", "hf", f"""
args = sys.argv[1:]
assert args[0] == "download"
repo, rest = args[1], args[2:]
local = pathlib.Path(rest[rest.index("--local-dir") + 1])
files = [a for a in rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]
src = pathlib.Path({str(repos)!r}) / repo
if files:
    for f in files:
        (local / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f, local / f)
else:
    shutil.copytree(src, local, dirs_exist_ok=True)
(local / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as hf does
""")
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        "STAND_IN_LOG": str(tmp_path / "calls.log")}
    return repos, env, tmp_path / "calls.log"


def test_hub_models_and_dataset_files_go_through_hf_download(tmp_path, hub):
    repos, env, log = hub
    root = tmp_path / "models"
    listing = tmp_path / "sources.txt"
    listing.write_text("sft hf://acme/tiny-sft@v1.0\ndata/prefs.jsonl hf://datasets/acme/prefs/data/train.jsonl\n")
    out = fetch("--list", listing, "--root", root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    model, dataset = calls(log)
    assert model[:2] == ["download", "acme/tiny-sft"] and model[model.index("--revision") + 1] == "v1.0"
    assert model[model.index("--repo-type") + 1] == "model"
    assert dataset[:3] == ["download", "acme/prefs", "data/train.jsonl"]
    assert dataset[dataset.index("--repo-type") + 1] == "dataset" and "--revision" not in dataset
    assert same_tree(repos / "acme" / "tiny-sft", root / "sft"), "hf's .cache bookkeeping must not stay"
    assert (root / "data" / "prefs.jsonl").read_text() == '{"prompt": "p"}\n'


def test_the_flags_passed_to_hf_are_the_real_clis():
    hf = shutil.which("hf") or str(pathlib.Path(sys.executable).with_name("hf"))
    if not pathlib.Path(hf).exists():
        pytest.fail("the Hugging Face hub's `hf` command is not installed (huggingface_hub >= 0.34)")
    out = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--repo-type", "--revision", "--local-dir"):
        assert flag in out.stdout, f"`hf download` has no {flag}"


def test_a_missing_cli_is_a_clear_error(tmp_path):
    env = os.environ | {"PATH": str(tmp_path)}  # neither hf nor aws
    out = fetch("s3://bucket/models/x/", tmp_path / "models" / "x", env=env)
    assert out.returncode == 2 and "`aws` is not installed" in out.stdout


def test_s3_prefixes_and_objects_go_through_the_aws_cli(tmp_path):
    bucket = tmp_path / "bucket"
    model_dir(bucket / "models" / "rm")
    (bucket / "data").mkdir()
    (bucket / "data" / "prompts.jsonl").write_text('{"prompt": "q"}\n')
    stand_in(tmp_path / "bin", "aws", f"""
args = [a for a in sys.argv[1:] if a not in ("--only-show-errors",)]
assert args[:2] == ["s3", "cp"]
recursive = "--recursive" in args
src, dst = [a for a in args[2:] if a != "--recursive"]
src = pathlib.Path({str(bucket)!r}) / src.removeprefix("s3://bucket/")
(shutil.copytree(src, dst) if recursive else shutil.copy(src, dst))
""")
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        "STAND_IN_LOG": str(tmp_path / "calls.log")}
    root = tmp_path / "models"
    listing = tmp_path / "sources.txt"
    listing.write_text("reward s3://bucket/models/rm/\ndata/prompts.jsonl s3://bucket/data/prompts.jsonl\n")
    out = fetch("--list", listing, "--root", root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    prefix, obj = calls(tmp_path / "calls.log")
    assert "--recursive" in prefix and "--recursive" not in obj
    assert same_tree(bucket / "models" / "rm", root / "reward")
    assert (root / "data" / "prompts.jsonl").read_text() == '{"prompt": "q"}\n'


# ---------------------------------------------------------------- the training Jobs' wait step


@functools.cache
def wait_step(job: str) -> dict:
    p = pod(render("overlays/cpu/prepare"), job)
    return next(c for c in p.spec["initContainers"] if c["name"] == "wait-for-inputs")


def run_wait(job: str, paths: list[pathlib.Path], script_edit=lambda s: s, timeout=60):
    c = wait_step(job)
    assert c["command"][:2] == ["sh", "-c"]
    cmd = ["sh", "-c", script_edit(c["command"][2]), *c["command"][3:], *map(str, paths)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("job", ["rlhf-sft", "rlhf-rm"])
def test_the_wait_step_passes_when_the_inputs_are_there(tmp_path, job):
    a, b = model_dir(tmp_path / "base"), tmp_path / "data.jsonl"
    b.write_text("{}\n")
    proc = run_wait(job, [a, b])
    assert proc.wait(timeout=30) == 0, proc.stdout.read()


def test_the_wait_step_waits_for_an_input_that_appears_later(tmp_path):
    later = tmp_path / "data.jsonl"
    proc = run_wait("rlhf-sft", [model_dir(tmp_path / "base"), later])
    time.sleep(2)
    assert proc.poll() is None, "it must wait, not fail, while the fetch Job is still copying"
    later.write_text("{}\n")
    assert proc.wait(timeout=30) == 0
    assert f"waiting for {later}" in proc.stdout.read()


def test_the_wait_step_gives_up_with_exit_2(tmp_path):
    # The six-hour limit, shortened to none: a missing input is a list that lacks it (FailJob).
    script = wait_step("rlhf-rm")["command"][2]
    assert "21600" in script
    proc = run_wait("rlhf-rm", [tmp_path / "never"], script_edit=lambda s: s.replace("21600", "0"))
    assert proc.wait(timeout=30) == 2
    assert "is it in sources.txt" in proc.stdout.read()
