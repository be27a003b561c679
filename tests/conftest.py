"""Shared fixtures: tiny models built locally once per session, free ports.

Slow end-to-end tests are deselected unless --run-slow (CI passes it)."""
from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    slow = [i for i in items if "slow" in i.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if "slow" not in i.keywords]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_policy_dir(models_root) -> pathlib.Path:
    from services.demo.tiny_model import build_model
    return build_model("policy", models_root / "policy", seed=0)


@pytest.fixture(scope="session")
def tiny_reward_dir(models_root) -> pathlib.Path:
    from services.demo.tiny_model import build_model
    return build_model("reward", models_root / "reward", seed=0)


@pytest.fixture
def free_port():
    from services.demo.launch import free_port as pick
    return pick


def _make_certs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """A CA with a server and a client certificate, and a second CA with its own client."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, pathlib.Path] = {}

    def write(name: str, key, cert) -> None:
        files[f"{name}_key"] = root / f"{name}.key"
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{name}_cert"] = root / f"{name}.crt"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, issuer_key=None, issuer_name=None, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        write(name, key, cert)
        return key, subject

    ca_key, ca_name = issue("ca", ca=True)
    issue("server", ca_key, ca_name, server=True)
    issue("client", ca_key, ca_name)
    other_key, other_name = issue("other_ca", ca=True)
    issue("other_client", other_key, other_name)
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    return _make_certs(tmp_path_factory.mktemp("tls"))


def _postgres_bindir() -> pathlib.Path | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian's layout, newest last
    if found:
        return pathlib.Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return pathlib.Path(on_path).parent if on_path else None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of its own in a temp dir, on a free loopback port, for the session:
    yields a function that creates a fresh database and returns its URL. PostgreSQL refuses to
    run as root, so as root it runs as the `postgres` user (Debian's package creates it) or
    `nobody`. Skipped, saying why, only where PostgreSQL is not installed."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    from services.demo.launch import free_port as pick

    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/install does): the "
                    "PostgreSQL half of the storage tests cannot run")
    user = None
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None:
            pytest.skip("running as root and no user to run PostgreSQL as (postgres or nobody)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-pg-"))  # not under pytest's 0700 root-owned dirs
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if user:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = pick()
    run = lambda *argv, **kw: subprocess.run([str(bindir / argv[0]), *argv[1:]], check=True, user=user,  # noqa: E731
                                             capture_output=True, timeout=120, cwd=root, **kw)
    run("initdb", "-D", str(data), "-U", "rlhf", "--auth=trust", "-E", "UTF8", "--no-sync")
    run("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
        "-o", f"-p {port} -h 127.0.0.1 -k {sockets} -c fsync=off -c full_page_writes=off")
    base = f"postgresql://rlhf@127.0.0.1:{port}"
    count = 0

    def new_database() -> str:
        import psycopg

        nonlocal count
        count += 1
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE test_{count}")
        return f"{base}/test_{count}"

    try:
        yield new_database
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user=user,
                       capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_db(request, tmp_path) -> str:
    """A fresh, empty feedback database URL: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres_server")()
