// Agreement page: tables built with textContent only.
"use strict";

const token = sessionStorage.getItem("immunocto-token");

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement(tag); td.textContent = c; tr.append(td); }
  return tr;
}

function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toFixed(3); }

async function main() {
  const headers = { "Authorization": "Bearer " + token };
  const response = await fetch("/api/agreement", { headers });
  if (!response.ok) { document.getElementById("message").textContent = "log in on the review page first (" + response.status + ")"; return; }
  const rep = await response.json();
  document.getElementById("message").textContent = rep.cells_reviewed + " cells reviewed by " + rep.reviewers.join(", ");
  const pairs = document.getElementById("pairs");
  pairs.append(row(["reviewer A", "reviewer B", "cells", "κ", "agreement"], "th"));
  for (const p of rep.pairs) pairs.append(row([p.a, p.b, p.n, fmt(p.kappa), fmt(p.agreement)]));
  if (rep.fleiss) document.getElementById("fleiss").textContent = "Fleiss' κ over " + rep.fleiss.n + " cells: " + fmt(rep.fleiss.kappa);
  const conc = document.getElementById("concordance");
  const classes = rep.labels.slice(0, 5);
  conc.append(row(["reviewer", "overall", ...classes], "th"));
  for (const [name, c] of Object.entries(rep.concordance)) {
    const cell = x => x.n === 0 ? "–" : fmt(x.value) + " [" + fmt(x.lo) + ", " + fmt(x.hi) + "] n=" + x.n;
    conc.append(row([name, fmt(c.overall.value) + " [" + fmt(c.overall.lo) + ", " + fmt(c.overall.hi) + "]", ...classes.map(k => cell(c.per_class[k]))]));
  }
  const figure = await fetch("/api/agreement.png", { headers });
  if (figure.ok) document.getElementById("figure").src = URL.createObjectURL(await figure.blob());
}

main();
