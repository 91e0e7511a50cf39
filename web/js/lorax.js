// LoRA-X for ComfyUI: show each node's report text (the `text` of its UI output) on the node.
// The stock frontend renders images for any node but text only for its own preview node, so
// the transfer report, similarity summary and save location would otherwise stay invisible.
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
]);
const WIDGET_NAME = "lorax_report";
// The last report is also kept in the node's properties, which are saved with the workflow: after a
// page reload (or reopening the workflow) the box shows it again, even when the next run serves the
// node from ComfyUI's cache.
const REPORT_PROPERTY = "lorax_report";
// The report box's minimum height: one text line per report line, between REPORT_MIN_LINES
// (room for a short report that wraps, like a saved file's path) and REPORT_MAX_LINES (longer
// reports scroll). Without it the frontend's default minimum (about three lines) wins and
// computeSize() never grows the node, so a 60-layer transfer report shows only its header.
const REPORT_LINE_PX = 14;
const REPORT_MIN_LINES = 3;
const REPORT_MAX_LINES = 10;
const REPORT_PADDING_PX = 8;

function reportMinHeight(text) {
  const count = String(text ?? "").split("\n").length;
  const lines = Math.min(Math.max(count, REPORT_MIN_LINES), REPORT_MAX_LINES);
  return lines * REPORT_LINE_PX + REPORT_PADDING_PX;
}

function showText(node, text, { remember = true } = {}) {
  if (remember) {
    node.properties = node.properties ?? {};
    node.properties[REPORT_PROPERTY] = text;
  }
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
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    node.setDirtyCanvas(true, true);
  });
}

app.registerExtension({
  name: "lorax.reportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!LORAX_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      onConfigure?.apply(this, arguments);
      const saved = info?.properties?.[REPORT_PROPERTY];
      if (typeof saved === "string" && saved.length) showText(this, saved, { remember: false });
    };
  },
});
