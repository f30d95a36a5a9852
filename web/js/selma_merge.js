// selma.merge — the merge-weights editor of SELMA Merge Experts: one slider and number box per expert
// listed in `lora_names`, writing the `weights` widget ("0.5, 0.25, 0.25", as the node parses it), and a
// live preview of the merge report from POST /selma/merge/preview (the merge runs in memory on the
// server; nothing is written). Requests are debounced and stale answers ignored.
// Optional: without web/ the `weights` widget is typed by hand.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chain, t } from "./selma_common.js";

const NODE = "SelmaMergeExperts";
const STYLE_ID = "selma-merge-style";
const DEBOUNCE_MS = 400;
const PREVIEW_INPUTS = ["method", "rank", "density", "block_weights", "seed"];

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = `
    .selma-merge { font: 11px sans-serif; color: #ddd; padding: 2px 4px; box-sizing: border-box;
      display: flex; flex-direction: column; gap: 3px; overflow: hidden; height: 100%; }
    .selma-merge .w-row { display: grid; grid-template-columns: 1fr 90px 56px; gap: 4px; align-items: center; }
    .selma-merge .w-row label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
    .selma-merge input[type=number] { width: 52px; background: #222; color: #ddd; border: 1px solid #555; }
    .selma-merge .note { color: #9ca3af; }
    .selma-merge pre { margin: 0; padding: 3px; background: #1a1a1a; overflow: auto; flex: 1; min-height: 60px;
      white-space: pre-wrap; font: 10px monospace; }
    .selma-merge pre.error { color: #f87171; }`;
  document.head.appendChild(style);
}

const widget = (node, name) => node.widgets?.find((w) => w.name === name);
const names = (text) => String(text ?? "").split("\n").map((s) => s.trim()).filter(Boolean);
const fmt = (v) => String(Math.round(v * 1000) / 1000);

function parseWeights(text) {
  const parts = String(text ?? "").replace(/\n/g, ",").replace(/ /g, ",").split(",").filter((p) => p.trim());
  const values = parts.map(Number);
  return values.every(Number.isFinite) ? values : null;
}

class MergeEditor {
  constructor(node) {
    ensureStyle();
    this.node = node;
    this.seq = 0;
    this.timer = null;
    this.built = null;
    this.values = [];
    this.root = document.createElement("div");
    this.root.className = "selma-merge";
    this.title = document.createElement("div");
    this.title.textContent = t("weights");
    this.rows = document.createElement("div");
    this.note = document.createElement("div");
    this.note.className = "note";
    this.preview = document.createElement("pre");
    this.preview.className = "selma-merge-preview";
    this.root.append(this.title, this.rows, this.note, this.preview);
    this.widget = node.addDOMWidget("selma_merge_editor", "selma_merge", this.root, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 220,
    });
    this.widget.serialize = false;  // litegraph's own flag: keep it out of the saved widgets_values
    this.onInput = () => this.refresh();
    this.textarea = widget(node, "lora_names")?.element ?? widget(node, "lora_names")?.inputEl;
    this.textarea?.addEventListener?.("input", this.onInput);
  }

  /** Rebuild the rows if the listed names changed, take the weights widget's values, preview (debounced). */
  refresh() {
    const list = names(widget(this.node, "lora_names")?.value);
    const typed = parseWeights(widget(this.node, "weights")?.value);
    this.values = typed && typed.length === list.length ? typed : list.map(() => (list.length ? 1 / list.length : 0));
    if (this.built !== list.join("\n")) this.build(list);
    this.values.forEach((v, i) => this.show(i, v));
    this.note.textContent = !list.length ? t("noNames") : this.node.inputs?.find((i) => i.name === "experts")?.link != null ? t("wired") : "";
    this.root.dataset.experts = String(list.length);
    this.schedule();
  }

  build(list) {
    this.built = list.join("\n");
    this.rows.replaceChildren(...list.map((name, i) => {
      const row = document.createElement("div");
      row.className = "w-row";
      const label = document.createElement("label");
      label.textContent = name;
      label.title = name;
      const slider = document.createElement("input");
      Object.assign(slider, { type: "range", min: "0", max: "2", step: "0.01", className: "w-slider" });
      const box = document.createElement("input");
      Object.assign(box, { type: "number", step: "0.01", className: "w-value" });
      slider.addEventListener("input", () => this.set(i, Number(slider.value)));
      box.addEventListener("change", () => Number.isFinite(Number(box.value)) && this.set(i, Number(box.value)));
      row.append(label, slider, box);
      return row;
    }));
  }

  show(i, v) {
    const row = this.rows.children[i];
    if (!row) return;
    row.querySelector(".w-slider").value = String(v);
    row.querySelector(".w-value").value = fmt(v);
  }

  /** A weight moved: write the `weights` widget as the node parses it, then preview. */
  set(i, v) {
    this.values[i] = v;
    this.show(i, v);
    const w = widget(this.node, "weights");
    if (w) {
      w.value = this.values.map(fmt).join(", ");
      w.callback?.(w.value);
    }
    this.node.setDirtyCanvas?.(true, true);
    this.schedule();
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.request(), DEBOUNCE_MS);
  }

  body() {
    const value = (name) => widget(this.node, name)?.value;
    return { lora_names: String(value("lora_names") ?? ""), method: value("method"), weights: String(value("weights") ?? ""),
      rank: value("rank"), density: value("density"), block_weights: String(value("block_weights") ?? ""), seed: value("seed") };
  }

  async request() {
    const seq = ++this.seq;
    if (!names(widget(this.node, "lora_names")?.value).length) {
      this.preview.textContent = "";
      return;
    }
    this.preview.dataset.state = "busy";
    this.preview.classList.remove("error");
    let text, ok;
    try {
      const res = await api.fetchApi("/selma/merge/preview", { method: "POST", body: JSON.stringify(this.body()) });
      ok = res.ok;
      text = ok ? (await res.json()).text : await res.text();
    } catch (e) {
      ok = false;
      text = String(e?.message ?? e);
    }
    if (seq !== this.seq) return; // a newer request is on its way: this answer is stale
    this.preview.textContent = `${t("preview")}\n${text}`;
    this.preview.classList.toggle("error", !ok);
    this.preview.dataset.state = ok ? "ok" : "error";
    this.preview.dataset.seq = String(seq);
  }

  dispose() {
    clearTimeout(this.timer);
    this.seq += 1; // answers still on their way are ignored
    this.textarea?.removeEventListener?.("input", this.onInput);
  }
}

app.registerExtension({
  name: "selma.merge",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      const editor = (this.selmaMerge = new MergeEditor(this));
      for (const name of ["lora_names", "weights", ...PREVIEW_INPUTS]) {
        const w = widget(this, name);
        if (w) chain(w, "callback", () => editor.refresh());
      }
      this.setSize([Math.max(this.size[0], 380), Math.max(this.size[1], 480)]);
      editor.refresh();
    });
    chain(nodeType.prototype, "onConfigure", function () {
      this.selmaMerge?.refresh(); // a loaded workflow: its names and weights
    });
    chain(nodeType.prototype, "onConnectionsChange", function () {
      this.selmaMerge?.refresh();
    });
    chain(nodeType.prototype, "onRemoved", function () {
      this.selmaMerge?.dispose();
      this.selmaMerge = null;
    });
  },
});
