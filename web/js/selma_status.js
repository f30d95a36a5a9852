// selma.status — shows SELMA's status messages (warnings such as "out of memory: batch halved",
// stage summaries) as toasts. The server sends them as `selma.status` websocket events:
// {level: "info" | "success" | "warning" | "error", title?: string, text: string}.
// Optional: the pack works without web/.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const SEVERITY = { info: "info", success: "success", warning: "warn", error: "error" };

function showStatus(event) {
  const { level = "info", title = "SELMA", text = "" } = event.detail ?? {};
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity: SEVERITY[level] ?? "info", summary: title, detail: text, life: level === "error" ? 0 : 8000 });
  } else {
    console.info(`[SELMA] ${title}: ${text}`);
  }
}

app.registerExtension({
  name: "selma.status",
  setup() {
    // App-lifetime listener: registered once, never per node, so nothing to remove on node removal.
    api.addEventListener("selma.status", showStatus);
  },
});
