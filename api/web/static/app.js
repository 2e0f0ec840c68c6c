// retrieval web UI: uploads, review decisions, full-image viewer and keyboard navigation.
// Plain browser JavaScript (no build step); the pages render without it.
"use strict";

function $(sel, root) { return (root || document).querySelector(sel); }
function $$(sel, root) { return Array.from((root || document).querySelectorAll(sel)); }
function typing(e) { const t = e.target; return t && (t.isContentEditable || /^(INPUT|SELECT|TEXTAREA)$/.test(t.tagName)); }

async function errorText(r) {
  try { const body = await r.json(); return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); }
  catch (_) { return r.status + " " + r.statusText; }
}

// --- full image viewer ---------------------------------------------------------------------------
function openViewer(src, caption) {
  const dlg = $("#viewer");
  $("#viewer-img").src = src;
  $("#viewer-img").alt = caption || "full image";
  $("#viewer-caption").textContent = caption || "";
  dlg.showModal();
}
document.addEventListener("click", (e) => {
  const b = e.target.closest("button.open");
  if (b) { e.preventDefault(); openViewer(b.dataset.src, b.dataset.caption); }
});

// --- moving a focus ring over cards / groups / members --------------------------------------------
function moveFocus(items, current, delta) {
  if (!items.length) return null;
  let i = items.indexOf(current);
  i = i < 0 ? 0 : Math.max(0, Math.min(items.length - 1, i + delta));
  items.forEach((el) => el.classList.remove("focused"));
  const el = items[i];
  el.classList.add("focused");
  el.scrollIntoView({ block: "nearest" });
  return el;
}

// --- search page ---------------------------------------------------------------------------------
function initSearch() {
  const form = $("#search-form"), drop = $("#drop"), file = $("#file"), status = $("#upload-status");
  async function upload(blob) {
    if (!blob || !blob.type.startsWith("image/")) { status.textContent = "That is not an image."; return; }
    const preview = $("#query-preview");
    preview.src = URL.createObjectURL(blob); preview.alt = "query: your image"; preview.hidden = false;
    const params = new URLSearchParams();
    params.set("k", form.k.value || "24");
    if (form.min_score.value) params.set("min_score", form.min_score.value);
    if (form.collapse.checked) params.set("collapse", "true");
    const body = new FormData(); body.append("file", blob, blob.name || "pasted.png");
    status.textContent = "Searching…";
    const r = await fetch("/ui/search?" + params, { method: "POST", body, credentials: "same-origin" });
    if (!r.ok) { status.textContent = "Search failed: " + await errorText(r); return; }
    $("#results").innerHTML = await r.text();
    const q = $(".query"); if (q) q.remove();
    form.image.value = "";
    history.replaceState(null, "", "/?" + params);  // the upload itself cannot live in a URL
    status.textContent = "Results for your image.";
  }
  file.addEventListener("change", () => upload(file.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  document.addEventListener("paste", (e) => {
    const item = Array.from(e.clipboardData.items).find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); upload(item.getAsFile()); }
  });
  let current = null;
  document.addEventListener("keydown", (e) => {
    if (typing(e) || $("#viewer").open) return;
    const cards = $$(".results .card");
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") { e.preventDefault(); current = moveFocus(cards, current, e.key === "ArrowRight" ? 1 : -1); }
    else if (e.key === "Enter" && current) { e.preventDefault(); $("a.more", current).click(); }
    else if (e.key === "v" && current) { const b = $("button.open", current); if (b) b.click(); }
    else if (e.key === "/") { e.preventDefault(); form.image.focus(); }
  });
}

// --- duplicate review ----------------------------------------------------------------------------
function initReview() {
  const root = $("#groups"), run = root.dataset.run, status = $("#review-status");

  function paint(member, action) {
    member.dataset.action = action;
    member.classList.toggle("keep", action === "keep");
    member.classList.toggle("remove", action === "remove");
    member.classList.toggle("reviewed", action !== member.dataset.computed);
    $$(".toggle button", member).forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.set === action)));
    const badge = $(".badge", member);
    badge.textContent = action + (action !== member.dataset.computed ? " (reviewed)" : "");
    member.setAttribute("aria-label", $(".path", member).textContent + ": " + action);
    const group = member.closest(".group");
    const all = $$(".member:not(.reference)", group).every((m) => m.dataset.action === "remove");
    group.classList.toggle("all-removed", all);
    $(".warn-all", group).hidden = !all;
  }
  async function post(url, body) {
    const r = await fetch(url, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) { status.textContent = "Not saved: " + await errorText(r); return null; }
    const out = await r.json();
    $("#decision-count").textContent = out.decisions;
    status.textContent = "Saved.";
    return out;
  }
  async function decide(member, action) {
    const decisions = {}; decisions[member.dataset.member] = action;
    if (await post(`/review/runs/${run}/decisions`, { decisions })) paint(member, action);
  }
  root.addEventListener("click", async (e) => {
    const set = e.target.closest(".toggle button");
    if (set) { await decide(set.closest(".member"), set.dataset.set); return; }
    const ga = e.target.closest("[data-group-action]");
    if (ga) {
      const group = ga.closest(".group"), action = ga.dataset.groupAction;
      if (await post(`/review/runs/${run}/groups/${group.dataset.group}/decision`, { action })) {
        $$(".member:not(.reference)", group).forEach((m) => paint(m, action === "reset" ? m.dataset.computed : action));
      }
    }
  });
  let group = null, member = null;
  document.addEventListener("keydown", async (e) => {
    if (typing(e) || $("#viewer").open) return;
    const groups = $$(".group", root);
    if (e.key === "j" || e.key === "k") {
      e.preventDefault();
      group = moveFocus(groups, group, e.key === "j" ? 1 : -1);
      if (group) { member = moveFocus($$(".member", group), null, 0); group.classList.add("focused"); }
    } else if ((e.key === "ArrowRight" || e.key === "ArrowLeft") && group) {
      e.preventDefault();
      member = moveFocus($$(".member", group), member, e.key === "ArrowRight" ? 1 : -1);
    } else if (e.key === "x" && member && !member.classList.contains("reference")) {
      await decide(member, member.dataset.action === "keep" ? "remove" : "keep");
    } else if (e.key === "v" && member) { const b = $("button.open", member); if (b) b.click(); }
    else if (e.key === "n") { const a = $('a[rel="next"]'); if (a) a.click(); }
    else if (e.key === "p") { const a = $('a[rel="prev"]'); if (a) a.click(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "search") initSearch();
  if (page === "review") initReview();
  document.body.dataset.ready = "1";  // handlers attached (tests wait for this before using keys)
});
