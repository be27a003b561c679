"""A client of the feedback service's JSON API, for programs (a simulated labeller, a crowd
platform's bridge). The standard library only.

    with FeedbackClient("http://127.0.0.1:8090", token) as fb:
        pair = fb.next_pair()
        fb.judge(pair["pair_id"], "first")
        print(fb.stats())
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class FeedbackError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class FeedbackClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 120.0, retries: int = 5):
        self.base_url, self.timeout, self.retries = base_url.rstrip("/"), timeout, retries
        self._auth = {"Authorization": f"Bearer {token}"}

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self._auth, **({"Content-Type": "application/json"} if data is not None else {})}
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                # 429 (rate limit) and 503 (policy not answering, draining) are worth another try.
                if e.code in (429, 503) and attempt < self.retries:
                    time.sleep(float(e.headers.get("Retry-After") or 2 ** attempt))
                    continue
                try:
                    message = json.loads(e.read()).get("error", "")
                except ValueError:
                    message = e.reason
                raise FeedbackError(e.code, message) from None
        raise AssertionError("unreachable")

    def next_pair(self) -> dict:
        """{"pair_id", "prompt", "first", "second", "policy_version"}"""
        return json.loads(self._call("GET", "/api/v1/pair"))

    def judge(self, pair_id: int, choice: str) -> dict:
        """choice: first, second, tie or skip. Returns {"judgment_id", "stats"}."""
        return json.loads(self._call("POST", "/api/v1/judgments", {"pair_id": pair_id, "choice": choice}))

    def stats(self) -> dict:
        return json.loads(self._call("GET", "/api/v1/stats"))

    def export(self, since_id: int = 0) -> list[dict]:
        """TRL preference rows (needs the service's own token, not a labeller's)."""
        body = self._call("GET", f"/api/v1/export?since_id={int(since_id)}").decode()
        return [json.loads(line) for line in body.splitlines() if line]

    def close(self) -> None:
        pass

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
