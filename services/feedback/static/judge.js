// The judging page: fetch a pair, show it as text, send the choice (click or key), repeat.
// The page's session cookie goes along by itself; writes carry the session's CSRF token.
"use strict";

const app = document.getElementById("app");
const csrf = app.dataset.csrf;
const buttons = Array.from(document.querySelectorAll("button[data-choice]"));
const keys = { "1": "first", "2": "second", "3": "tie", "t": "tie", "s": "skip" };
let pair = null;
let sessionCount = 0;
let busy = false;

function show(id, text) {
  document.getElementById(id).textContent = text;
}

function showPrompt(prompt) {
  const box = document.getElementById("prompt");
  box.textContent = "";
  if (typeof prompt === "string") {
    box.textContent = prompt;
    return;
  }
  for (const turn of prompt) {  // a conversation: one block per turn
    const div = document.createElement("div");
    div.className = "turn " + turn.role;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role + ": ";
    div.append(role, document.createTextNode(turn.content));
    box.append(div);
  }
}

function showStats(stats) {
  show("judged", String(stats.judged));
  show("session-count", String(sessionCount));
  const a = stats.agreement;
  show("agreement", a.compared ? `${Math.round(100 * a.rate)}% of ${a.compared}` : "no pair judged twice yet");
}

function enable(on) {
  for (const b of buttons) b.disabled = !on;
}

async function call(method, path, body) {
  // The CSRF token on every call: GET /api/v1/pair writes too (the pair's showing).
  const init = { method, credentials: "same-origin", headers: { "Accept": "application/json", "X-CSRF-Token": csrf } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("logged out");
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function nextPair() {
  enable(false);
  pair = null;
  show("status", "Sampling a pair from the policy...");
  for (let attempt = 0; ; attempt++) {
    try {
      pair = await call("GET", "/api/v1/pair");
      break;
    } catch (e) {
      if (e.message === "logged out") return;
      show("status", `No pair yet (${e.message}); trying again...`);
      await new Promise((r) => setTimeout(r, Math.min(10000, 1000 * 2 ** attempt)));
    }
  }
  showPrompt(pair.prompt);
  show("first", pair.first);
  show("second", pair.second);
  show("pair-id", String(pair.pair_id));
  show("policy-version", String(pair.policy_version));
  show("status", "");
  enable(true);
}

async function choose(choice) {
  if (!pair || busy) return;
  busy = true;
  enable(false);
  try {
    const reply = await call("POST", "/api/v1/judgments", { pair_id: pair.pair_id, choice });
    sessionCount += 1;
    showStats(reply.stats);
    await nextPair();
  } catch (e) {
    show("status", `Not saved: ${e.message}`);
    enable(true);
  } finally {
    busy = false;
  }
}

for (const b of buttons) b.addEventListener("click", () => choose(b.dataset.choice));
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "INPUT") return;
  const choice = keys[event.key.toLowerCase()];
  if (choice) {
    event.preventDefault();
    choose(choice);
  }
});

call("GET", "/api/v1/stats").then(showStats).catch(() => {});
nextPair();
