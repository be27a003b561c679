"""The two HTML pages, rendered on the server. Everything a labeller sees of a pair is filled in by
static/judge.js as text (never as markup), so an answer that holds HTML shows as written."""
from __future__ import annotations

from html import escape


def _document(title: str, body: str, script: str = "") -> str:
    scripts = f'<script src="/static/{script}" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="stylesheet" href="/static/feedback.css">
{scripts}
</head>
<body>
{body}
</body>
</html>
"""


def login_page(nonce: str, error: str = "") -> str:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return _document("Log in: RLHF feedback", f"""<main class="login">
<h1>RLHF feedback</h1>
<p>Log in with the labeller token your operator gave you.</p>
{message}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{escape(nonce)}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Log in</button>
</form>
</main>""")


def judge_page(name: str, csrf_token: str) -> str:
    return _document("Judge: RLHF feedback", f"""<header>
<h1>Which answer is better?</h1>
<div class="who">
<span id="labeller">{escape(name)}</span>
<form method="post" action="/logout" class="logout">
<input type="hidden" name="csrf" value="{escape(csrf_token)}">
<button type="submit">Log out</button>
</form>
</div>
</header>
<main data-csrf="{escape(csrf_token)}" id="app">
<section class="stats" aria-live="polite">
<span>Judged: <strong id="judged">0</strong></span>
<span>this session: <strong id="session-count">0</strong></span>
<span>Agreement with other labellers: <strong id="agreement">-</strong></span>
</section>
<section class="prompt">
<h2>Prompt</h2>
<div id="prompt" class="text">Loading a pair...</div>
</section>
<section class="answers">
<article class="answer">
<h2>First <kbd>1</kbd></h2>
<div id="first" class="text"></div>
</article>
<article class="answer">
<h2>Second <kbd>2</kbd></h2>
<div id="second" class="text"></div>
</article>
</section>
<section class="choices">
<button type="button" id="choose-first" data-choice="first" disabled>First is better <kbd>1</kbd></button>
<button type="button" id="choose-tie" data-choice="tie" disabled>Tie <kbd>3</kbd></button>
<button type="button" id="choose-second" data-choice="second" disabled>Second is better <kbd>2</kbd></button>
<button type="button" id="choose-skip" data-choice="skip" disabled>Skip <kbd>S</kbd></button>
</section>
<p id="status" class="status" role="status"></p>
<p class="meta">Pair <span id="pair-id">-</span>, policy weight version <span id="policy-version">-</span></p>
</main>""", script="judge.js")
