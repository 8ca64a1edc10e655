// The adapters table: per domain its versions (GET /adapters/{domain}/versions: each version's
// adapter.json summary), which one is active, what this replica serves and previews, the metrics
// recorded when the version was made, its lineage, and buttons to compare, activate and roll back.
// Built with DOM calls only (textContent): nothing from the server is parsed as HTML.

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== "") node.append(c);
  return node;
}

const badge = (text, kind, title) => el("span", { className: `badge ${kind}`, title: title || "" }, text);

function fmtDate(text) {
  if (!text) return "";
  const d = new Date(text);
  return Number.isNaN(d.getTime()) ? String(text) : d.toISOString().slice(0, 16).replace("T", " ");
}

/** "mIoU 0.695 → 0.754 (+0.059)" from the ``metrics`` that `wesam adapt` or the online worker wrote. */
function fmtMetrics(metrics) {
  if (!metrics || typeof metrics !== "object") return "";
  const cell = el("span", { title: metrics.measured_on ? `measured on ${metrics.measured_on}` : "" });
  const before = metrics.before || {};
  const after = metrics.after || {};
  const parts = [];
  for (const key of ["miou", "f1"]) {
    const a = after[key];
    const b = before[key];
    if (typeof a !== "number") continue;
    const label = key === "miou" ? "mIoU" : "F1";
    if (parts.length) parts.push(" · ");
    if (typeof b === "number") {
      const d = a - b;
      parts.push(`${label} ${b.toFixed(3)} → ${a.toFixed(3)} `,
        el("span", { className: d >= 0 ? "up" : "down" }, `(${d >= 0 ? "+" : ""}${d.toFixed(3)})`));
    } else {
      parts.push(`${label} ${a.toFixed(3)}`);
    }
  }
  if (!parts.length) {
    // another layout: show its numbers as they are
    const flat = Object.entries(metrics).filter(([, v]) => typeof v === "number").slice(0, 4);
    parts.push(flat.map(([k, v]) => `${k} ${v.toFixed(3)}`).join(" · "));
  }
  if (metrics.gate && typeof metrics.gate === "object" && "pass" in metrics.gate) {
    parts.push(" · ", badge(metrics.gate.pass ? "gate passed" : "gate failed", metrics.gate.pass ? "active" : "error"));
  }
  cell.append(...parts);
  return cell;
}

function fmtLineage(lineage) {
  if (!lineage) return "root (wesam adapt)";
  const parts = [`parent ${lineage.parent || "base"}`];
  if (lineage.round !== null && lineage.round !== undefined) parts.push(`round ${lineage.round}`);
  if (lineage.samples !== null && lineage.samples !== undefined) parts.push(`${lineage.samples} samples`);
  if (lineage.pinned) parts.push(`pinned ${lineage.pinned}`);
  if (lineage.gate !== null && lineage.gate !== undefined) parts.push(lineage.gate ? "gate ✓" : "gate ✗");
  return parts.join(" · ");
}

function versionRow(domain, row, handlers) {
  const state = el("td", {});
  if (row.active) state.append(badge("● active", "active", "routing.json names this version"));
  if (row.serving && !row.active) state.append(badge("serving", "warn", "loaded here, though routing names another"));
  if (row.previewed) state.append(badge("preview loaded", "preview"));
  if (row.error) state.append(badge("unreadable", "error", row.error));
  const compare = el("button", { type: "button", textContent: "Compare",
    ariaLabel: `Compare ${row.adapter} with the base model` });
  compare.addEventListener("click", () => handlers.onCompare(domain, row.version));
  const activate = el("button", { type: "button", className: "activate", textContent: "Activate",
    disabled: Boolean(row.active), ariaLabel: `Activate ${row.adapter}` });
  activate.addEventListener("click", () => handlers.onActivate(domain, row.version));
  return el("tr", { className: row.active ? "active" : "", dataset: { adapter: row.adapter, active: String(Boolean(row.active)) } },
    el("td", {}, `v${row.version}`),
    state,
    el("td", {}, fmtDate(row.created)),
    el("td", {}, [row.method, row.prompt].filter(Boolean).join(" / ")),
    el("td", { className: "num" }, fmtMetrics(row.metrics)),
    el("td", {}, fmtLineage(row.lineage)),
    el("td", {}, el("div", { className: "row" }, compare, activate)));
}

function domainBlock(entry, info, handlers) {
  const { domain } = entry;
  const head = el("div", { className: "domain-head" }, el("h3", {}, domain));
  head.append(el("span", { className: "muted" }, entry.serving ? `serving ${entry.serving}` : "nothing served"));
  if (entry.error) head.append(badge(`refused v${entry.error.version}`, "error", entry.error.error));
  const control = info.control && info.control.control;
  if (control && control.frozen) head.append(badge("frozen", "frozen", control.reason || "the online worker publishes nothing"));
  if (control && control.pinned) head.append(badge(`pinned v${control.pinned}`, "warn"));
  const freeze = el("input", { type: "checkbox", checked: true, id: `freeze-${domain}` });
  const rollback = el("button", { type: "button", className: "rollback", textContent: "Roll back",
    ariaLabel: `Roll back ${domain} to the previous version` });
  rollback.addEventListener("click", () => handlers.onRollback(domain, freeze.checked));
  head.append(rollback, el("label", { className: "check", htmlFor: freeze.id }, freeze,
    "and freeze (the online worker then publishes nothing)"));

  const block = el("div", { className: "domain", dataset: { domain } }, head);
  if (info.error) {
    block.append(el("p", { className: "message error" }, String(info.error)));
    return block;
  }
  const rows = (info.versions && info.versions.versions) || [];
  const table = el("table", {},
    el("caption", { className: "sr-only" }, `Versions of ${domain}`),
    el("thead", {}, el("tr", {}, ...["Version", "State", "Created (UTC)", "Method", "Metrics", "Lineage", "Actions"]
      .map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...rows.slice().reverse().map((row) => versionRow(domain, row, handlers))));
  block.append(table);
  return block;
}

/** Render ``status`` (GET /adapters) with ``details`` (domain -> {versions, control, error}). */
export function renderAdapters(container, status, details, handlers) {
  const domains = (status && status.domains) || [];
  if (!domains.length) {
    container.replaceChildren(el("p", { className: "muted" },
      status && status.registry ? `No adapter in ${status.registry}.` : "This server runs without a registry."));
    return;
  }
  container.replaceChildren(...domains.map((d) => domainBlock(d, details.get(d.domain) || {}, handlers)));
}
