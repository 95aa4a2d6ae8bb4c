// The static neuron viewer. Data files are scripts that call CRATE_VIEWER.register(key, payload); they are
// loaded on demand with <script> tags, which (unlike fetch) work from file:// URLs. State lives in the URL
// hash (#model=0&layer=3&feature=17), so every view can be bookmarked and shared.
"use strict";

const CRATE_VIEWER = (() => {
  const loaded = new Map();
  const waiting = new Map();

  function register(key, payload) {
    loaded.set(key, payload);
    const pending = waiting.get(key);
    if (pending) {
      waiting.delete(key);
      pending.resolve(payload);
    }
  }

  function load(key) {
    if (loaded.has(key)) return Promise.resolve(loaded.get(key));
    if (waiting.has(key)) return waiting.get(key).promise;
    const pending = {};
    pending.promise = new Promise((resolve, reject) => Object.assign(pending, { resolve, reject }));
    waiting.set(key, pending);
    const script = document.createElement("script");
    script.src = `data/${key}.js`;
    script.onerror = () => {
      waiting.delete(key);
      pending.reject(new Error(`could not load data/${key}.js`));
    };
    document.head.appendChild(script);
    return pending.promise;
  }

  return { register, load };
})();

const PAGE_SIZE = 100;
const state = { model: 0, layer: null, feature: null, sort: null, ascending: false, page: 0, filter: "" };
let index = null;
let layerData = null;

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const formatScore = (score) => (score === null || score === undefined ? "—" : (100 * score).toFixed(1));
const formatPercent = (value) => (value === null || value === undefined ? "—" : `${(100 * value).toPrecision(2)}%`);
const formatNumber = (value) => (value === null || value === undefined ? "—" : Number(value).toPrecision(3));

function showError(error) {
  $("error").hidden = false;
  $("error").textContent = String(error);
}

// ---------------------------------------------------------------------------------------------------
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const number = (name) => (params.has(name) ? Number(params.get(name)) : null);
  return { model: number("model") ?? 0, layer: number("layer"), feature: number("feature") };
}

function writeHash() {
  const parts = [`model=${state.model}`, `layer=${state.layer}`];
  if (state.feature !== null) parts.push(`feature=${state.feature}`);
  const hash = `#${parts.join("&")}`;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}

async function applyHash() {
  const wanted = readHash();
  const model = index.models[wanted.model] ? wanted.model : 0;
  const layers = index.models[model].layers.map((l) => l.layer);
  const layer = layers.includes(wanted.layer) ? wanted.layer : layers[0];
  if (model !== state.model || layer !== state.layer || layerData === null) {
    await selectLayer(model, layer);
  }
  if (wanted.feature !== null && wanted.feature !== state.feature) await selectFeature(wanted.feature);
}

// ---------------------------------------------------------------------------------------------------
async function start() {
  index = await CRATE_VIEWER.load("index");
  if (!index.models.length) throw new Error("this viewer holds no models");
  $("model").replaceChildren(...index.models.map((m, i) => element("option", { value: i, text: m.label })));
  $("model").onchange = () => selectLayer(Number($("model").value), null).catch(showError);
  $("layer").onchange = () => selectLayer(state.model, Number($("layer").value)).catch(showError);
  $("filter").oninput = () => {
    state.filter = $("filter").value.trim().toLowerCase();
    state.page = 0;
    renderList();
  };
  $("prev").onclick = () => turnPage(-1);
  $("next").onclick = () => turnPage(+1);
  window.addEventListener("hashchange", () => applyHash().catch(showError));
  await applyHash();
}

