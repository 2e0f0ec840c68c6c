"""The self-contained HTML page of every curation report (kept in Python so packaging needs no data files)."""

PAGE = r"""
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{TITLE}}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table.summary th { text-align: left; padding-right: 1em; font-weight: 600; }
.group { border-top: 1px solid #ddd; padding: .6em 0; }
.group h3 { margin: 0 0 .2em; font-size: 15px; }
.detail { color: #666; font-size: 12px; margin-bottom: .4em; }
.cells { display: flex; flex-wrap: wrap; gap: 8px; }
.cell { width: 170px; font-size: 11px; word-break: break-all; border: 3px solid #e44; padding: 3px; }
.cell.keep { border-color: #2a2; }
.cell.none { border-color: #ccc; }
.cell img { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; display: block; }
.pager { margin: 1em 0; }
.pager button { margin-right: .5em; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<table class="summary">{{SUMMARY}}</table>
<p class="notes">{{NOTES}}</p>
<div class="pager">
  <button id="prev">&larr; previous</button><button id="next">next &rarr;</button>
  <span id="where"></span> · filter path <input id="filter" size="30">
</div>
<div id="groups"></div>
<noscript>This report pages through its groups with JavaScript; the same data is in duplicates.json / duplicates.csv.</noscript>
<script id="report-data" type="application/json">{{DATA}}</script>
<script>
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var all = data.items, shown = all, page = 0, per = 50;
  var box = document.getElementById("groups");
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
  function render() {
    box.textContent = "";
    var pages = Math.max(1, Math.ceil(shown.length / per));
    page = Math.min(Math.max(page, 0), pages - 1);
    document.getElementById("where").textContent = "page " + (page + 1) + " of " + pages + " (" + shown.length + " rows)";
    shown.slice(page * per, page * per + per).forEach(function (g) {
      var d = el("div", "group"); d.id = "g" + g.id;
      d.appendChild(el("h3", null, g.title));
      if (g.detail) d.appendChild(el("div", "detail", g.detail));
      var cells = el("div", "cells");
      g.cells.forEach(function (c) {
        var cell = el("div", "cell " + (c.action || "none"));
        var img = el("img"); img.loading = "lazy"; img.src = c.src; img.alt = c.path; cell.appendChild(img);
        var line = [c.action, c.score !== undefined && c.score !== null ? Number(c.score).toFixed(4) : null, c.reason].filter(Boolean).join(" · ");
        cell.appendChild(el("div", null, line));
        cell.appendChild(el("div", null, c.path));
        cells.appendChild(cell);
      });
      d.appendChild(cells); box.appendChild(d);
    });
  }
  document.getElementById("prev").onclick = function () { page--; render(); };
  document.getElementById("next").onclick = function () { page++; render(); };
  document.getElementById("filter").oninput = function (e) {
    var q = e.target.value.toLowerCase(); page = 0;
    shown = q ? all.filter(function (g) { return g.cells.some(function (c) { return c.path.toLowerCase().indexOf(q) >= 0; }); }) : all;
    render();
  };
  render();
})();
</script>
</body>
</html>
"""
