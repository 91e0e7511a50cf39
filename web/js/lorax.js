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
]);
const WIDGET_NAME = "lorax_report";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    // Display only: never sent to Python, never part of the saved widget values.
    widget.serialize = false;
    widget.options = { ...(widget.options ?? {}), serialize: false };
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
  },
});