async function selectLayer(model, layer) {
  const entry = index.models[model];
  layer = layer ?? entry.layers[0].layer;
  state.model = model;
  state.layer = layer;
  state.feature = null;
  state.page = 0;
  state.sort = state.sort && (state.sort === "id" || entry.metrics.includes(state.sort) || state.sort === "density")
    ? state.sort : entry.metrics[0] ?? "id";
  $("model").value = model;
  $("layer").replaceChildren(...entry.layers.map((l) => element("option", { value: l.layer, text: l.layer })));
  $("layer").value = layer;
  const summary = entry.layers.find((l) => l.layer === layer);
  $("layer-summary").textContent = `${summary.n_features} features; layer mean ` +
    entry.metrics.map((m) => `${m} ${formatScore(summary.means[m])}`).join(", ");
  layerData = await CRATE_VIEWER.load(`m${model}/layer-${String(layer).padStart(2, "0")}`);
  $("detail").replaceChildren(element("p", { class: "hint", text: "Choose a feature from the list." }));
  renderList();
  writeHash();
}

function sortValue(feature, key) {
  if (key === "id") return feature.id;
  if (key === "density") return feature.density ?? null;
  if (key === "max") return feature.max ?? null;
  return feature.scores[key] ?? null;
}

function visibleFeatures() {
  const filter = state.filter;
  let features = layerData.features;
  if (filter) {
    features = features.filter((f) => String(f.id) === filter ||
      Object.values(f.explanations).some((text) => text.toLowerCase().includes(filter)));
  }
  const direction = state.ascending ? 1 : -1;
  return [...features].sort((a, b) => {
    const x = sortValue(a, state.sort);
    const y = sortValue(b, state.sort);
    if (x === null && y === null) return a.id - b.id;
    if (x === null) return 1; // missing values last, whichever the direction
    if (y === null) return -1;
    return x === y ? a.id - b.id : (x < y ? -direction : direction);
  });
}

