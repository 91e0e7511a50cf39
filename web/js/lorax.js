// LoRA-X for ComfyUI: show each node's report on the node.
//
// * Transfer LoRA and Compute Subspace Similarity send a structured view (`lorax_view` in their UI
//   output, built by nodes/_ui.py): it is drawn as a one-line verdict, the skipped layers first, a
//   per-block heatmap (one cell per layer, grouped the way the model is built; the top of a cell is
//   the outcome, the bottom Φ) with the layer's numbers on hover, and the full text behind a
//   "full report" toggle with a copy button.
// * The other nodes send text only (`text`); it is shown in a read-only text box. The stock frontend
//   renders images for any node but text only for its own preview node, so without this the save
//   location or the refinement's losses would stay invisible.
// Both are kept in the node's properties, which are saved with the workflow: after a page reload
// (or reopening the workflow) the node shows them again, even when the next run serves the node
// from ComfyUI's cache.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const LORAX_NODES = new Set([
  "LoraXLoadSourceModel",
  "LoraXSubspaceSimilarity",
  "LoraXTransferLoRA",
  "LoraXApplyTransferredLoRA",
  "LoraXSaveTransferredLoRA",
  "LoraXRefineTransferredLoRA",
  "LoraXTrainLoRAX",
  "LoraXSaveLoRAX",
  "LoraXCompareTransfer",
]);
const WIDGET_NAME = "lorax_report";
const REPORT_PROPERTY = "lorax_report"; // the text
const VIEW_PROPERTY = "lorax_view"; // the structured view (nodes/_ui.py VIEW_KEY)
const VIEW_VERSION = 1;
// The text box's minimum height: one text line per report line, between REPORT_MIN_LINES
// (room for a short report that wraps, like a saved file's path) and REPORT_MAX_LINES (longer
// reports scroll). Without it the frontend's default minimum (about three lines) wins and
// computeSize() never grows the node.
const REPORT_LINE_PX = 14;
const REPORT_MIN_LINES = 3;
const REPORT_MAX_LINES = 10;
const REPORT_PADDING_PX = 8;

// --------------------------------------------------------------------------- colours and layout

// Transferred layers by method, skipped layers by reason (transfer.SkipReason codes), similarity verdicts.
const OUTCOME_COLOURS = {
  exact: "#2e7d32",
  prolora: "#00897b",
  project: "#1e88e5",
  lorax: "#3949ab",
  align: "#8e24aa",
  copy: "#78909c",
  "skip:below_threshold": "#e53935",
  "skip:width": "#fb8c00",
  "skip:no_partner": "#f9a825",
  "skip:unresolved": "#8d6e63",
  "skip:host_rule": "#a1887f",
  "skip:unsupported": "#6a1b9a",
  "skip:zero": "#bdbdbd",
  "skip:projected_zero": "#9e9e9e",
  pass: "#2e7d32",
  fail: "#e53935",
  "n/a": "#9e9e9e",
};
const OTHER_TRANSFERRED = "#43a047";
const OTHER_SKIPPED = "#b71c1c";
// Φ from 0 to 1 on a perceptually ordered scale (viridis' end points and three stops between).
const PHI_STOPS = [
  [68, 1, 84],
  [59, 82, 139],
  [33, 145, 140],
  [94, 201, 98],
  [253, 231, 37],
];
const NO_PHI = "#555";
// Sections in the order the model is built (nodes/_ui.py layer_place).
const SECTION_ORDER = ["text encoder", "text encoder 2", "input", "middle", "output", "double", "single", "joint",
  "blocks", "other"];
const SECTION_LABELS = { "text encoder": "text enc.", "text encoder 2": "text enc. 2" };
const LABEL_W = 96;
const BLOCK_GAP = 4;
const SECTION_GAP = 6;
const SKIPPED_SHOWN = 6;
const FONT = "11px sans-serif";
const WIDGET_MARGIN = 10;

function outcomeColour(outcome) {
  return OUTCOME_COLOURS[outcome] ?? (String(outcome).startsWith("skip:") ? OTHER_SKIPPED : OTHER_TRANSFERRED);
}

function phiColour(phi) {
  if (phi === null || phi === undefined || !Number.isFinite(phi)) return NO_PHI;
  const t = Math.min(Math.max(phi, 0), 1) * (PHI_STOPS.length - 1);
  const i = Math.min(Math.floor(t), PHI_STOPS.length - 2);
  const f = t - i;
  const [a, b] = [PHI_STOPS[i], PHI_STOPS[i + 1]];
  return `rgb(${a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",")})`;
}

