// selma.review — the review gallery of SELMA Review Dataset: thumbnail, caption, CLIP score and
// keep state of every image; a click keeps or rejects it. Choices go to the server through
// /selma/dataset/review and are saved in the dataset's metadata.jsonl ("review"), which training
// follows over the filter. Optional: without web/ the node still passes the dataset on.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chain } from "./selma_common.js";

const NODE = "SelmaReviewDataset";
const STYLE_ID = "selma-review-style";

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = `
    .selma-review { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 6px;
      overflow-y: auto; max-height: 100%; padding: 4px; box-sizing: border-box; font: 10px sans-serif; }
    .selma-card { border: 2px solid #16a34a; border-radius: 4px; cursor: pointer; background: #222; color: #ddd; }
    .selma-card.rejected { border-color: #dc2626; opacity: 0.55; }
    .selma-card img { width: 100%; display: block; image-rendering: pixelated; }
    .selma-card .cap { padding: 2px 3px; max-height: 3.6em; overflow: hidden; }
    .selma-card .meta { padding: 0 3px 2px; color: #9ca3af; }`;
  document.head.appendChild(style);
}

async function fetchRows(dataset) {
  const res = await api.fetchApi(`/selma/dataset/rows?dataset=${encodeURIComponent(dataset)}`);
  if (!res.ok) throw new Error(await res.text());
  return (await res.json()).rows;
}

function card(dataset, row) {
  const el = document.createElement("div");
  el.className = "selma-card";
  el.dataset.file = row.file_name;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.src = api.apiURL(`/selma/dataset/image?dataset=${encodeURIComponent(dataset)}&file=${encodeURIComponent(row.file_name)}`);
  const cap = document.createElement("div");
  cap.className = "cap";
  cap.textContent = row.text ?? "";
  const meta = document.createElement("div");
  meta.className = "meta";
  const paint = (r) => {
    el.classList.toggle("rejected", !r.effective_keep);
    const score = typeof r.clip_score === "number" ? r.clip_score.toFixed(3) : "–";
    meta.textContent = `${score} · ${r.effective_keep ? "keep" : "reject"}${r.review ? " (you)" : ""}`;
    el.title = `${r.file_name}\n${r.text ?? ""}`;
  };
  paint(row);
  el.addEventListener("click", async () => {
    const review = row.effective_keep ? "reject" : "keep";
    const res = await api.fetchApi("/selma/dataset/review", {
      method: "POST",
      body: JSON.stringify({ dataset, file: row.file_name, review }),
    });
    if (!res.ok) {
      app.extensionManager?.toast?.add({ severity: "error", summary: "SELMA review", detail: await res.text(), life: 6000 });
      return;
    }
    Object.assign(row, await res.json());
    paint(row);
  });
  el.append(img, cap, meta);
  return el;
}

async function showGallery(node, dataset) {
  ensureStyle();
  if (!node.selmaGallery) {
    const root = document.createElement("div");
    root.className = "selma-review";
    node.selmaGallery = node.addDOMWidget("gallery", "selma_review", root, { serialize: false, hideOnZoom: false });
    node.selmaGallery.serialize = false;  // litegraph's own flag: keep it out of the saved widgets_values
    node.setSize([Math.max(node.size[0], 520), Math.max(node.size[1], 420)]);
  }
  const root = node.selmaGallery.element;
  root.replaceChildren();
  try {
    for (const row of await fetchRows(dataset)) root.appendChild(card(dataset, row));
  } catch (e) {
    root.textContent = `Cannot open ${dataset}: ${e.message}`;
  }
  app.graph.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "selma.review",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chain(nodeType.prototype, "onExecuted", function (message) {
      const dataset = message?.selma_review?.[0];
      if (dataset) showGallery(this, dataset);
    });
  },
});
