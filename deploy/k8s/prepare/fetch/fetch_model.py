"""Copy models and data into the models volume: the fetch step of the prepare stage.

    python fetch_model.py SOURCE DEST
    python fetch_model.py --list sources.txt --root /models

SOURCE is one of
    hf://ORG/NAME[@REVISION]                     a model repository on the Hugging Face hub (`hf download`)
    hf://datasets/ORG/NAME[@REVISION][/PATH]     a dataset repository, or one file in it
    s3://BUCKET/PREFIX/                          everything under a prefix (`aws s3 cp --recursive`);
    s3://BUCKET/KEY                              one object; S3-compatible stores through AWS_ENDPOINT_URL
    https://HOST/PATH (or http://)               one file; a .tar, .tar.gz or .tgz archive is unpacked
                                                 into DEST (an archive of one folder: that folder's
                                                 contents); presigned S3/GCS URLs work as they are
    file:///PATH or /PATH                        a file or a directory on a mounted volume

A list file holds one `DEST SOURCE` pair a line (DEST relative to --root; `#` starts a comment).

Each copy is made in a hidden sibling of DEST and renamed into place once complete, so DEST
is there whole or not at all: a reader waiting for DEST never sees half a model, and a copy
cut short leaves nothing that looks finished. An existing DEST is kept as it is: delete it
to fetch again. Exit codes: 0 done; 1 a copy failed (a retry may help); 2 a bad list, source
or missing tool (a retry will not).

Only the standard library and the `hf` / `aws` commands: it runs in the trainer image.
"""
from __future__ import annotations

import argparse
import http.client
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

ARCHIVES = (".tar", ".tar.gz", ".tgz")
PROGRESS_BYTES = 256 << 20


class BadSource(Exception):
    """A mistake in the list or the source: retrying will not fix it (exit 2)."""


def log(msg: str) -> None:
    print(f"fetch: {msg}", flush=True)


def remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run(cmd: list[str]) -> None:
    if shutil.which(cmd[0]) is None:
        raise BadSource(f"`{cmd[0]}` is not installed in this image")
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def hub_repo(source: str) -> tuple[str, str, str, str]:
    """hf://[datasets/|spaces/]ORG/NAME[@REV][/PATH] -> (repo type, ORG/NAME, REV, PATH)."""
    parts = source.removeprefix("hf://").split("/")
    kind = parts.pop(0).removesuffix("s") if parts[0] in ("datasets", "spaces") else "model"
    if len(parts) < 2 or not all(parts[:2]):
        raise BadSource(f"{source}: expected hf://[datasets/]ORG/NAME[@REVISION][/PATH]")
    name, _, revision = parts[1].partition("@")
    return kind, f"{parts[0]}/{name}", revision, "/".join(parts[2:])


def from_hub(source: str, tmp: pathlib.Path) -> pathlib.Path:
    kind, repo, revision, path_in_repo = hub_repo(source)
    cmd = ["hf", "download", repo] + ([path_in_repo] if path_in_repo else []) + ["--repo-type", kind]
    cmd += (["--revision", revision] if revision else []) + ["--local-dir", str(tmp)]
    run(cmd)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # hf's download bookkeeping
    return tmp / path_in_repo if path_in_repo else tmp


def from_s3(source: str, tmp: pathlib.Path) -> pathlib.Path:
    if source.endswith("/"):
        run(["aws", "s3", "cp", "--recursive", "--only-show-errors", source, str(tmp)])
        return tmp
    tmp.mkdir()
    out = tmp / source.rsplit("/", 1)[-1]
    run(["aws", "s3", "cp", "--only-show-errors", source, str(out)])
    return out


