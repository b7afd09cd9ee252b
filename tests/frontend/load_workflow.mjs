// Loads a workflow JSON into ComfyUI's real frontend in headless Chromium and reports
// what the frontend made of it; optionally saves a screenshot of the graph.
//
//   node load_workflow.mjs <server url> <workflow.json> [screenshot.png|.jpg]
//
// Prints one JSON line: {nodes, missing, errors, types}. Exit code 0 when it loaded.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [server, workflowPath, shot] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "asuka-chromium-")), {
  executablePath,
  headless: true,
  viewport: { width: 2000, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"],
});
const errors = [];
try {
  const page = browser.pages()[0] || (await browser.newPage());
  page.on("pageerror", (e) => errors.push(String(e)));
  // a fresh profile would open the template browser and the minimap over the canvas
  for (const [id, value] of [["Comfy.TutorialCompleted", true], ["Comfy.Minimap.Visible", false]]) {
    await fetch(`${server}/settings/${id}`, { method: "POST", body: JSON.stringify(value) }).catch(() => {});
  }
  await page.goto(server, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  const result = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    const registered = window.LiteGraph.registered_node_types;
    return {
      nodes: nodes.length,
      types: nodes.map((n) => n.type),
      missing: nodes.filter((n) => !registered[n.type]).map((n) => n.type),
    };
  }, workflow);
  if (shot) {
    await page.waitForTimeout(1500);
    // a new profile opens the template browser and a banner over the canvas: dismiss them
    for (let i = 0; i < 3; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(300); }
    await page.evaluate(() => {
      // close any dialog and fit the whole graph in view
      document.querySelectorAll(".p-dialog-close-button, .comfy-modal-close").forEach((b) => b.click());
      const canvas = window.app.canvas;
      if (canvas && canvas.ds && window.app.graph) {
        const nodes = window.app.graph._nodes || window.app.graph.nodes;
        let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
        for (const n of nodes) {
          x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
          x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        // leave room for the side bar (left) and the menu bars (top)
        const w = canvas.canvas.clientWidth - 100, h = canvas.canvas.clientHeight - 160;
        const scale = Math.min(w / (x1 - x0), h / (y1 - y0));
        canvas.ds.scale = scale;
        canvas.ds.offset = [-x0 + 80 / scale, -y0 + 140 / scale];
        canvas.setDirty(true, true);
      }
    });
    await page.waitForTimeout(800);
    const vp = page.viewportSize();
    await page.screenshot({ path: shot, clip: { x: 60, y: 110, width: vp.width - 60, height: vp.height - 110 }, type: shot.endsWith(".png") ? "png" : "jpeg", quality: shot.endsWith(".png") ? undefined : 85 });
  }
  result.errors = errors;
  console.log(JSON.stringify(result));
  process.exitCode = result.missing.length ? 1 : 0;
} finally {
  await browser.close();
}
