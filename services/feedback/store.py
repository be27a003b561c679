"""Where judgments last: a SQLAlchemy database, SQLite (a file) by default, PostgreSQL on a
cluster. The core of the feedback service: it knows no transport.

Four tables (the schema is the Alembic migrations' in services/feedback/migrations):

    labellers   a person (or a program) with a token; only its SHA-256 is stored
    sessions    a browser's log-in: the cookie's SHA-256, its CSRF token, when it expires
    pairs       a prompt, two answers of the live policy (weight version, sampling settings), the
                reward model's score of each and its version at the time the pair was made
    judgments   who was shown which pair when, and what they chose (first, second, tie, skip);
                one row per (pair, labeller): the row is written when the pair is shown and
                completed by the choice, so a choice can only answer a pair that was shown

Tokens are 256 random bits, so an unsalted SHA-256 is enough to make a stolen database useless
for logging in (a salt or a slow hash guards guessable secrets like passwords; these are not).

Every method is synchronous (SQLAlchemy's ORM); the HTTP front end calls them off its event loop.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import pathlib
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from services.feedback import rules

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
TOKEN_BYTES = 32


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


# ---- the schema (what the ORM maps; the migrations create it) ------------------------------

class Base(orm.DeclarativeBase):
    type_annotation_map = {dt.datetime: sa.DateTime(timezone=True), dict: sa.JSON, Any: sa.JSON}


class Labeller(Base):
    __tablename__ = "labellers"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100), unique=True)
    token_hash: orm.Mapped[str] = orm.mapped_column(sa.String(64), unique=True)
    active: orm.Mapped[bool] = orm.mapped_column(default=True)
    created_at: orm.Mapped[dt.datetime]


class Session(Base):
    __tablename__ = "sessions"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    cookie_hash: orm.Mapped[str] = orm.mapped_column(sa.String(64), unique=True)
    labeller_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("labellers.id", ondelete="CASCADE"))
    csrf_token: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    created_at: orm.Mapped[dt.datetime]
    expires_at: orm.Mapped[dt.datetime] = orm.mapped_column(index=True)


class Pair(Base):
    __tablename__ = "pairs"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    prompt: orm.Mapped[Any]  # a string, or a conversation: a list of {"role", "content"}
    first: orm.Mapped[str] = orm.mapped_column(sa.Text)
    second: orm.Mapped[str] = orm.mapped_column(sa.Text)
    policy_version: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, index=True)
    sampling: orm.Mapped[dict]  # temperature, top_p, max_tokens, ... as sent to the policy
    first_finish: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    second_finish: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    rm_score_first: orm.Mapped[float | None]
    rm_score_second: orm.Mapped[float | None]
    rm_version: orm.Mapped[str | None] = orm.mapped_column(sa.String(200))
    created_at: orm.Mapped[dt.datetime] = orm.mapped_column(index=True)


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (sa.UniqueConstraint("pair_id", "labeller_id", name="uq_judgments_pair_labeller"),
                      sa.Index("ix_judgments_labeller_judged", "labeller_id", "judged_at"))
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    pair_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    labeller_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("labellers.id", ondelete="CASCADE"))
    choice: orm.Mapped[str | None] = orm.mapped_column(sa.String(8))  # None while shown, not yet judged
    shown_at: orm.Mapped[dt.datetime]
    judged_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(index=True)


# ---- what the store returns ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Who:
    labeller_id: int
    name: str
    csrf_token: str | None = None  # set when the caller came with a session cookie


@dataclasses.dataclass(frozen=True)
class ShownPair:
    pair_id: int
    prompt: str | list[dict]
    first: str
    second: str
    policy_version: int


@dataclasses.dataclass(frozen=True)
class NewPair:
    """What the sampler made: a prompt, two answers and what the reward model thought of them."""
    prompt: str | list[dict]
    first: str
    second: str
    policy_version: int
    sampling: dict
    first_finish: str
    second_finish: str
    rm_score_first: float | None
    rm_score_second: float | None
    rm_version: str | None


@dataclasses.dataclass(frozen=True)
class Stats:
    judged: int  # this labeller's choices, skips included
    skipped: int
    agreement: rules.Agreement  # with the other labellers, on pairs both judged


def engine_for(url: str) -> sa.Engine:
    """An engine for `url`: sqlite:///path.db or postgresql://... (psycopg 3)."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise InvalidArgument(f"--db: {url.split('@')[-1]!r} is not a database URL SQLAlchemy knows "
                              f"(sqlite:///FILE or postgresql://USER@HOST/DB): {e}") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            # WAL: readers do not wait for the writer; busy_timeout: writers queue instead of
            # failing at once; foreign keys are off in SQLite unless asked for.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    return engine


