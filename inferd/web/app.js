// The web app's shell: which page shows (the URL's hash), and the API key prompt.
//
// Both pages start without a key: an open server needs none. The first 401 any call gets opens the
// key prompt with the server's message; a key given there is kept for this tab (api.js) and the
// page reloads its data with it.

import { getKey, setKey } from "./api.js";
import { initDashboard, showDashboard } from "./dashboard.js";
import { initPlayground, loadModels } from "./playground.js";

const $ = (id) => document.getElementById(id);
const PAGES = ["playground", "dashboard"];

function currentPage() {
  const page = location.hash.replace(/^#/, "");
  return PAGES.includes(page) ? page : "playground";
}

function show() {
  const page = currentPage();
  for (const p of PAGES) {
    $(`page-${p}`).hidden = p !== page;
    const link = document.querySelector(`nav a[data-page="${p}"]`);
    if (p === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `inferd · ${page === "playground" ? "Playground" : "Usage"}`;
  showDashboard(page === "dashboard");
}

function askForKey(reason) {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-reason").textContent = reason || "";
  $("key-input").value = getKey();
  dialog.showModal();
  $("key-input").focus();
}

function keyState() {
  const key = getKey();
  $("key-state").textContent = key ? `…${key.slice(-4)}` : "none";
}

function init() {
  initPlayground();
  initDashboard();
  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-dialog").addEventListener("close", () => {
    const action = $("key-dialog").returnValue;
    if (action === "save") setKey($("key-input").value.trim());
    if (action === "clear") setKey("");
  });
  document.addEventListener("inferd:need-key", (e) => askForKey(e.detail));
  document.addEventListener("inferd:key", () => {
    keyState();
    loadModels();
    show();
  });
  window.addEventListener("hashchange", show);
  keyState();
  show();
  loadModels();
}

init();
