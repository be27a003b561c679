"""OpenRLHF-compatible remote reward endpoint, so existing trainers can point at this service unchanged.

    POST /get_reward  {"query": [full text, ...], "prompts": [prompt, ...], "labels": [...]}
    ->                {"rewards": [...], "scores": [...], "extra_logs": {...}}

OpenRLHF sends each query as the whole sequence (prompt + response) and the prompts
apart; the response is what follows the prompt. Labels (for rule-based rewards)
are accepted and ignored. Two optional keys of our own: "truncation"
("reject", the default, or "keep_end_of_prompt") and "normalize" (bool).

The app runs in the gRPC server's event loop and scores through the same
servicer, so it shares the batcher, the queue limit and the bearer token.
"""
from __future__ import annotations

import hmac
import logging
import ssl

from aiohttp import web

from rlhf.v1 import reward_pb2
from services.common import errors
from services.reward.server import REQUESTS

log = logging.getLogger(__name__)

TRUNCATION = {"reject": reward_pb2.TRUNCATION_REJECT, "keep_end_of_prompt": reward_pb2.TRUNCATION_KEEP_END_OF_PROMPT}
STATUS = {errors.InvalidArgument: 400, errors.Unauthenticated: 401, errors.PermissionDenied: 403,
          errors.NotFound: 404, errors.FailedPrecondition: 412, errors.ResourceExhausted: 429,
          errors.Unavailable: 503}


def _str_list(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise errors.InvalidArgument(f"{key} must be a list of strings")
    return value


def parse_request(body, servicer) -> tuple[list[tuple[str, str]], int, bool]:
    """(prompt, response) pairs, truncation, normalize from an OpenRLHF request body."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the body must be a JSON object with query and prompts")
    queries, prompts = _str_list(body, "query"), _str_list(body, "prompts")
    servicer.check_count(len(queries), "query")
    if len(prompts) != len(queries):
        raise errors.InvalidArgument(f"prompts must hold one prompt per query: {len(prompts)} prompts, {len(queries)} queries")
    truncation = TRUNCATION.get(body.get("truncation", "reject"))
    if truncation is None:
        raise errors.InvalidArgument(f"truncation must be one of {sorted(TRUNCATION)}, got {body.get('truncation')!r}")
    normalize = body.get("normalize", False)
    if not isinstance(normalize, bool):
        raise errors.InvalidArgument(f"normalize must be true or false, got {normalize!r}")
    pairs = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        servicer.check_text(prompt, f"prompts[{i}]")
        if not query.startswith(prompt):
            raise errors.InvalidArgument(f"query[{i}] must start with prompts[{i}] (query = prompt + response)")
        pairs.append((prompt, servicer.check_text(query[len(prompt):], f"query[{i}] after its prompt (the response)")))
    return pairs, truncation, normalize


def make_app(servicer, auth_token: str | None) -> web.Application:
    expected = f"Bearer {auth_token}".encode() if auth_token else None
    # Room for a full batch of the largest texts, twice (query repeats the prompt).
    max_body = max(1 << 20, 3 * servicer.s.max_pairs * servicer.s.max_text_bytes + (1 << 16))

    async def get_reward(request: web.Request) -> web.Response:
        REQUESTS.labels("http_get_reward").inc()
        try:
            if expected is not None:
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):  # constant time
                    raise errors.Unauthenticated("missing or invalid bearer token in the Authorization header")
            try:
                body = await request.json()
            except ValueError as exc:
                raise errors.InvalidArgument(f"the body must be JSON: {exc}") from None
            pairs, truncation, normalize = parse_request(body, servicer)
            results = await servicer.score_pairs(pairs, truncation, normalize, field="query")
        except errors.ServiceError as exc:
            status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return web.json_response({"error": str(exc)}, status=status, headers=headers)
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("POST /get_reward failed")
            return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, status=500)
        rewards = [r.score for r in results]
        return web.json_response({
            "rewards": rewards,
            "scores": rewards,
            "extra_logs": {
                "raw_score": [r.raw_score for r in results],
                "truncated": [float(r.truncated) for r in results],
                "num_tokens": [float(r.num_tokens) for r in results],
            },
            "model_version": servicer.model_version,
        })

    app = web.Application(client_max_size=max_body)
    app.router.add_post("/get_reward", get_reward)
    return app


async def start_http(servicer, host: str, port: int, auth_token: str | None,
                     tls_cert: str | None = None, tls_key: str | None = None) -> web.AppRunner:
    """Serve the app on host:port in the running event loop; `await runner.cleanup()` stops it.
    With the server's certificate it serves HTTPS, so the token never travels in clear."""
    runner = web.AppRunner(make_app(servicer, auth_token), access_log=None)
    await runner.setup()
    ssl_context = None
    if tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(tls_cert, tls_key)
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    log.info("OpenRLHF-compatible POST /get_reward on %s://%s:%d", "https" if ssl_context else "http", host, port)
    return runner