def is_db_url(path: str) -> bool:
    return str(path).startswith(("sqlite:", "postgresql:", "postgresql+", "postgres:"))


class Store:
    """The feedback database. `Store(url)`; `migrate()` brings its schema to the newest version."""

    def __init__(self, url: str, *, session_hours: float = 12.0):
        self.url = url
        self.engine = engine_for(url)
        self.session_ttl = dt.timedelta(hours=session_hours)
        self._session = orm.sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ---- schema ------------------------------------------------------------------------------

    def _alembic(self, connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self) -> str:
        """Upgrade to the newest schema (idempotent); returns its revision."""
        from alembic import command

        with self.engine.begin() as connection:
            command.upgrade(self._alembic(connection), "head")
        return self.revision()

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head(self) -> str:
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(MIGRATIONS)).get_current_head()

    def check_schema(self) -> None:
        """FailedPrecondition unless the database is at the newest schema."""
        current, head = self.revision(), self.head()
        if current != head:
            raise FailedPrecondition(f"the database schema is at revision {current}, this release needs {head}: "
                                     f"run `rlhf feedback migrate --db ...` (or start without --no-migrate)")

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    # ---- labellers and log-in -----------------------------------------------------------------

    def add_labeller(self, name: str) -> str:
        """A new labeller; returns the token, which is shown once and stored only as its hash."""
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidArgument(f"a labeller's name must have 1 to 100 characters, got {len(name)}")
        token = new_token()
        with self._session.begin() as s:
            if s.scalar(sa.select(Labeller.id).where(Labeller.name == name)) is not None:
                raise FailedPrecondition(f"labeller {name!r} exists already (rotate its token with --rotate)")
            s.add(Labeller(name=name, token_hash=token_hash(token), created_at=utcnow()))
        return token

    def rotate_token(self, name: str) -> str:
        token = new_token()
        with self._session.begin() as s:
            labeller = s.scalar(sa.select(Labeller).where(Labeller.name == name))
            if labeller is None:
                raise NotFound(f"no labeller {name!r}")
            labeller.token_hash = token_hash(token)
            s.execute(sa.delete(Session).where(Session.labeller_id == labeller.id))
        return token

    def set_active(self, name: str, active: bool) -> None:
        with self._session.begin() as s:
            labeller = s.scalar(sa.select(Labeller).where(Labeller.name == name))
            if labeller is None:
                raise NotFound(f"no labeller {name!r}")
            labeller.active = active
            if not active:
                s.execute(sa.delete(Session).where(Session.labeller_id == labeller.id))

    def labellers(self) -> list[tuple[str, bool, int]]:
        """(name, active, judgments) of every labeller."""
        with self._session() as s:
            judged = (sa.select(sa.func.count(Judgment.id)).where(Judgment.labeller_id == Labeller.id,
                                                                   Judgment.choice.is_not(None)).scalar_subquery())
            return [tuple(r) for r in s.execute(sa.select(Labeller.name, Labeller.active, judged)
                                                .order_by(Labeller.name))]

    def by_token(self, token: str) -> Who:
        """The active labeller holding `token`, else Unauthenticated."""
        with self._session() as s:
            row = s.execute(sa.select(Labeller.id, Labeller.name).where(
                Labeller.token_hash == token_hash(token), Labeller.active.is_(True))).first()
        if row is None:
            raise Unauthenticated("unknown or disabled labeller token")
        return Who(row.id, row.name)

    def open_session(self, who: Who) -> tuple[str, str]:
        """A browser session for `who`: (cookie value, CSRF token). Old expired sessions go."""
        cookie, csrf, now = new_token(), secrets.token_urlsafe(24), utcnow()
        with self._session.begin() as s:
            s.execute(sa.delete(Session).where(Session.expires_at < now))
            s.add(Session(cookie_hash=token_hash(cookie), labeller_id=who.labeller_id, csrf_token=csrf,
                          created_at=now, expires_at=now + self.session_ttl))
        return cookie, csrf

    def by_session(self, cookie: str) -> Who:
        with self._session() as s:
            row = s.execute(sa.select(Labeller.id, Labeller.name, Session.csrf_token, Session.expires_at)
                            .join(Session, Session.labeller_id == Labeller.id)
                            .where(Session.cookie_hash == token_hash(cookie), Labeller.active.is_(True))).first()
        if row is None or _aware(row.expires_at) < utcnow():
            raise Unauthenticated("no session or session expired: log in again")
        return Who(row.id, row.name, row.csrf_token)

    def close_session(self, cookie: str) -> None:
        with self._session.begin() as s:
            s.execute(sa.delete(Session).where(Session.cookie_hash == token_hash(cookie)))

    # ---- pairs and judgments -------------------------------------------------------------------

    def open_pair(self, who: Who, max_age: dt.timedelta) -> ShownPair | None:
        """The pair shown to `who` and not judged yet, if it was shown within max_age (a reload of
        the page shows the same pair, in the same order)."""
        with self._session() as s:
            row = s.execute(sa.select(Pair).join(Judgment, Judgment.pair_id == Pair.id).where(
                Judgment.labeller_id == who.labeller_id, Judgment.choice.is_(None),
                Judgment.shown_at >= utcnow() - max_age).order_by(Judgment.shown_at.desc()).limit(1)).scalar()
            return _shown(row) if row is not None else None

    def pair_to_repeat(self, who: Who, min_policy_version: int) -> ShownPair | None:
        """A pair that one other labeller judged (not skipped) and `who` has not seen, of a recent
        policy version: shown to a second labeller, it measures how much labellers agree."""
        with self._session.begin() as s:
            judged_by = (sa.select(Judgment.pair_id).where(Judgment.choice.is_not(None), Judgment.choice != "skip")
                         .group_by(Judgment.pair_id).having(sa.func.count() == 1).subquery())
            seen = sa.select(Judgment.pair_id).where(Judgment.labeller_id == who.labeller_id)
            # only pairs whose every showing was judged: none is waiting for a second opinion already
            waiting = sa.select(Judgment.pair_id).where(Judgment.choice.is_(None))
            pair = s.execute(sa.select(Pair).join(judged_by, judged_by.c.pair_id == Pair.id).where(
                Pair.policy_version >= min_policy_version, Pair.id.not_in(seen), Pair.id.not_in(waiting))
                .order_by(Pair.id.desc()).limit(1)).scalar()
            if pair is None:
                return None
            s.add(Judgment(pair_id=pair.id, labeller_id=who.labeller_id, shown_at=utcnow()))
            return _shown(pair)

    def add_pair(self, who: Who, new: NewPair) -> ShownPair:
        """Store a freshly sampled pair and show it to `who`."""
        with self._session.begin() as s:
            pair = Pair(**dataclasses.asdict(new), created_at=utcnow())
            s.add(pair)
            s.flush()
            s.add(Judgment(pair_id=pair.id, labeller_id=who.labeller_id, shown_at=pair.created_at))
            return _shown(pair)

    def judge(self, who: Who, pair_id: int, choice: str) -> int:
        """Record `who`'s choice on a pair that was shown to them; returns the judgment's id."""
        if choice not in rules.CHOICES:
            raise InvalidArgument(f"choice must be one of {list(rules.CHOICES)}, got {str(choice)[:40]!r}")
        if not isinstance(pair_id, int) or isinstance(pair_id, bool) or not 0 < pair_id < 2 ** 31:
            raise InvalidArgument(f"pair_id must be a positive integer (a pair's id), got {str(pair_id)[:40]!r}")
        with self._session.begin() as s:
            judgment = s.scalar(sa.select(Judgment).where(Judgment.pair_id == pair_id,
                                                          Judgment.labeller_id == who.labeller_id)
                                .with_for_update())
            if judgment is None:
                raise NotFound(f"pair {pair_id} was not shown to {who.name}: ask for a pair first")
            if judgment.choice is not None:
                raise FailedPrecondition(f"pair {pair_id} is judged already by {who.name} ({judgment.choice})")
            judgment.choice, judgment.judged_at = choice, utcnow()
            return judgment.id

    # ---- what the judgments say ----------------------------------------------------------------

    def _choices_by_pair(self, s, labeller_id: int | None = None) -> dict[int, list[tuple[int, str]]]:
        """pair id -> [(labeller id, choice)] of the pairs judged by two labellers or more (skips out),
        limited to pairs `labeller_id` judged when given."""
        q = sa.select(Judgment.pair_id, Judgment.labeller_id, Judgment.choice).where(
            Judgment.choice.is_not(None), Judgment.choice != "skip")
        if labeller_id is not None:
            mine = sa.select(Judgment.pair_id).where(Judgment.labeller_id == labeller_id)
            q = q.where(Judgment.pair_id.in_(mine))
        out: dict[int, list[tuple[int, str]]] = {}
        for pair_id, labeller, choice in s.execute(q):
            out.setdefault(pair_id, []).append((labeller, choice))
        return {k: v for k, v in out.items() if len(v) > 1}

    def stats(self, who: Who) -> Stats:
        with self._session() as s:
            counts = dict(s.execute(sa.select(Judgment.choice, sa.func.count()).where(
                Judgment.labeller_id == who.labeller_id, Judgment.choice.is_not(None)).group_by(Judgment.choice)).all())
            by_pair = self._choices_by_pair(s, who.labeller_id)
        return Stats(judged=sum(counts.values()), skipped=counts.get("skip", 0),
                     agreement=rules.labeller_agreement(by_pair, who.labeller_id))

    def agreement(self) -> rules.Agreement:
        """How often two labellers chose alike, over every pair judged twice or more."""
        with self._session() as s:
            return rules.labeller_agreement(self._choices_by_pair(s))

    def rm_agreement(self, window: int) -> rules.Agreement:
        """How often the reward model ranked a pair as the labeller did, over the last `window`
        decisive judgments (first or second) of pairs it scored: the reward-hacking alarm."""
        with self._session() as s:
            rows = s.execute(sa.select(Judgment.choice, Pair.rm_score_first, Pair.rm_score_second)
                             .join(Pair, Pair.id == Judgment.pair_id)
                             .where(Judgment.choice.in_(("first", "second")), Pair.rm_score_first.is_not(None),
                                    Pair.rm_score_second.is_not(None))
                             .order_by(Judgment.judged_at.desc(), Judgment.id.desc()).limit(window)).all()
        return rules.rm_agreement([(c, f, s_) for c, f, s_ in rows])

    def counts(self) -> dict[str, int]:
        with self._session() as s:
            return {"pairs": s.scalar(sa.select(sa.func.count(Pair.id))),
                    "judgments": s.scalar(sa.select(sa.func.count(Judgment.id)).where(Judgment.choice.is_not(None))),
                    "labellers": s.scalar(sa.select(sa.func.count(Labeller.id)))}

    # ---- export --------------------------------------------------------------------------------

    def export_rows(self, *, since_id: int = 0, min_policy_version: int = 0) -> list[dict]:
        """Every decisive judgment as a row of TRL's preference format, with what it came from:

            {"prompt", "chosen", "rejected",            TRL (a conversation prompt stays one, and
                                                          then chosen/rejected are assistant turns)
             "pair_id", "labeller", "policy_version", "rm_version", "rm_score_chosen",
             "rm_score_rejected", "judged_at", "judgment_id"}

        Ties and skips say nothing about which answer is better and are left out; a pair judged by
        two labellers gives two rows (services.trainer.rm reads their agreement as the noise
        ceiling)."""
        with self._session() as s:
            rows = s.execute(sa.select(Judgment.id, Judgment.choice, Judgment.judged_at, Labeller.name, Pair)
                             .join(Pair, Pair.id == Judgment.pair_id)
                             .join(Labeller, Labeller.id == Judgment.labeller_id)
                             .where(Judgment.choice.in_(("first", "second")), Judgment.id > since_id,
                                    Pair.policy_version >= min_policy_version)
                             .order_by(Judgment.id)).all()
        out = []
        for judgment_id, choice, judged_at, name, pair in rows:
            chosen, rejected = (pair.first, pair.second) if choice == "first" else (pair.second, pair.first)
            score_c, score_r = ((pair.rm_score_first, pair.rm_score_second) if choice == "first"
                                else (pair.rm_score_second, pair.rm_score_first))
            out.append({**rules.trl_row(pair.prompt, chosen, rejected), "pair_id": pair.id, "labeller": name,
                        "policy_version": pair.policy_version, "rm_version": pair.rm_version,
                        "rm_score_chosen": score_c, "rm_score_rejected": score_r,
                        "judged_at": _aware(judged_at).isoformat(), "judgment_id": judgment_id})
        return out


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes (it has no time zone type): they were written in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _shown(pair: Pair) -> ShownPair:
    return ShownPair(pair.id, pair.prompt, pair.first, pair.second, pair.policy_version)


def write_jsonl(rows: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
