"""The feedback service's HTTP front end (aiohttp): the page people judge on, and the JSON API for
programs. Thin: every decision is the store's, the sampler's or the rules'.

    GET  /                    the page (a session cookie; else to /login)
    GET  /login, POST /login  log in with a labeller token; POST /logout
    GET  /api/v1/pair         the next pair to judge
    POST /api/v1/judgments    {"pair_id": 7, "choice": "first" | "second" | "tie" | "skip"}
    GET  /api/v1/stats        this labeller's progress and agreement; the reward model's
    GET  /api/v1/export       TRL preference rows as JSON lines (the service's own token only)
    GET  /healthz, /readyz    liveness, and readiness (database reachable, not draining)

Who may write: a labeller, by `Authorization: Bearer <token>` (programs: no CSRF token, as a
bearer token is never sent by a browser on its own) or by the page's session cookie (then every
POST carries the session's CSRF token in X-CSRF-Token, and the cookie is SameSite=Strict). The log-in
form is guarded by a double-submit cookie. Limits, applied before any work: the body size
(--max-body-bytes), requests per labeller (a token bucket, --rate-limit/--rate-burst), failed
log-ins per client address (--login-attempts per minute), pairs being sampled at once
(--max-concurrency). docs/feedback.md has the API with examples.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hmac
import json
import logging
import math
import pathlib
import random
import secrets
import time

from aiohttp import web

from services.common import errors
from services.common.status import to_http
from services.feedback import metrics, page
from services.feedback.rules import CHOICES
from services.feedback.sampler import Sampler
from services.feedback.store import ShownPair, Store, Who

log = logging.getLogger(__name__)

SESSION_COOKIE = "rlhf_feedback_session"
LOGIN_COOKIE = "rlhf_feedback_login"
STATIC = pathlib.Path(__file__).resolve().parent / "static"
API = "/api/v1"


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8090
    admin_token: str | None = None  # the service's own token: export over HTTP
    tls_cert: str | None = None
    tls_key: str | None = None
    cookie_secure: bool = False  # Secure cookies: on with TLS here or at an ingress in front
    max_body_bytes: int = 16 << 10
    rate_limit: float = 5.0  # requests per second and labeller, on average
    rate_burst: int = 30
    login_attempts: int = 10  # failed log-ins per minute and client address
    max_concurrency: int = 32  # pairs being sampled at once
    overlap: float = 0.2  # share of pairs shown to a second labeller (agreement between labellers)
    repeat_version_lag: int = 10  # a repeated pair is at most this many policy versions old
    reserve_minutes: float = 30.0  # a pair shown and not judged comes back on the next request this long
    drift_window: int = 200  # decisive judgments behind the reward model's agreement
    session_hours: float = 12.0


class TokenBucket:
    """`rate` requests a second on average, `burst` at once, per key."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict = {}

    def take(self, key) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle keys rather than grow without end
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}
        return 0.0


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _pair_json(p: ShownPair) -> dict:
    return {"pair_id": p.pair_id, "prompt": p.prompt, "first": p.first, "second": p.second,
            "policy_version": p.policy_version}


