// The operator's page: compare the base model with a domain's adapter version on one image, and
// activate or roll back versions. Everything goes through the server's public API (see
// docs/serving.md, "Operator's page"): /embed once per image and route, then prompt-only /segment
// requests on the image_id for every prompt change.

import { ApiError, api, getToken, setToken } from "./api.js";
import { PromptSet, attachPointer, describe, drawPrompts } from "./annotator.js";
import { renderAdapters } from "./adapters.js";
import { Panel } from "./panel.js";
import { decodeRle } from "./rle.js";
import { sample } from "./samples.js";

const MAX_SIDE = 1600; // larger images are scaled down in the page before they are sent
const DEBOUNCE_MS = 150; // prompt changes closer together than this make one request per panel
const ACTIVE = "active"; // the version choice that follows the domain's active version

const $ = (selector) => document.querySelector(selector);

const state = {
  status: null, // GET /adapters
  image: null, // {canvas, data: data URL sent to /embed, label}
  embeddings: new Map(), // route -> Promise<{id, adapter}> for the current image
  generation: 0, // bumped by every request round: older answers are dropped
  timer: 0,
  drag: null, // the box being dragged, in image pixels
};

const panels = { base: new Panel($("#panel-base")), adapter: new Panel($("#panel-adapter")) };
const prompts = new PromptSet(promptsChanged);

// -- messages -------------------------------------------------------------------------------------

function showMessage(text, kind = "") {
  const box = $("#message");
  box.textContent = text;
  box.className = `message ${kind}`.trim();
  box.dataset.kind = kind || "info";
  box.hidden = !text;
}

function showError(error) {
  showMessage(error instanceof ApiError ? error.toString() : `error: ${error}`, "error");
}

// -- routes ---------------------------------------------------------------------------------------

/** What the right-hand panel asks for: ``domain`` (its active version) or ``domain@vN``. */
function adapterRoute() {
  const domain = $("#domain").value;
  const version = $("#version").value;
  if (!domain) return null;
  return version === ACTIVE || !version ? domain : `${domain}@v${version}`;
}

function domainRow(domain) {
  return ((state.status && state.status.domains) || []).find((d) => d.domain === domain);
}

function fillDomains() {
  const select = $("#domain");
  const previous = select.value;
  const domains = ((state.status && state.status.domains) || []).filter((d) => (d.versions || []).length);
  select.replaceChildren(...domains.map((d) => new Option(d.domain, d.domain)));
  if (!domains.length) select.append(new Option("(no adapter in the registry)", ""));
  select.disabled = !domains.length;
  if (domains.some((d) => d.domain === previous)) select.value = previous;
  fillVersions();
}

function fillVersions() {
  const select = $("#version");
  const previous = select.value;
  const row = domainRow($("#domain").value);
  const versions = (row && row.versions) || [];
  const options = [new Option(`active (${row && row.serving ? row.serving : "none"})`, ACTIVE)];
  for (const v of versions.slice().reverse()) {
    options.push(new Option(`v${v}${row.active === v ? " (active)" : ""}`, String(v)));
  }
  select.replaceChildren(...options);
  select.disabled = !row;
  // keep the operator's choice; else the newest version, the usual candidate to look at
  if (options.some((o) => o.value === previous)) select.value = previous;
  else if (versions.length) select.value = String(versions[versions.length - 1]);
  updateTitles();
}

function updateTitles() {
  const route = adapterRoute();
  const row = domainRow($("#domain").value);
  let title = route || "no adapter";
  if (route && route.includes("@")) {
    title += row && row.active === Number(route.split("@v")[1]) ? " (active)" : " (preview)";
  } else if (route) {
    title += " (active version)";
  }
  panels.adapter.setTitle(title);
  panels.base.setTitle("base");
}

// -- the adapters table -----------------------------------------------------------------------------

