"""OpenRLHF's remote reward protocol over HTTP, so its trainers can point at this service unchanged.

    POST /get_reward  {"query": [...], "prompts": [...], "labels": [...]}
    ->                {"rewards": [...], "scores": [...], "extra_logs": {...}}

How a body is read (--http-input):

  openrlhf (the default: this port exists for OpenRLHF's trainers, and it is what they send)
      Each query is the whole sequence as OpenRLHF decodes it: the templated prompt, the response,
      special-token text kept (EOS; left/right padding in releases up to 0.8). It is scored the way
      OpenRLHF's own reward server scores it: pad/EOS text stripped at both ends, one EOS appended,
      tokenized as it is, never templated a second time. `prompts` (the templated prompts) is
      optional; it tells where the response starts, which keep_end_of_prompt truncation and the
      reward functions need.
  pairs
      query = prompt + response with the prompt as the user wrote it; the prompt is templated here,
      as gRPC Score templates a text prompt.

Labels are accepted and ignored. Two optional keys of our own: "truncation" ("reject", the
default, or "keep_end_of_prompt") and "normalize" (bool). The reply also says which reward model
version scored the queries: "model_version" (the string, as gRPC's ScoreResult.model_version), and
extra_logs["model_version_id"] per query, its first 6 hex digits as a number (OpenRLHF turns every
extra_logs list into a float tensor and logs its mean: constant while one version serves).

Limits, all applied before the body is read: the bearer token (unless --http-no-auth; OpenRLHF
sends none, so such a port must be guarded by a NetworkPolicy), --http-max-concurrency requests
at once (beyond it 429 at once), and --max-message-bytes per body (beyond it 413). The app runs in
the gRPC server's event loop over the same core, so both doors share one queue and one batcher.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import ssl
import time

from aiohttp import web

from services.common import errors
from services.reward import metrics
from services.reward.scorer import Pair, PairResult, Query, Scorer
from services.common.text import TRUNCATIONS

log = logging.getLogger(__name__)

PATH = "/get_reward"
INPUTS = ("openrlhf", "pairs")
STATUS = {errors.InvalidArgument: 400, errors.Unauthenticated: 401, errors.PermissionDenied: 403,
          errors.NotFound: 404, errors.FailedPrecondition: 412, errors.ResourceExhausted: 429,
          errors.Unavailable: 503}


@dataclasses.dataclass
class HttpSettings:
    port: int
    host: str = "127.0.0.1"
    input: str = "openrlhf"
    auth_token: str | None = None  # None: no token asked (auth off, or --http-no-auth)
    max_body_bytes: int = 64 << 20
    max_concurrency: int = 64
    tls_cert: str | None = None  # HTTPS with the gRPC server's certificate, so a token never travels in clear
    tls_key: str | None = None


def _str_list(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise errors.InvalidArgument(f"{key} must be a list of strings")
    return value


def parse_request(body, mode: str, scorer: Scorer) -> tuple[list, str, bool]:
    """(the core's items, truncation, normalize) from a request body; InvalidArgument names the key."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the body must be a JSON object with query (and prompts)")
    queries = _str_list(body, "query")
    scorer.check_count(len(queries), "query")
    prompts = _str_list(body, "prompts") if mode == "pairs" or body.get("prompts") is not None else None
    if prompts is not None and len(prompts) != len(queries):
        raise errors.InvalidArgument(f"prompts must hold one prompt per query: {len(prompts)} prompts, "
                                     f"{len(queries)} queries")
    truncation = body.get("truncation", "reject")
    if not isinstance(truncation, str) or truncation not in TRUNCATIONS:
        raise errors.InvalidArgument(f"truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}"[:300])
    normalize = body.get("normalize", False)
    if not isinstance(normalize, bool):
        raise errors.InvalidArgument(f"normalize must be true or false, got {normalize!r}"[:300])
    if mode == "openrlhf":
        items = [Query(q, prompts[i] if prompts else None, f"query[{i}]", f"query[{i}]", f"prompts[{i}]")
                 for i, q in enumerate(queries)]
    else:
        items = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if not query.startswith(prompt):
                raise errors.InvalidArgument(f"query[{i}] must start with prompts[{i}] (query = prompt + response)")
            items.append(Pair(prompt, query[len(prompt):], f"query[{i}]", f"prompts[{i}]",
                              f"query[{i}] after its prompt (the response)"))
    return items, truncation, normalize


def _parse_json(data: bytes):
    """JSON is UTF-8 (RFC 8259), whatever charset the Content-Type claims; nesting too deep for
    the parser is the caller's mistake like any other."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(f"the body is not UTF-8: {exc}") from None
    except RecursionError:
        raise errors.InvalidArgument("the body is JSON nested too deeply") from None
    except ValueError as exc:
        raise errors.InvalidArgument(f"the body must be JSON: {exc}") from None


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def version_id(version: str) -> float:
    """A model version as a number for extra_logs, whose every value OpenRLHF turns into a float
    tensor (a string would fail there): its first 6 hex digits, which a float32 holds exactly."""
    return float(int(version[:6] or "0", 16))


def _reply(results: list[PairResult]) -> dict:
    rewards = [r.score for r in results]
    extra = {"raw_score": [r.raw_score for r in results], "truncated": [float(r.truncated) for r in results],
             "num_tokens": [float(r.num_tokens) for r in results],
             "model_version_id": [version_id(r.model_version) for r in results]}
    for name in (results[0].components if results else {}):
        extra[f"component_{name}"] = [r.components[name] for r in results]
    # One version scored them all (the one served when the request came).
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra, "model_version": results[0].model_version}


class RewardEndpoint:
    """POST /get_reward over one Scorer, with the limits above and the rlhf_reward_http_* metrics."""

    def __init__(self, scorer: Scorer, settings: HttpSettings):
        if settings.input not in INPUTS:
            raise ValueError(f"--http-input must be one of {INPUTS}, got {settings.input!r}")
        self.scorer, self.s = scorer, settings
        self._expected = f"Bearer {settings.auth_token}".encode() if settings.auth_token else None
        self.in_flight = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes, middlewares=[self._observe])
        app.router.add_post(PATH, self.get_reward)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler):
        start, status = time.perf_counter(), 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else "other"  # unknown paths: one label
            metrics.HTTP_REQUESTS.labels(path, str(status)).inc()
            metrics.HTTP_SECONDS.labels(path).observe(time.perf_counter() - start)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Everything that can refuse a request before one byte of its body is read."""
        if self._expected is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._expected):  # constant time
                return _error(401, "missing or invalid bearer token in the Authorization header",
                              {"WWW-Authenticate": "Bearer"})
        if self.in_flight >= self.s.max_concurrency:
            return _error(429, f"{self.in_flight} requests in flight, limit --http-max-concurrency="
                               f"{self.s.max_concurrency}; retry later", {"Retry-After": "1"})
        if request.content_length is not None and request.content_length > self.s.max_body_bytes:
            return _error(413, f"the body is {request.content_length} bytes, limit --max-message-bytes="
                               f"{self.s.max_body_bytes}")
        return None

    async def get_reward(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        self.in_flight += 1
        metrics.HTTP_IN_FLIGHT.inc()
        try:
            try:
                data = await request.read()  # stops with 413 past client_max_size (a body without a length)
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"the body is over the limit --max-message-bytes={self.s.max_body_bytes}")
            # Parsing megabytes of JSON takes a while: off the event loop.
            body = await asyncio.to_thread(_parse_json, data)
            del data  # not needed while the pairs are scored
            items, truncation, normalize = parse_request(body, self.s.input, self.scorer)
            results = await self.scorer.score(items, truncation, normalize, field="query")
            return web.json_response(_reply(results))
        except errors.ServiceError as exc:
            return _error(next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500), str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, and said to be ours (500)
            log.exception("POST %s failed", PATH)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1
            metrics.HTTP_IN_FLIGHT.dec()


async def start_http(scorer: Scorer, settings: HttpSettings) -> web.AppRunner:
    """Serve the endpoint in the running event loop; `await runner.cleanup()` stops it."""
    runner = web.AppRunner(RewardEndpoint(scorer, settings).app(), access_log=None)
    await runner.setup()
    ssl_context = None
    if settings.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
    await web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context).start()
    log.info("OpenRLHF-compatible POST %s on %s://%s:%d (input %s, bearer token %s, %d requests at once, "
             "bodies up to %d bytes)", PATH, "https" if ssl_context else "http", settings.host, settings.port,
             settings.input, "required" if settings.auth_token else "not asked", settings.max_concurrency,
             settings.max_body_bytes)
    return runner
