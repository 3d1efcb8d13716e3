// dprdm web page: a key field (kept in this browser's localStorage), a prompt box, the images
// and the budget gauge. Plain JS, no build step, nothing loaded from anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "dprdm-api-key";
const COMPOSITION =
  "Epsilon grows more slowly than the number of queries (privacy losses compose " +
  "sublinearly): the first query costs more than 1/T of the budget, later queries less, and " +
  "both gauges reach the end together.";
let info = null;
let budget = null;
let busy = false;

// Mechanism figures for people: three significant digits (0.0875, 2.35, 40).
const rounded = (x) => Number(Number(x).toPrecision(3));

function budgetSpent() {
  return budget !== null && budget.queries_remaining <= 0;
}

// Generate is off while a request runs, and when the budget is spent (unless "public only").
function updateGenerate() {
  const publicOnly = Boolean(info && info.public_only_enabled && $("public-only").checked);
  const spent = budgetSpent();
  $("generate").disabled = busy || (spent && !publicOnly);
  const notice = $("budget-spent");
  notice.hidden = !spent;
  if (spent) {
    notice.textContent =
      "The privacy budget of this server is used up: it cannot make any more images from " +
      "its private collection, since each one would reveal a little more about it. " +
      (info && info.public_only_enabled
        ? "You can still generate from public data only: tick “public only” (it spends nothing)."
        : "Ask the operator of this server if you need more.");
  }
}

function authHeaders() {
  if (info && info.keyless_local) return {};
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showBudget(b) {
  budget = b;
  const total = b.queries_spent + b.queries_remaining;
  $("queries-gauge").max = Math.max(total, 1);
  $("queries-gauge").value = b.queries_spent;
  $("queries-text").textContent =
    `${b.queries_spent} spent · ${b.queries_remaining} remaining of ${total}`;
  $("epsilon-gauge").max = b.epsilon_budget;
  $("epsilon-gauge").value = Math.min(b.epsilon_spent, b.epsilon_budget);
  $("epsilon-text").textContent =
    `ε ${b.epsilon_spent.toFixed(3)} spent · ${b.epsilon_remaining.toFixed(3)} ` +
    `remaining of ${b.epsilon_budget}`;
  $("queries-row").title = COMPOSITION;
  $("epsilon-row").title = `${COMPOSITION} (delta = ${b.delta})`;
  $("budget").dataset.queriesSpent = String(b.queries_spent);
  $("budget").dataset.queriesRemaining = String(b.queries_remaining);
  updateGenerate();
}

// What a refusal means, in words; the status and code stay for the curious.
function explain(status, body) {
  if (body.error === "budget_exhausted") {
    return `${status} budget used up: no more images can be made from the private collection` +
      (body.public_only_enabled ? "; tick “public only” to generate from public data." : ".");
  }
  if (body.error === "quota_exceeded") {
    return `${status} quota used up: this key may make no more private queries.`;
  }
  return `${status} ${body.error}: ${body.message}`;
}

async function refreshBudget() {
  if (!info || (!info.keyless_local && !localStorage.getItem(KEY_STORAGE))) {
    $("key-status").textContent = "enter an API key to see the budget and generate";
    return;
  }
  const response = await fetch("/v1/budget", { headers: authHeaders() });
  const body = await response.json();
  if (response.ok) {
    showBudget(body);
    $("key-status").textContent = body.key ? `key: ${body.key.name}` +
      (body.key.quota !== null ? ` (${body.key.quota_remaining} of ${body.key.quota} left)` : "")
      : "keyless local mode";
  } else {
    $("key-status").textContent = body.message || "could not read the budget";
  }
}

function showImages(images) {
  const box = $("images");
  box.replaceChildren();
  for (const image of images) {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + image.png_base64;
    img.alt = "generated image";
    img.className = "generated";
    box.appendChild(img);
  }
}

async function generate(event) {
  event.preventDefault();
  const request = {
    prompt: $("prompt").value,
    n: parseInt($("n").value, 10),
    steps: parseInt($("steps").value, 10),
  };
  if ($("seed").value !== "") request.seed = parseInt($("seed").value, 10);
  if ($("public-only").checked) request.public_only = true;
  busy = true;
  updateGenerate();
  setStatus("generating…", false);
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify(request),
    });
    const body = await response.json();
    if (response.ok) {
      showImages(body.images);
      showBudget(body);
      setStatus(`${body.images.length} image(s), ${body.mode === "dp" ?
        "private retrieval (one query spent)" : "public only (no budget spent)"}`, false);
    } else {
      if (body.queries_remaining !== undefined) showBudget(body);
      setStatus(explain(response.status, body), true);
    }
  } catch (error) {
    setStatus("request failed: " + error, true);
  } finally {
    busy = false;
    updateGenerate();
  }
}

async function start() {
  const response = await fetch("/v1/info");
  info = await response.json();
  const m = info.mechanism;
  $("mechanism").textContent = "Mechanism fixed by the operator: " +
    `k=${m.k}, q=${rounded(m.q)}, sigma=${rounded(m.sigma)}, lam=${rounded(m.lam)}.` +
    (info.style_estimate_releases
      ? ` Each release is shrunk towards the operator's style estimate ` +
        `(${info.style_estimate_releases} releases; free).`
      : "");
  $("n").max = info.limits.max_images;
  $("steps").max = info.limits.max_steps;
  $("steps").value = Math.min(info.limits.default_steps, info.limits.max_steps);
  $("public-only-label").hidden = !info.public_only_enabled;
  $("public-only").addEventListener("change", updateGenerate);
  $("key-section").hidden = info.keyless_local;  // no key to give in keyless local mode
  $("key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("key").value.trim());
    refreshBudget();
  });
  $("form").addEventListener("submit", generate);
  await refreshBudget();
}

start();