class FeedbackApp:
    def __init__(self, store: Store, sampler: Sampler, settings: Settings):
        self.store, self.sampler, self.s = store, sampler, settings
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.logins = TokenBucket(settings.login_attempts / 60.0, settings.login_attempts)
        self.sampling = 0
        self.draining = False
        self.rng = random.Random()
        self._expected_admin = f"Bearer {settings.admin_token}".encode() if settings.admin_token else None
        self._stats_task: asyncio.Task | None = None
        self.newest_version = 0  # the policy's weight version in the newest pair

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes, middlewares=[self._observe])
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get(f"{API}/pair", self.next_pair)
        r.add_post(f"{API}/judgments", self.judge)
        r.add_get(f"{API}/stats", self.stats)
        r.add_get(f"{API}/export", self.export)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_static("/static/", STATIC, append_version=False)
        return app

    # ---- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler):
        start, status = time.perf_counter(), 500
        try:
            if request.content_length is not None and request.content_length > self.s.max_body_bytes:
                metrics.REFUSED.labels("body_size").inc()
                response = _error(413, f"the body is {request.content_length} bytes, limit --max-body-bytes="
                                       f"{self.s.max_body_bytes}")
            else:
                response = await handler(request)
            status = response.status
            response.headers.setdefault("Cache-Control", "no-store")
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("X-Frame-Options", "DENY")
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except errors.ServiceError as exc:
            status = to_http(exc)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if isinstance(exc, _RateLimited):
                headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            return _error(status, str(exc), headers)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, and said to be ours (500)
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error: {type(exc).__name__}")
        finally:
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else "other"  # unknown paths: one label
            if path.startswith("/static"):
                path = "/static"
            metrics.HTTP_REQUESTS.labels(path, str(status)).inc()
            metrics.HTTP_SECONDS.labels(path).observe(time.perf_counter() - start)

    async def _db(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def _who(self, request: web.Request, *, write: bool) -> Who:
        """The labeller behind a request: a bearer token, or the page's session (with its CSRF token
        on writes). Then the labeller's rate limit."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                metrics.REFUSED.labels("unauthenticated").inc()
                raise errors.Unauthenticated("the Authorization header must be `Bearer <labeller token>`")
            try:
                who = await self._db(self.store.by_token, token.strip())
            except errors.Unauthenticated:
                metrics.REFUSED.labels("unauthenticated").inc()
                raise
        else:
            cookie = request.cookies.get(SESSION_COOKIE)
            if not cookie:
                metrics.REFUSED.labels("unauthenticated").inc()
                raise errors.Unauthenticated("log in: a labeller token as `Authorization: Bearer <token>`, or the "
                                             "page's session")
            who = await self._db(self.store.by_session, cookie)
            if write and not hmac.compare_digest(request.headers.get("X-CSRF-Token", "").encode(),
                                                 who.csrf_token.encode()):
                metrics.REFUSED.labels("csrf").inc()
                raise errors.PermissionDenied("missing or wrong X-CSRF-Token header for this session")
        wait = self.bucket.take(who.labeller_id)
        if wait:
            metrics.REFUSED.labels("rate_limit").inc()
            raise _RateLimited(f"more than {self.s.rate_limit:g} requests a second (burst {self.s.rate_burst}) from "
                               f"{who.name}; retry in {wait:.1f} s", wait)
        return who

    async def _json_body(self, request: web.Request) -> dict:
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.REFUSED.labels("body_size").inc()
            raise errors.InvalidArgument(f"the body is over the limit --max-body-bytes={self.s.max_body_bytes}") \
                from None
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise errors.InvalidArgument(f"the body must be a JSON object: {exc}"[:300]) from None
        if not isinstance(body, dict):
            raise errors.InvalidArgument("the body must be a JSON object")
        return body

    # ---- the page ------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        cookie = request.cookies.get(SESSION_COOKIE)
        try:
            who = await self._db(self.store.by_session, cookie) if cookie else None
        except errors.Unauthenticated:
            who = None
        if who is None:
            raise web.HTTPSeeOther("/login")
        return self._html(page.judge_page(who.name, who.csrf_token))

    def _html(self, body: str, status: int = 200) -> web.Response:
        response = web.Response(text=body, content_type="text/html", charset="utf-8", status=status)
        # Scripts and styles from this service alone, none inline: an answer that holds markup is text.
        response.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                                       "img-src 'self'; form-action 'self'; frame-ancestors 'none'")
        return response

    def _set_cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict",
                            secure=self.s.cookie_secure)

    async def login_form(self, request: web.Request, error: str = "", status: int = 200) -> web.Response:
        nonce = secrets.token_urlsafe(24)
        response = self._html(page.login_page(nonce, error), status)
        self._set_cookie(response, LOGIN_COOKIE, nonce, 600)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nonce, token = str(form.get("csrf", "")), str(form.get("token", "")).strip()
        if not nonce or not hmac.compare_digest(nonce.encode(), request.cookies.get(LOGIN_COOKIE, "").encode()):
            metrics.REFUSED.labels("csrf").inc()
            return await self.login_form(request, "The form expired: log in again.", 403)
        address = request.remote or "unknown"
        try:
            who = await self._db(self.store.by_token, token)
        except errors.Unauthenticated:
            metrics.REFUSED.labels("unauthenticated").inc()
            if self.logins.take(address):  # failed attempts only: a typo costs one
                metrics.REFUSED.labels("rate_limit").inc()
                return await self.login_form(request, "Too many failed log-ins from here: wait a minute.", 429)
            return await self.login_form(request, "Unknown or disabled token.", 401)
        cookie, _ = await self._db(self.store.open_session, who)
        response = web.HTTPSeeOther("/")
        self._set_cookie(response, SESSION_COOKIE, cookie, int(self.s.session_hours * 3600))
        response.del_cookie(LOGIN_COOKIE, path="/")
        log.info("labeller %s logged in", who.name)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            form = await request.post()
            try:
                who = await self._db(self.store.by_session, cookie)
            except errors.Unauthenticated:
                who = None
            if who is not None:
                if not hmac.compare_digest(str(form.get("csrf", "")).encode(), who.csrf_token.encode()):
                    metrics.REFUSED.labels("csrf").inc()
                    raise errors.PermissionDenied("missing or wrong CSRF token")
                await self._db(self.store.close_session, cookie)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    # ---- the API -------------------------------------------------------------------------------

    async def next_pair(self, request: web.Request) -> web.Response:
        who = await self._who(request, write=True)  # showing a pair writes its showing
        reserved = dt.timedelta(minutes=self.s.reserve_minutes)
        pair = await self._db(self.store.open_pair, who, reserved)
        if pair is None and self.rng.random() < self.s.overlap:
            pair = await self._db(self.store.pair_to_repeat, who, self.newest_version - self.s.repeat_version_lag)
            if pair is not None:
                metrics.PAIRS.labels("repeat").inc()
        if pair is None:
            if self.sampling >= self.s.max_concurrency:
                metrics.REFUSED.labels("concurrency").inc()
                raise _RateLimited(f"{self.sampling} pairs being sampled, limit --max-concurrency="
                                   f"{self.s.max_concurrency}; retry later", 1.0)
            self.sampling += 1
            try:
                start = time.perf_counter()
                new = await self.sampler.sample()
                metrics.SAMPLE_SECONDS.observe(time.perf_counter() - start)
            finally:
                self.sampling -= 1
            self.newest_version = max(self.newest_version, new.policy_version)
            metrics.POLICY_VERSION.set(self.newest_version)
            pair = await self._db(self.store.add_pair, who, new)
            metrics.PAIRS.labels("new").inc()
        return web.json_response(_pair_json(pair))

    async def judge(self, request: web.Request) -> web.Response:
        who = await self._who(request, write=True)
        body = await self._json_body(request)
        unknown = sorted(set(body) - {"pair_id", "choice"})
        if unknown:
            raise errors.InvalidArgument(f"unknown keys {unknown[:5]}; a judgment is {{pair_id, choice}}")
        if "pair_id" not in body or "choice" not in body:
            raise errors.InvalidArgument(f"a judgment needs pair_id and choice (one of {list(CHOICES)})")
        judgment_id = await self._db(self.store.judge, who, body["pair_id"], body["choice"])
        metrics.JUDGMENTS.labels(body["choice"]).inc()
        self.refresh_stats_soon()
        stats = await self._db(self.store.stats, who)
        return web.json_response({"judgment_id": judgment_id, "stats": self._stats_json(who, stats)}, status=201)

    def _stats_json(self, who: Who, stats) -> dict:
        return {"labeller": who.name, "judged": stats.judged, "skipped": stats.skipped,
                "agreement": stats.agreement.as_dict()}

    async def stats(self, request: web.Request) -> web.Response:
        who = await self._who(request, write=False)
        stats = await self._db(self.store.stats, who)
        rm = await self._db(self.store.rm_agreement, self.s.drift_window)
        return web.json_response({**self._stats_json(who, stats), "reward_model_agreement": rm.as_dict()})

    async def export(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if self._expected_admin is None:
            raise errors.PermissionDenied("export over HTTP needs the service's token (--auth-token-file); use "
                                          "`rlhf feedback export --db ...` instead")
        if not hmac.compare_digest(given, self._expected_admin):
            metrics.REFUSED.labels("unauthenticated").inc()
            raise errors.Unauthenticated("export takes the service's token (not a labeller's) as Bearer")
        try:
            since_id = int(request.query.get("since_id", "0"))
        except ValueError:
            raise errors.InvalidArgument("since_id must be an integer") from None
        rows = await self._db(lambda: self.store.export_rows(since_id=since_id))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return web.Response(text=body, content_type="application/x-ndjson", charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return _error(503, "draining")
        try:
            await self._db(self.store.ping)
        except Exception as exc:  # noqa: BLE001 - any database error means: not ready
            return _error(503, f"database unreachable: {type(exc).__name__}")
        return web.json_response({"status": "ready"})

    # ---- the gauges ------------------------------------------------------------------------------

    def refresh_stats_soon(self) -> None:
        """Recompute the agreement gauges off the request path, one refresh at a time."""
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.ensure_future(self.refresh_stats())

    async def refresh_stats(self) -> None:
        try:
            rm = await self._db(self.store.rm_agreement, self.s.drift_window)
            people = await self._db(self.store.agreement)
        except Exception:  # noqa: BLE001 - the next judgment or tick tries again
            log.exception("could not compute the agreement gauges")
            return
        metrics.RM_AGREEMENT_JUDGMENTS.set(rm.compared)
        if rm.rate is not None:
            metrics.RM_AGREEMENT.set(rm.rate)
        metrics.LABELLER_AGREEMENT_PAIRS.set(people.compared)
        if people.rate is not None:
            metrics.LABELLER_AGREEMENT.set(people.rate)

    async def refresh_forever(self, every_s: float) -> None:
        """Other replicas write to the same database: the gauges follow theirs too."""
        while True:
            await self.refresh_stats()
            await asyncio.sleep(every_s)


class _RateLimited(errors.ResourceExhausted):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after