async function refreshAdapters() {
  try {
    state.status = await api.adapters();
  } catch (e) {
    showError(e);
    return;
  }
  const s = state.status;
  const runtime = s.runtime || {};
  const previews = s.previews || { loaded: [], slots: 0 };
  $("#model").textContent = `model ${s.model.name} · ${runtime.runtime || "?"} on ${runtime.device || runtime.providers || "?"}`
    + ` · previews loaded ${previews.loaded.length}/${previews.slots}`;
  const details = new Map();
  await Promise.all((s.domains || []).map(async (d) => {
    try {
      const [versions, control] = await Promise.all([api.versions(d.domain), api.control(d.domain)]);
      details.set(d.domain, { versions, control });
    } catch (e) {
      details.set(d.domain, { error: e instanceof ApiError ? e.toString() : String(e) });
    }
  }));
  fillDomains();
  renderAdapters($("#adapters"), s, details, { onActivate: activate, onRollback: rollback, onCompare: compare });
}

function needToken() {
  if (getToken()) return false;
  showMessage("Type the admin token first (top right): activating and rolling back change what every client gets.",
    "error");
  $("#token").focus();
  return true;
}

async function activate(domain, version) {
  if (needToken()) return;
  try {
    const r = await api.activate(domain, `v${version}`);
    showMessage(`${domain} now serves ${r.serving}${r.previous ? ` (was ${r.previous})` : ""}.`, "ok");
  } catch (e) {
    showError(e);
  }
  await refreshAdapters();
  schedule();
}

async function rollback(domain, freeze) {
  if (needToken()) return;
  try {
    const r = await api.rollback(domain, freeze);
    const frozen = r.control && r.control.frozen ? "; the domain is frozen (the online worker publishes nothing)" : "";
    showMessage(`${domain} rolled back to ${r.serving} (was ${r.previous})${frozen}.`, "ok");
  } catch (e) {
    showError(e);
  }
  await refreshAdapters();
  schedule();
}

function compare(domain, version) {
  $("#domain").value = domain;
  fillVersions();
  $("#version").value = String(version);
  routeChanged();
  $("#panel-adapter").scrollIntoView({ block: "nearest" });
}

// -- image ----------------------------------------------------------------------------------------

function setImage(canvas, label) {
  state.image = { canvas, data: canvas.toDataURL("image/png"), label };
  state.embeddings = new Map();
  prompts.reset();
  state.drag = null;
  for (const p of Object.values(panels)) p.setImage(canvas);
  promptsChanged();
  showMessage(`Image: ${label} (${canvas.width}×${canvas.height}).`);
  // embed for both routes at once: the first prompt then only waits for the decoder
  for (const route of ["base", adapterRoute()]) if (route) embedding(route).catch(() => {});
}

async function loadFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showMessage(`${file.name} is not an image (${file.type}).`, "error");
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showMessage(`Cannot decode ${file.name} in this browser.`, "error");
    return;
  }
  // Drawn and sent as PNG: the server segments exactly the pixels shown here (orientation included).
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  setImage(canvas, scale < 1 ? `${file.name}, scaled from ${bitmap.width}×${bitmap.height}` : file.name);
}

// -- requests -------------------------------------------------------------------------------------

/** The image_id of the current image for ``route`` (one /embed per image and route). */
function embedding(route) {
  let pending = state.embeddings.get(route);
  if (!pending) {
    const { data } = state.image;
    pending = api.embed(data, route).then((r) => {
      // a preview may have loaded (or unloaded) a version on the server: show it in the table
      if (route.includes("@")) refreshAdapters();
      return { id: r.image_id, adapter: r.adapter };
    });
    state.embeddings.set(route, pending);
    pending.catch(() => {
      if (state.embeddings.get(route) === pending) state.embeddings.delete(route);
    });
  }
  return pending;
}

