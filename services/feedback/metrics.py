"""The feedback service's Prometheus series, all in one place."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_REQUESTS = Counter("rlhf_feedback_http_requests_total", "HTTP requests, by route and status.", ["path", "code"])
HTTP_SECONDS = Histogram("rlhf_feedback_http_request_seconds", "Time to answer an HTTP request, by route.", ["path"],
                         buckets=_SECONDS)
JUDGMENTS = Counter("rlhf_feedback_judgments_total", "Judgments recorded, by choice.", ["choice"])
PAIRS = Counter("rlhf_feedback_pairs_shown_total", "Pairs shown to a labeller: new (sampled from the policy) or "
                "repeat (a second labeller on a judged pair, for the agreement between labellers).", ["source"])
SAMPLE_SECONDS = Histogram("rlhf_feedback_pair_sample_seconds", "Time to sample a pair (generate both answers, "
                           "score them).", buckets=_SECONDS)
REFUSED = Counter("rlhf_feedback_refused_total", "Requests refused before any work: rate limit, body size, "
                  "concurrency, authentication, CSRF.", ["reason"])
POLICY_VERSION = Gauge("rlhf_feedback_policy_version", "Weight version of the newest pair sampled from the policy.")
RM_AGREEMENT = Gauge("rlhf_feedback_rm_agreement_ratio", "Share of the last --drift-window decisive judgments in "
                     "which the reward model scored the answer people chose higher (the reward-hacking alarm).")
RM_AGREEMENT_JUDGMENTS = Gauge("rlhf_feedback_rm_agreement_judgments", "Judgments behind "
                               "rlhf_feedback_rm_agreement_ratio (at most --drift-window).")
LABELLER_AGREEMENT = Gauge("rlhf_feedback_labeller_agreement_ratio", "Share of pairs of judgments of one pair by two "
                           "labellers that agree: the noise ceiling of the reward model's accuracy.")
LABELLER_AGREEMENT_PAIRS = Gauge("rlhf_feedback_labeller_agreement_comparisons", "Comparisons behind "
                                 "rlhf_feedback_labeller_agreement_ratio.")
