// Shared by SELMA's web extensions: strings in English and Japanese (chosen by the frontend's Comfy.Locale),
// durations, and wrapping a LiteGraph callback. Registers no extension itself.
import { app } from "../../../scripts/app.js";

const STRINGS = {
  en: {
    "stage.prompts": "prompts", "stage.render": "render", "stage.filter": "filter", "stage.train": "train",
    "stage.merge": "merge", "stage.eval": "evaluate",
    step: "step {step}/{total}", eta: "ETA {eta}", etaUnknown: "ETA …", done: "done in {elapsed}", loss: "loss {loss}",
    weights: "Weights", preview: "Merge preview", previewing: "merging…", noNames: "List experts in lora_names, one a line.",
    wired: "Wired experts are not in the preview.",
  },
  ja: {
    "stage.prompts": "プロンプト生成", "stage.render": "描画", "stage.filter": "選別", "stage.train": "学習",
    "stage.merge": "マージ", "stage.eval": "評価",
    step: "ステップ {step}/{total}", eta: "残り {eta}", etaUnknown: "残り …", done: "完了 {elapsed}", loss: "損失 {loss}",
    weights: "重み", preview: "マージのプレビュー", previewing: "マージ中…", noNames: "lora_names にエキスパートを1行に1つ書いてください。",
    wired: "接続されたエキスパートはプレビューに含まれません。",
  },
};

export function locale() {
  let value;
  try {
    value = app.extensionManager?.setting?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale");
  } catch {
    value = undefined;
  }
  return String(value || navigator.language || "en").toLowerCase().startsWith("ja") ? "ja" : "en";
}

/** The string `key` in the UI's language with {name} placeholders filled from `values`. */
export function t(key, values = {}) {
  const table = STRINGS[locale()];
  const text = table[key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

/** 75 -> "1:15", 3725 -> "1:02:05", 8.4 -> "8 s". */
export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${r}` : `${m}:${r}`;
}

/** Wrap `obj[name]` so that `fn` runs after the original (never replacing another extension's callback). */
export function chain(obj, name, fn) {
  const original = obj[name];
  obj[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}
