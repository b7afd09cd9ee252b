// Runs a workflow from ComfyUI's real frontend (headless Chromium) and checks the pack's
// frontend extension (web/js/asuka.js): after the run, the MAE Prior and Masked Decode nodes
// show their previews; the decode's toggle lays the hole's outline over the result.
//
//   node preview_extension.mjs <server url> <workflow.json> <out dir>
//
// Writes prior.png, decode_off.png, decode_on.png (screenshots of the preview elements) and
// page.png into <out dir>; prints one JSON line with what it found.
import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [server, workflowPath, outDir] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "asuka-chromium-")), {
  executablePath,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"],
});
const errors = [];
const report = { errors };
try {
  const page = browser.pages()[0] || (await browser.newPage());
  page.on("pageerror", (e) => errors.push(String(e)));
  for (const [id, value] of [["Comfy.TutorialCompleted", true], ["Comfy.Minimap.Visible", false],
                             ["Comfy.Workflow.ShowMissingModelsWarning", false]]) {
    await fetch(`${server}/settings/${id}`, { method: "POST", body: JSON.stringify(value) }).catch(() => {});
  }
  await page.goto(server, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  report.extensionLoaded = await page.evaluate(
    () => (window.app.extensions || []).some((e) => e.name === "comfyui-asuka.previews"));
  report.templates = await page.evaluate(async () => {
    const { api } = await import("/scripts/api.js");
    return Object.values(await api.getWorkflowTemplates()).find((names) => names.some((n) => n.startsWith("1. ")));
  });
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
  for (let i = 0; i < 3; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(200); }
  const before = await page.evaluate(() => window.app.graph.serialize().nodes.map((n) => [n.type, n.widgets_values]));
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  // both nodes have run and their pictures have loaded
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll(".asuka-preview img")];
    return imgs.length >= 4 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, null, { timeout: 240000, polling: 500 });
  report.images = await page.evaluate(() => [...document.querySelectorAll(".asuka-preview img")].map((i) => ({
    cls: i.className, width: i.naturalWidth, height: i.naturalHeight, alt: i.alt,
    visible: getComputedStyle(i).display !== "none",
  })));
  report.captions = await page.evaluate(
    () => [...document.querySelectorAll(".asuka-preview figcaption")].map((c) => c.textContent));
  const after = await page.evaluate(() => window.app.graph.serialize().nodes.map((n) => [n.type, n.widgets_values]));
  report.widgetsUnchanged = JSON.stringify(before) === JSON.stringify(after);
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  report.promptInputs = Object.fromEntries(Object.values(prompt).map((n) => [n.class_type, Object.keys(n.inputs)]));

  // fit the graph in view so that both previews are on screen, then take the pictures
  await page.evaluate(() => {
    const c = window.app.canvas;
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
      x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const w = c.canvas.clientWidth - 120, h = c.canvas.clientHeight - 200;
    const scale = Math.min(1, w / (x1 - x0), h / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset = [-x0 + 100 / scale, -y0 + 150 / scale];
    c.setDirty(true, true);
  });
  await page.waitForTimeout(1500);
  const boxes = page.locator(".asuka-preview");
  const prior = boxes.filter({ has: page.locator("figure.asuka-prior_view") });
  const decode = boxes.filter({ has: page.locator("figure.asuka-result") });
  await prior.screenshot({ path: join(outDir, "prior.png") });
  await decode.screenshot({ path: join(outDir, "decode_off.png") });
  await decode.locator("input[type=checkbox]").check();
  await page.waitForTimeout(300);
  report.outlineShown = await decode.locator("img.asuka-outline").isVisible();
  await decode.screenshot({ path: join(outDir, "decode_on.png") });
  await page.screenshot({ path: join(outDir, "page.png") });
  console.log(JSON.stringify(report));
} catch (e) {
  report.failure = String(e);
  console.log(JSON.stringify(report));
  process.exitCode = 1;
} finally {
  await browser.close();
}