def from_http(source: str, tmp: pathlib.Path) -> pathlib.Path:
    tmp.mkdir()
    name = pathlib.PurePosixPath(urllib.parse.urlparse(source).path).name or "download"
    out, done = tmp / name, 0
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(out, "wb") as f:
            total, shown = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if done - shown >= PROGRESS_BYTES:
                    shown = done
                    log(f"{name}: {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else ""))
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise BadSource(f"{source}: HTTP {e.code} {e.reason}") from e
        raise
    except http.client.HTTPException as e:  # e.g. the connection closed before Content-Length bytes
        raise OSError(f"{source}: download cut short after {done >> 20} MiB ({e!r})") from e
    if not name.endswith(ARCHIVES):
        return out
    unpacked = tmp / "unpacked"
    with tarfile.open(out) as archive:
        try:
            archive.extractall(unpacked, filter="data")  # no absolute paths, links out, devices
        except tarfile.FilterError as e:
            raise BadSource(f"{source}: unsafe archive: {e}") from e
    out.unlink()
    inside = list(unpacked.iterdir())
    return inside[0] if len(inside) == 1 and inside[0].is_dir() else unpacked


def from_path(source: str, tmp: pathlib.Path) -> pathlib.Path:
    src = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(source).path) if source.startswith("file:") else source)
    if not src.exists():
        raise BadSource(f"{source}: no such file or directory")
    if src.is_dir():
        shutil.copytree(src, tmp, symlinks=False)
        return tmp
    tmp.mkdir()
    return pathlib.Path(shutil.copy2(src, tmp / src.name))


def fetcher(source: str):
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "hf":
        hub_repo(source)
        return from_hub
    if scheme == "s3":
        return from_s3
    if scheme in ("http", "https"):
        return from_http
    if scheme == "file" or source.startswith("/"):
        return from_path
    raise BadSource(f"{source}: unknown source; use hf://, s3://, https://, file:// or an absolute path")


def fetch(source: str, dest: pathlib.Path) -> bool:
    """Copy source to dest unless dest exists; True if it copied."""
    get = fetcher(source)
    if dest.exists():
        log(f"{dest} is there already: kept (delete it to fetch {source} again)")
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.fetch-"
    # One fetcher at a time (the Job replaces a pod only once it has stopped):
    # what an earlier, killed attempt left behind can go.
    for stale in dest.parent.glob(prefix + "*"):
        remove(stale)
    tmp = dest.parent / f"{prefix}{socket.gethostname()}-{os.getpid()}"
    start = time.monotonic()
    try:
        got = get(source, tmp)
        if not got.exists():
            raise BadSource(f"{source}: the download holds no {got.relative_to(tmp)}")
        os.rename(got, dest)  # the whole copy appears at once (a folder: refused if dest appeared meanwhile)
    finally:
        remove(tmp)
    log(f"{source} -> {dest} in {time.monotonic() - start:.0f} s")
    return True


def read_list(path: pathlib.Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise BadSource(f"{path}:{number}: expected `DEST SOURCE`, got {line.strip()!r}")
        dest, source = fields
        if dest.startswith("/") or ".." in pathlib.PurePosixPath(dest).parts:
            raise BadSource(f"{path}:{number}: DEST {dest!r} must be a path inside the models volume")
        fetcher(source)  # every source is checked before the first download starts
        pairs.append((dest, source))
    if not pairs:
        raise BadSource(f"{path} lists nothing to fetch: add `DEST SOURCE` lines")
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="where to copy from (see above)")
    p.add_argument("dest", nargs="?", help="where to put it")
    p.add_argument("--list", type=pathlib.Path, help="a file of `DEST SOURCE` lines")
    p.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/models"),
                   help="what DEST in --list is relative to (default /models)")
    args = p.parse_args(argv)
    if bool(args.list) == bool(args.source and args.dest):
        p.error("give SOURCE DEST, or --list FILE")
    try:
        pairs = read_list(args.list) if args.list else [(args.dest, args.source)]
        for dest, source in pairs:
            fetch(source, args.root / dest if args.list else pathlib.Path(dest))
    except BadSource as e:
        log(f"error: {e}")
        return 2
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:  # URLError is an OSError
        log(f"failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
