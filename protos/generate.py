"""Generate the Python stubs of protos/rlhf/v1 into rlhf/v1: the one command.

    python protos/generate.py            # write the stubs
    python protos/generate.py --check    # exit 1 when the committed stubs are stale
"""
import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = pathlib.Path("rlhf") / "v1"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((PROTOS / PACKAGE).glob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    bindir = pathlib.Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in (out / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp))
        committed = sorted(p.relative_to(ROOT) for p in (ROOT / PACKAGE).glob("*_pb2*"))
        if args.check:
            stale = [str(f) for f in files if not (ROOT / f).exists() or not filecmp.cmp(ROOT / f, pathlib.Path(tmp) / f, shallow=False)]
            stale += [str(f) for f in committed if f not in files]
            if stale:
                print("stale generated stubs (run python protos/generate.py):", *stale, sep="\n  ")
                return 1
            print(f"{len(files)} generated stubs are fresh")
            return 0
        for f in committed:
            (ROOT / f).unlink()
        for f in files:
            shutil.copyfile(pathlib.Path(tmp) / f, ROOT / f)
        print(f"wrote {len(files)} files to {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
