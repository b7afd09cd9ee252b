// comfyui-asuka frontend extension: plain JavaScript, no build step.
//
// After a run, the MAE Prior node shows what the prior sees (the patches it does not look
// at tinted pink) beside the MAE's own reconstruction, and the Masked Decode node shows its
// result with a toggle that lays the outline of the hole over it. The pictures come from the
// nodes' "asuka_preview" ui output (nodes/previews.py); without this file nothing changes.
// It also lists the pack's templates in their numbered order.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const UI_KEY = "asuka_preview";
const WIDGET = "asuka_preview";
const CAPTIONS = {
  prior_view: "What the prior sees (pink: hidden)",
  reconstruction: "MAE reconstruction",
  result: "Result",
};

function viewUrl(entry) {
  const params = new URLSearchParams({
    filename: entry.filename, subfolder: entry.subfolder || "", type: entry.type || "temp",
  });
  return api.apiURL(`/view?${params}`);
}

function element(tag, className, style) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (style) Object.assign(el.style, style);
  return el;
}

// One DOM widget per node, never saved with the workflow nor sent with the prompt.
function previewBox(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const box = element("div", "asuka-preview", {
      display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
      overflow: "hidden", font: "12px sans-serif", color: "#ddd",
    });
    widget = node.addDOMWidget(WIDGET, "asuka-preview", box, { serialize: false, hideOnZoom: false });
    widget.serialize = false;
    widget.computeSize = (width) => [width, 230];
    node.setSize([Math.max(node.size[0], 340), node.computeSize()[1]]);
  }
  widget.element.replaceChildren();
  return widget.element;
}

function figure(entry, extraStyle) {
  const fig = element("figure", `asuka-${entry.role}`, {
    margin: "0", flex: "1 1 0", minWidth: "0", display: "flex", flexDirection: "column", alignItems: "center",
  });
  const frame = element("div", "asuka-frame", { position: "relative", width: "100%", flex: "1 1 0", minHeight: "0" });
  const img = element("img", "asuka-image", {
    position: "absolute", inset: "0", width: "100%", height: "100%", objectFit: "contain", ...extraStyle,
  });
  img.src = viewUrl(entry);
  img.alt = CAPTIONS[entry.role] || entry.role;
  frame.append(img);
  const caption = element("figcaption", null, { textAlign: "center", padding: "2px 0" });
  caption.textContent = CAPTIONS[entry.role] || entry.role;
  fig.append(frame, caption);
  return { fig, frame };
}

function showPrior(node, entries) {
  const box = previewBox(node);
  const row = element("div", "asuka-row", { display: "flex", gap: "6px", flex: "1 1 0", minHeight: "0" });
  for (const role of ["prior_view", "reconstruction"]) {
    const entry = entries.find((e) => e.role === role);
    if (entry) row.append(figure(entry).fig);
  }
  box.append(row);
}

function showDecode(node, entries) {
  const result = entries.find((e) => e.role === "result");
  const outline = entries.find((e) => e.role === "outline");
  if (!result) return;
  const box = previewBox(node);
  const { fig, frame } = figure(result);
  fig.style.flex = "1 1 0";
  fig.style.minHeight = "0";
  box.append(fig);
  if (!outline) return;
  const layer = figure(outline, { pointerEvents: "none" });
  const overlay = layer.frame.firstChild;
  overlay.classList.add("asuka-outline");
  overlay.style.display = node.asukaShowOutline ? "" : "none";
  frame.append(overlay);
  const label = element("label", "asuka-toggle", { display: "flex", gap: "6px", alignItems: "center" });
  const toggle = element("input");
  toggle.type = "checkbox";
  toggle.checked = !!node.asukaShowOutline;
  toggle.addEventListener("change", () => {
    node.asukaShowOutline = toggle.checked;
    overlay.style.display = toggle.checked ? "" : "none";
  });
  label.append(toggle, document.createTextNode("Show the outline of the hole"));
  box.append(label);
}

const SHOW = { ASUKA_MAEPrior: showPrior, ASUKA_MaskedDecode: showDecode };

// ComfyUI lists a pack's templates in the order its folder happens to give them; the pack's
// file names are numbered titles (scripts/workflows.py), so sorting them puts them in the
// order a new user should try them. Only this pack's list is touched.
const FIRST_TEMPLATE = "1. Remove an object with ASUKA on FLUX.1-Fill";
const getWorkflowTemplates = api.getWorkflowTemplates?.bind(api);
if (getWorkflowTemplates) {
  api.getWorkflowTemplates = async function () {
    const templates = await getWorkflowTemplates();
    for (const names of Object.values(templates || {})) {
      if (Array.isArray(names) && names.includes(FIRST_TEMPLATE)) names.sort((a, b) => a.localeCompare(b));
    }
    return templates;
  };
}

app.registerExtension({
  name: "comfyui-asuka.previews",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const show = SHOW[nodeData.name];
    if (!show) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const entries = output?.[UI_KEY];
      if (Array.isArray(entries) && entries.length) show(this, entries);
    };
  },
});