async function segment(panel, route, generation) {
  const fields = prompts.request();
  if (!route) {
    panel.showMask(null);
    panel.setNote("No adapter to compare: the registry has none.");
    return;
  }
  if (!fields) {
    panel.showMask(null);
    panel.setNote("Add a prompt: click or drag on the image.");
    return;
  }
  panel.setNote("…", "busy");
  try {
    let answer;
    let ms;
    for (let attempt = 0; ; attempt += 1) {
      const emb = await embedding(route);
      if (generation !== state.generation) return;
      const t0 = performance.now();
      try {
        answer = await api.segment({ image_id: emb.id, domain: route, multimask: $("#multimask").checked, ...fields });
        ms = performance.now() - t0;
        break;
      } catch (e) {
        // The embedding left the server's cache, or its version was replaced (an activation or a
        // rollback drops the old version's embeddings): embed again, once.
        const stale = e instanceof ApiError && (e.kind === "unknown_image_id" || e.kind === "domain_mismatch");
        if (!stale || attempt > 0 || generation !== state.generation) throw e;
        state.embeddings.delete(route);
      }
    }
    if (generation !== state.generation) return;
    const scores = answer.masks.map((m) => m.score);
    const best = scores.indexOf(Math.max(...scores));
    panel.showMask(decodeRle(answer.masks[best].rle));
    panel.setAnswer(answer, best, ms);
  } catch (e) {
    if (generation === state.generation) panel.setError(e instanceof ApiError ? e.toString() : e);
  }
}

function run() {
  state.generation += 1;
  if (!state.image) return;
  const generation = state.generation;
  segment(panels.base, "base", generation);
  segment(panels.adapter, adapterRoute(), generation);
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(run, DEBOUNCE_MS);
}

function redrawPrompts() {
  for (const p of Object.values(panels)) drawPrompts(p.prompts, prompts.actions, state.drag);
}

function promptsChanged() {
  redrawPrompts();
  $("#prompt-list").replaceChildren(...prompts.actions.map((a) => {
    const li = document.createElement("li");
    li.textContent = describe(a);
    return li;
  }));
  schedule();
}

function routeChanged() {
  updateTitles();
  const route = adapterRoute();
  if (state.image && route) embedding(route).catch(() => {});
  schedule();
}

// -- wiring ---------------------------------------------------------------------------------------

function wire() {
  for (const p of Object.values(panels)) {
    attachPointer(p.prompts, {
      onPoint: (x, y, label) => state.image && prompts.add({ kind: "point", x, y, label }),
      onBox: (box) => state.image && prompts.add({ kind: "box", box }),
      onDrag: (box) => {
        state.drag = box;
        redrawPrompts();
      },
    });
  }
  $("#domain").addEventListener("change", () => {
    fillVersions();
    routeChanged();
  });
  $("#version").addEventListener("change", routeChanged);
  $("#multimask").addEventListener("change", schedule);
  $("#undo").addEventListener("click", () => prompts.undo());
  $("#clear").addEventListener("click", () => prompts.clear());
  $("#refresh").addEventListener("click", refreshAdapters);
  $("#file").addEventListener("change", (e) => loadFile(e.target.files[0]));
  for (const button of document.querySelectorAll("[data-sample]")) {
    button.addEventListener("click", () => setImage(sample(button.dataset.sample), `sample "${button.dataset.sample}"`));
  }

  // drag and drop: on the drop zone and on the panels
  for (const zone of [$("#drop"), ...document.querySelectorAll(".panel")]) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      loadFile(e.dataTransfer.files[0]);
    });
  }
  $("#drop").addEventListener("click", () => $("#file").click());
  $("#drop").addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("#file").click();
    }
  });

  // the admin token: this tab's sessionStorage only
  const token = $("#token");
  token.value = getToken();
  token.addEventListener("input", () => setToken(token.value.trim()));
  $("#token-form").addEventListener("submit", (e) => e.preventDefault());
  $("#token-forget").addEventListener("click", () => {
    token.value = "";
    setToken("");
  });

  // keyboard, as annotation tools: z / Ctrl+Z undo, Esc / c clear, m multimask (not while typing)
  document.addEventListener("keydown", (e) => {
    if (e.target.closest("input, select, textarea")) return;
    const plain = !e.ctrlKey && !e.metaKey && !e.altKey;
    if ((e.key === "z" || e.key === "Z") && !e.altKey && !e.shiftKey) {
      prompts.undo();
    } else if (e.key === "Escape" || (e.key === "c" && plain)) {
      prompts.clear();
    } else if (e.key === "m" && plain) {
      $("#multimask").checked = !$("#multimask").checked;
      schedule();
    } else {
      return;
    }
    e.preventDefault();
  });
  // prompts are drawn at a constant on-screen size: redraw when the layout scales the canvases
  window.addEventListener("resize", redrawPrompts);
}

wire();
updateTitles();
refreshAdapters();