function cellSize(count) {
  if (count <= 120) return 11;
  if (count <= 320) return 8;
  return 6;
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

function el(tag, style = {}, text) {
  const node = document.createElement(tag);
  Object.assign(node.style, style);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Rows of the view as objects (the wire format is one list per layer, columns named once).
function rowsOf(view) {
  const columns = view.columns ?? [];
  return (view.layers ?? []).map((values, index) => {
    const row = { index };
    columns.forEach((name, i) => (row[name] = values[i]));
    return row;
  });
}

function isProblem(row) {
  return String(row.outcome).startsWith("skip:") || row.outcome === "fail" || row.outcome === "n/a";
}

function outcomeLabel(view, outcome) {
  return view.labels?.[outcome] ?? outcome;
}

// Cell positions: one line per section (wrapping when it is wider than the node), cells grouped by block.
function layout(rows, width) {
  const size = cellSize(rows.length);
  const step = size + 1;
  const sections = new Map();
  for (const row of rows) {
    if (!sections.has(row.section)) sections.set(row.section, []);
    sections.get(row.section).push(row);
  }
  const order = [...sections.keys()].sort(
    (a, b) => (SECTION_ORDER.indexOf(a) + 99) % 99 - (SECTION_ORDER.indexOf(b) + 99) % 99 || a.localeCompare(b),
  );
  const cells = [];
  const labels = [];
  const right = Math.max(width, LABEL_W + 10 * step);
  let y = 2;
  for (const section of order) {
    const members = sections.get(section).sort(
      (a, b) => a.block - b.block || String(a.name).localeCompare(String(b.name), undefined, { numeric: true }),
    );
    labels.push({ text: `${SECTION_LABELS[section] ?? section} (${members.length})`, y });
    let x = LABEL_W;
    let block = members[0].block;
    for (const row of members) {
      if (row.block !== block) {
        block = row.block;
        x += BLOCK_GAP;
      }
      if (x + size > right) {
        x = LABEL_W;
        y += step;
      }
      cells.push({ row, x, y, size });
      x += step;
    }
    y += step + SECTION_GAP;
  }
  return { cells, labels, height: Math.max(y, 16), size };
}

// --------------------------------------------------------------------------- the view widget

class ReportView {
  constructor(node) {
    this.node = node;
    this.view = null;
    this.text = "";
    this.height = 80;
    this.root = el("div", {
      display: "flex", flexDirection: "column", gap: "3px", font: FONT, color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)", borderRadius: "4px", padding: "4px 6px", boxSizing: "border-box",
      overflow: "hidden", position: "relative",
    });
    this.root.className = "lorax-view";
    this.verdict = el("div", { fontWeight: "bold", fontSize: "12px" });
    this.verdict.className = "lorax-verdict";
    this.title = el("div", { opacity: 0.7, whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
    this.skipped = el("div", { maxHeight: `${SKIPPED_SHOWN * 14}px`, overflowY: "auto", lineHeight: "14px" });
    this.skipped.className = "lorax-skipped";
    this.canvas = el("canvas", { display: "block", cursor: "crosshair" });
    this.canvas.className = "lorax-heatmap";
    this.legend = el("div", { display: "flex", flexWrap: "wrap", gap: "2px 8px", opacity: 0.9 });
    // The tooltip lives on the page, not in the node: the node's box clips what overflows it.
    this.tip = el("div", {
      position: "fixed", display: "none", pointerEvents: "none", zIndex: 10, maxWidth: "360px",
      background: "rgba(20,20,20,0.95)", color: "#eee", border: "1px solid #666", borderRadius: "3px",
      padding: "3px 5px", whiteSpace: "pre", font: FONT, lineHeight: "14px",
    });
    this.tip.className = "lorax-tip";
    this.details = el("details");
    const summary = el("summary", { cursor: "pointer" }, "full report ");
    this.copy = el("button", { font: FONT, marginLeft: "6px", padding: "0 6px", cursor: "pointer" }, "copy");
    this.copy.className = "lorax-copy";
    this.copy.addEventListener("click", (event) => {
      event.preventDefault();
      event.stopPropagation();
      this.copyText();
    });
    summary.append(this.copy);
    this.pre = el("pre", {
      margin: "2px 0 0", maxHeight: "180px", overflow: "auto", whiteSpace: "pre", font: FONT, userSelect: "text",
    });
    this.details.append(summary, this.pre);
    this.details.addEventListener("toggle", () => this.resize());
    this.root.append(this.verdict, this.title, this.skipped, this.canvas, this.legend, this.details);
    // Each part keeps its own height; the node grows to fit them (resize), nothing is squeezed.
    for (const child of this.root.children) child.style.flexShrink = "0";
    document.body.append(this.tip);
    this.canvas.addEventListener("mousemove", (event) => this.hover(event));
    this.canvas.addEventListener("mouseleave", () => this.hover(null));
    this.cells = [];
    this.lastWidth = 0;
    new ResizeObserver(() => {
      const width = this.root.clientWidth;
      if (width && width !== this.lastWidth) this.draw();
    }).observe(this.root);
  }

  set(view, text) {
    this.view = view;
    this.text = text ?? "";
    this.rows = rowsOf(view);
    this.verdict.textContent = view.verdict ?? "";
    this.title.textContent = view.title ?? "";
    this.title.title = view.title ?? "";
    this.pre.textContent = this.text;
    this.fillSkipped();
    this.fillLegend();
    this.draw();
    // Once more after the browser laid out the new content (a legend that wraps adds a line).
    setTimeout(() => this.resize(), 150);
  }

  fillSkipped() {
    const problems = this.rows.filter(isProblem);
    this.skipped.replaceChildren();
    this.skipped.style.display = problems.length ? "block" : "none";
    for (const row of problems) {
      const line = el("div", { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
      const swatch = el("span", {
        display: "inline-block", width: "8px", height: "8px", marginRight: "4px", background: outcomeColour(row.outcome),
      });
      line.append(swatch, `${row.name} — ${outcomeLabel(this.view, row.outcome)}`);
      line.title = row.reason || outcomeLabel(this.view, row.outcome);
      this.skipped.append(line);
    }
  }

  fillLegend() {
    const counts = new Map();
    for (const row of this.rows) counts.set(row.outcome, (counts.get(row.outcome) ?? 0) + 1);
    this.legend.replaceChildren();
    for (const [outcome, n] of counts) {
      const item = el("span", { whiteSpace: "nowrap" });
      item.append(el("span", {
        display: "inline-block", width: "8px", height: "8px", marginRight: "3px", background: outcomeColour(outcome),
      }), `${outcomeLabel(this.view, outcome)} ${n}`);
      this.legend.append(item);
    }
    const scale = el("span", { whiteSpace: "nowrap" }, "Φ 0 ");
    scale.append(el("span", {
      display: "inline-block", width: "50px", height: "8px", verticalAlign: "middle",
      background: `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(phiColour).join(",")})`,
    }), " 1 (cell bottom)");
    this.legend.append(scale);
  }

  draw() {
    if (!this.view) return;
    const width = this.root.clientWidth - 12 || Math.max(this.node.size[0] - 30, 300);
    this.lastWidth = this.root.clientWidth;
    const { cells, labels, height } = layout(this.rows, width);
    this.cells = cells;
    const ratio = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = FONT;
    ctx.textBaseline = "top";
    ctx.fillStyle = getComputedStyle(this.root).color || "#ddd";
    for (const label of labels) ctx.fillText(label.text, 0, label.y, LABEL_W - 4);
    for (const { row, x, y, size } of cells) {
      const top = Math.ceil(size * 0.6);
      ctx.fillStyle = outcomeColour(row.outcome);
      ctx.fillRect(x, y, size, top);
      ctx.fillStyle = phiColour(row.phi);
      ctx.fillRect(x, y + top, size, size - top);
    }
    this.resize();
  }

  cellAt(x, y) {
    return this.cells.find((c) => x >= c.x && x < c.x + c.size && y >= c.y && y < c.y + c.size) ?? null;
  }

  describe(row) {
    const lines = [row.name, `${outcomeLabel(this.view, row.outcome)}   (${row.section}, block ${row.block})`];
    lines.push(`Φ ${fmt(row.phi)}  (left ${fmt(row.phi_left)}, right ${fmt(row.phi_right)})`);
    lines.push(`chance ${fmt(row.chance)}   threshold ${fmt(row.threshold)}`);
    if (this.view.kind === "transfer") {
      lines.push(`energy kept ${fmt(row.energy_kept)}   rank ${row.output_rank ?? "n/a"}`);
    }
    if (row.model_key && row.model_key !== row.name) lines.push(`model key ${row.model_key}`);
    if (row.reason) lines.push(row.reason);
    return lines.join("\n");
  }

  hover(event) {
    if (!event) {
      this.tip.style.display = "none";
      return;
    }
    const box = this.canvas.getBoundingClientRect();
    const scale = box.width ? this.canvas.offsetWidth / box.width : 1; // the canvas may be zoomed
    const x = (event.clientX - box.left) * scale;
    const y = (event.clientY - box.top) * scale;
    const cell = this.cellAt(x, y);
    if (!cell) {
      this.tip.style.display = "none";
      return;
    }
    this.tip.textContent = this.describe(cell.row);
    this.tip.dataset.index = String(cell.row.index);
    this.tip.style.display = "block";
    this.tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 370)}px`;
    this.tip.style.top = `${event.clientY + 14}px`;
  }

  copyText() {
    const done = () => {
      this.copy.textContent = "copied";
      setTimeout(() => (this.copy.textContent = "copy"), 1500);
    };
    if (navigator.clipboard?.writeText) {
      navigator.clipboard.writeText(this.text).then(done, () => this.copyBySelection(done));
    } else {
      this.copyBySelection(done);
    }
  }

  copyBySelection(done) {
    // Pages served over plain http (not localhost) have no clipboard API.
    const area = el("textarea", { position: "fixed", opacity: 0 });
    area.value = this.text;
    document.body.append(area);
    area.select();
    try {
      if (document.execCommand("copy")) done();
    } finally {
      area.remove();
    }
  }

  contentHeight() {
    // Padding, plus the frontend's margin around a DOM widget (BaseDOMWidgetImpl.DEFAULT_MARGIN, above and below).
    let height = 8 + 2 * WIDGET_MARGIN;
    for (const child of this.root.children) {
      if (child.style.display === "none") continue;
      height += child.offsetHeight + 3;
    }
    return height;
  }

  resize() {
    requestAnimationFrame(() => {
      const wanted = this.contentHeight();
      if (Math.abs(wanted - this.height) < 2) return;
      this.height = wanted;
      const size = this.node.computeSize();
      this.node.setSize([Math.max(this.node.size[0], size[0]), size[1]]);
      this.node.setDirtyCanvas(true, true);
    });
  }
}

function remember(node, key, value) {
  node.properties = node.properties ?? {};
  node.properties[key] = value;
}

function showView(node, view, text, { save = true } = {}) {
  if (save) {
    remember(node, VIEW_PROPERTY, view);
    remember(node, REPORT_PROPERTY, text);
  }
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget && !widget.loraxView) {
    // A text box from an older run (or an older version of the pack): the view replaces it.
    widget.onRemove?.();
    node.widgets.splice(node.widgets.indexOf(widget), 1);
    widget = null;
  }
  if (!widget) {
    const report = new ReportView(node);
    widget = node.addDOMWidget(WIDGET_NAME, "lorax_view", report.root, {
      serialize: false,
      hideOnZoom: false,
      margin: WIDGET_MARGIN,
      getValue: () => report.text,
      setValue: () => {},
      getMinHeight: () => report.height,
      getMaxHeight: () => report.height,
    });
    widget.serialize = false;
    const onRemove = widget.onRemove;
    widget.onRemove = function () {
      report.tip.remove();
      return onRemove?.apply(this, arguments);
    };
    widget.loraxView = report;
    report.root.loraxView = report; // for the browser test and for debugging in the console
    if (node.size[0] < 440) node.setSize([440, node.size[1]]);
  }
  widget.loraxView.set(view, text);
}

function reportMinHeight(text) {
  const count = String(text ?? "").split("\n").length;
  const lines = Math.min(Math.max(count, REPORT_MIN_LINES), REPORT_MAX_LINES);
  return lines * REPORT_LINE_PX + REPORT_PADDING_PX;
}

function showText(node, text, { save = true } = {}) {
  if (save) remember(node, REPORT_PROPERTY, text);
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    // Display only: never sent to Python, never part of the saved widget values.
    widget.serialize = false;
    widget.options = {
      ...(widget.options ?? {}),
      serialize: false,
      getMinHeight: () => reportMinHeight(widget.value),
    };
  }
  if (widget.loraxView) {
    widget.loraxView.set(widget.loraxView.view, text); // a text-only message: keep the last view
    return;
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    node.setDirtyCanvas(true, true);
  });
}

function usableView(view) {
  return view && typeof view === "object" && view.v === VIEW_VERSION && Array.isArray(view.layers);
}

app.registerExtension({
  name: "lorax.reportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!LORAX_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.length ? message.text.join("\n") : "";
      const view = message?.lorax_view?.[0];
      if (usableView(view)) showView(this, view, text);
      else if (text) showText(this, text);
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      onConfigure?.apply(this, arguments);
      const view = info?.properties?.[VIEW_PROPERTY];
      const text = info?.properties?.[REPORT_PROPERTY];
      if (usableView(view)) showView(this, view, typeof text === "string" ? text : "", { save: false });
      else if (typeof text === "string" && text.length) showText(this, text, { save: false });
    };
  },
});