function renderList() {
  const metrics = layerData.metrics;
  const columns = [["id", "feature"], ...metrics.map((m) => [m, m]), ["density", "fires on"], ["max", "max"],
    ["explanation", "explanation"]];
  $("features").tHead.replaceChildren(element("tr", {}, ...columns.map(([key, title]) => {
    const th = element("th", { text: title, title: key === "explanation" ? "" : "sort" });
    if (key === state.sort) th.className = `sorted${state.ascending ? " ascending" : ""}`;
    if (key !== "explanation") {
      th.onclick = () => {
        state.ascending = state.sort === key ? !state.ascending : key === "id";
        state.sort = key;
        state.page = 0;
        renderList();
      };
    }
    return th;
  })));
  const features = visibleFeatures();
  const pages = Math.max(1, Math.ceil(features.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const shown = features.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
  $("features").tBodies[0].replaceChildren(...shown.map((f) => {
    const row = element("tr", { "data-feature": f.id },
      element("td", { class: "num", text: f.id }),
      ...metrics.map((m) => element("td", { class: "num", text: formatScore(f.scores[m]), title: f.status[m] ?? "" })),
      element("td", { class: "num", text: formatPercent(f.density) }),
      element("td", { class: "num", text: formatNumber(f.max) }),
      element("td", { class: "explanation", text: firstExplanation(f, metrics) }));
    if (f.id === state.feature) row.classList.add("selected");
    row.onclick = () => selectFeature(f.id).catch(showError);
    return row;
  }));
  $("page-info").textContent = `${features.length} features · page ${state.page + 1} / ${pages}`;
}

function firstExplanation(feature, metrics) {
  for (const m of metrics) if (feature.explanations[m]) return feature.explanations[m];
  return "";
}

function turnPage(step) {
  state.page = Math.max(0, state.page + step);
  renderList();
}

// ---------------------------------------------------------------------------------------------------
async function selectFeature(id) {
  const feature = layerData.features.find((f) => f.id === id);
  if (!feature) throw new Error(`layer ${state.layer} has no feature ${id}`);
  state.feature = id;
  writeHash();
  for (const row of $("features").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.feature) === id);
  const chunkKey = `m${state.model}/layer-${String(state.layer).padStart(2, "0")}/chunk-` +
    String(Math.floor(id / layerData.chunk_size)).padStart(4, "0");
  let excerpts = null;
  try {
    const chunk = await CRATE_VIEWER.load(chunkKey);
    excerpts = chunk.features[String(id)] ? { ...chunk.features[String(id)], strings: chunk.strings } : null;
  } catch (error) {
    excerpts = null; // no records for this layer: scores and explanations only
  }
  if (state.feature === id) renderDetail(feature, excerpts);
}

function renderDetail(feature, excerpts) {
  const metrics = layerData.metrics;
  const parts = [element("h2", { text: `${index.models[state.model].label} · layer ${state.layer} · feature ${feature.id}` })];
  const explanation = firstExplanation(feature, metrics);
  parts.push(element("p", { class: "explanation-text", text: explanation || "(no explanation)" }));
  parts.push(element("p", { class: "muted",
    text: `fires on ${formatPercent(feature.density)} of tokens · max activation ${formatNumber(feature.max)}` }));
  if (metrics.length) {
    parts.push(element("table", { class: "metrics" },
      element("tr", {}, element("th", { text: "metric" }), element("th", { text: "score ×100" }),
        element("th", { text: "status" }), element("th", { text: "explanation" })),
      ...metrics.map((m) => element("tr", {},
        element("td", { text: m }), element("td", { class: "num", text: formatScore(feature.scores[m]) }),
        element("td", { text: feature.status[m] ?? "not scored" }),
        element("td", { text: feature.explanations[m] ?? "" })))));
  }
  if (feature.steering) parts.push(...renderSteering(feature.steering));
  if (excerpts) {
    const scale = Math.max(feature.max ?? 0, ...excerpts.top.flatMap(([, acts]) => acts.map(Math.abs)), 1e-9);
    parts.push(element("h3", { text: "Top activations" }), ...excerpts.top.map((e) => renderExcerpt(e, excerpts.strings, scale)));
    parts.push(element("h3", { text: "Random excerpts" }), ...excerpts.random.map((e) => renderExcerpt(e, excerpts.strings, scale)));
  } else {
    parts.push(element("p", { class: "muted", text: "No activation records for this layer." }));
  }
  $("detail").replaceChildren(...parts);
}

function renderExcerpt([tokens, activations], strings, scale) {
  const box = element("div", { class: "excerpt" });
  tokens.forEach((token, i) => {
    const activation = activations[i];
    const text = strings[token].replace(/\n/g, "↵\n");
    const span = element("span", { class: "tok", text, title: `activation ${activation}`, "data-activation": activation });
    const strength = Math.min(1, Math.abs(activation) / scale);
    if (strength > 0) {
      span.style.backgroundColor = activation > 0 ? `rgba(255, 136, 0, ${strength.toFixed(3)})`
        : `rgba(0, 112, 255, ${strength.toFixed(3)})`;
    }
    box.append(span);
  });
  return box;
}

function renderSteering(effects) {
  const parts = [element("h3", { text: "Steering: this neuron clamped at every position" })];
  for (const effect of effects) {
    const shift = (s) => `${JSON.stringify(s.token)} ${formatPercent(s.before)} → ${formatPercent(s.after)}`;
    const n = Math.max(effect.increased.length, effect.decreased.length);
    const rows = Array.from({ length: n }, (_, i) => element("tr", {},
      element("td", { text: effect.increased[i] ? shift(effect.increased[i]) : "" }),
      element("td", { text: effect.decreased[i] ? shift(effect.decreased[i]) : "" })));
    parts.push(element("p", { class: "muted",
      text: `value ${effect.value} on ${JSON.stringify(effect.prompt)}; KL ${effect.kl_divergence.toFixed(3)} nats` }));
    parts.push(element("table", { class: "steering" },
      element("tr", {}, element("th", { text: "most increased" }), element("th", { text: "most decreased" })), ...rows));
    parts.push(element("div", { class: "excerpt", text: `original: ${effect.prompt}▏${effect.generation}` }));
    parts.push(element("div", { class: "excerpt", text: `steered:  ${effect.prompt}▏${effect.steered_generation}` }));
  }
  return parts;
}

start().catch(showError);
