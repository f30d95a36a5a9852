// selma.progress — live progress on the SELMA node that runs a long stage: stage (and expert or skill),
// step/total, ETA and, while training, a loss sparkline. The server sends throttled `selma.progress`
// websocket events: {node, prompt_id, stage, label, step, total, elapsed_s, eta_s, loss} (see
// selma_backend/progress.py); each node listens for its own id only and stops listening when removed.
// Inside a subgraph the server names a node by its execution path, "<instance>:<instance>:…:<id>": the
// node shows the event when that path leads from the root graph to its own graph.
// Optional: without web/ the progress bar of ComfyUI itself still moves.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chain, duration, t } from "./selma_common.js";

const EVENT = "selma.progress";
const STYLE_ID = "selma-progress-style";
const MAX_POINTS = 500;
/** Nodes listening for progress now (what onRemoved must bring back down). */
const listening = new Set();

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = `
    .selma-progress { font: 11px sans-serif; color: #ddd; padding: 2px 4px; box-sizing: border-box; }
    .selma-progress .head { font-weight: bold; }
    .selma-progress .row span + span::before { content: " · "; color: #888; }
    .selma-progress canvas { width: 100%; height: 28px; display: block; }`;
  document.head.appendChild(style);
}

function span(cls) {
  const el = document.createElement("span");
  el.className = cls;
  return el;
}

function createView(node) {
  ensureStyle();
  const root = document.createElement("div");
  root.className = "selma-progress";
  const head = document.createElement("div");
  head.className = "head";
  const row = document.createElement("div");
  row.className = "row";
  const parts = { step: span("step"), eta: span("eta"), loss: span("loss") };
  row.append(parts.step, parts.eta, parts.loss);
  const canvas = document.createElement("canvas");
  canvas.className = "sparkline";
  canvas.width = 240;
  canvas.height = 28;
  canvas.dataset.points = "0";
  root.append(head, row, canvas);
  const widget = node.addDOMWidget("selma_progress", "selma_progress", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 64, getMaxHeight: () => 64,
  });
  widget.serialize = false;  // litegraph's own flag: keep it out of the saved widgets_values
  node.setSize([Math.max(node.size[0], 260), node.size[1] + 70]);
  return { widget, root, head, parts, canvas, points: [], run: null };
}

function drawSparkline(canvas, points) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.points = String(points.length);
  canvas.style.display = points.length ? "block" : "none";
  if (points.length < 2) return;
  const lo = Math.min(...points), hi = Math.max(...points), span_ = hi - lo || 1;
  const x = (i) => 2 + (i * (canvas.width - 4)) / (points.length - 1);
  const y = (v) => canvas.height - 3 - ((v - lo) * (canvas.height - 6)) / span_;
  ctx.strokeStyle = "#4ade80";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.stroke();
}

function show(node, d) {
  const view = (node.selmaProgress ??= createView(node));
  const run = `${d.prompt_id}|${d.stage}|${d.label ?? ""}`;
  if (run !== view.run) {
    view.run = run;
    view.points = [];
  }
  if (typeof d.loss === "number" && Number.isFinite(d.loss)) {
    view.points.push(d.loss);
    if (view.points.length > MAX_POINTS) view.points.splice(0, view.points.length - MAX_POINTS);
  }
  const stage = t(`stage.${d.stage}`) === `stage.${d.stage}` ? d.stage : t(`stage.${d.stage}`);
  view.head.textContent = d.label ? `${stage} · ${d.label}` : stage;
  view.parts.step.textContent = t("step", { step: d.step, total: d.total });
  const finished = d.step >= d.total;  // 0/0: nothing was left to do (all on disk already)
  view.parts.eta.textContent = finished ? t("done", { elapsed: duration(d.elapsed_s ?? 0) })
    : typeof d.eta_s === "number" ? t("eta", { eta: duration(d.eta_s) }) : t("etaUnknown");
  view.parts.loss.textContent = typeof d.loss === "number" ? t("loss", { loss: d.loss.toPrecision(4) }) : "";
  view.parts.loss.style.display = typeof d.loss === "number" ? "" : "none";
  view.root.dataset.step = String(d.step);
  view.root.dataset.total = String(d.total);
  drawSparkline(view.canvas, view.points);
  node.setDirtyCanvas?.(true, true);
}

/** The graph and local id an execution id names: "12" in the root graph, "3:12" is node 12 of the subgraph
 * that instance 3 of the root graph opens (and so on, one step a ':'); null when the path leads nowhere. */
function executionTarget(executionId) {
  const parts = String(executionId).split(":");
  let graph = app.rootGraph ?? app.graph;
  for (const instanceId of parts.slice(0, -1)) {
    const instance = graph?.getNodeById?.(instanceId);
    if (!instance?.subgraph) return null;
    graph = instance.subgraph;
  }
  return { graph, id: parts[parts.length - 1] };
}

function isFor(node, executionId) {
  const target = executionTarget(executionId);
  return target !== null && target.id === String(node.id) && target.graph === (node.graph ?? target.graph);
}

/** `selma.train`: one record per optimizer step {expert, step, steps, loss, lr} for scripts that follow a
 * run over the websocket. The node display uses `selma.progress`; listening here, once for the app, tells
 * the frontend the message type is known (the newest frontend logs an error for unknown types). */
function onTrainStep() {}

app.registerExtension({
  name: "selma.progress",
  setup() {
    api.addEventListener("selma.train", onTrainStep);
  },
  /** How many nodes listen for `selma.progress` now (the browser tests check removal brings it down). */
  liveListeners: () => listening.size,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.name).startsWith("Selma")) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      const node = this;
      node.selmaOnProgress = (event) => {
        const d = event.detail;
        if (d && d.node != null && isFor(node, d.node)) show(node, d);
      };
      api.addEventListener(EVENT, node.selmaOnProgress);
      listening.add(node);
    });
    chain(nodeType.prototype, "onRemoved", function () {
      if (this.selmaOnProgress) api.removeEventListener(EVENT, this.selmaOnProgress);
      this.selmaOnProgress = null;
      this.selmaProgress = null;
      listening.delete(this);
    });
  },
});
