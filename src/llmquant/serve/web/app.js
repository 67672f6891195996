// llmquant's page: models with their fit verdict, ladder reports (table + chart), a streaming chat.
// Plain browser JavaScript, no build step and nothing fetched from outside this server.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("llmquant-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("llmquant-key", keyInput.value); load(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}
function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && (j.error.message || j.error)) || resp.statusText; }
  catch (e) { return resp.statusText; }
}
async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new Error(resp.status + ": " + await errorText(resp));
  return resp.json();
}
const gib = (n) => n >= 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }

async function loadModels() {
  const data = await getJSON("/ui/api/models");
  $("machine").textContent = data.machine ? "fit on " + data.machine : "";
  const body = $("models").querySelector("tbody"); body.replaceChildren();
  const select = $("chat-model"); const keep = select.value; select.replaceChildren();
  for (const m of data.models) {
    const tr = document.createElement("tr"); tr.dataset.name = m.name;
    cell(tr, m.name); cell(tr, gib(m.size), "num"); cell(tr, m.file_type || "?"); cell(tr, m.parameters, "num");
    cell(tr, m.verdict, m.fits ? "fits" : "nofit");
    body.appendChild(tr);
    const opt = document.createElement("option"); opt.value = opt.textContent = m.name; select.appendChild(opt);
  }
  if (keep) select.value = keep;
}

function chart(report, host) {
  // quality (KLD vs the base, log scale) against file size; hover names the rung
  const pts = report.rungs.filter((r) => r.eval && r.eval.kld_mean > 0);
  if (!pts.length) return;
  const W = 560, H = 260, L = 60, B = 36, NS = "http://www.w3.org/2000/svg";
  const xs = pts.map((r) => r.file_bytes), ys = pts.map((r) => Math.log10(r.eval.kld_mean));
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (v) => L + (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5) * (W - L - 70);
  const sy = (v) => H - B - (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5) * (H - B - 36);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const text = (x, y, s, anchor) => { const t = document.createElementNS(NS, "text"); t.setAttribute("x", x); t.setAttribute("y", y);
    if (anchor) t.setAttribute("text-anchor", anchor); t.textContent = s; svg.appendChild(t); };
  text(W / 2, H - 6, "file size", "middle"); text(4, 14, "KLD (log)");
  text(L, H - B + 14, gib(x0), "middle"); text(sx(x1), H - B + 14, gib(x1), "middle");
  text(L - 4, sy(y0) + 4, pts[ys.indexOf(y0)].eval.kld_mean.toPrecision(2), "end");
  text(L - 4, sy(y1) + 4, pts[ys.indexOf(y1)].eval.kld_mean.toPrecision(2), "end");
  const tip = document.createElement("div"); tip.id = "tip"; tip.className = "dim";
  pts.forEach((r, i) => {
    const c = document.createElementNS(NS, "circle");
    c.setAttribute("cx", sx(xs[i])); c.setAttribute("cy", sy(ys[i])); c.setAttribute("r", 6);
    if (r.name === report.recommendation) c.setAttribute("class", "best");
    const say = () => { tip.textContent = `${r.name}: ${gib(r.file_bytes)}, ${r.bits_per_weight.toFixed(2)} bpw, KLD ${r.eval.kld_mean.toFixed(5)}, PPL ${r.eval.ppl.toFixed(3)}`; };
    c.addEventListener("mouseenter", say); c.addEventListener("click", say);
    text(sx(xs[i]) + 8, sy(ys[i]) - 6, r.name);
    svg.appendChild(c);
  });
  host.appendChild(svg); host.appendChild(tip);
}

async function loadReports() {
  const data = await getJSON("/ui/api/reports");
  const host = $("reports"); host.replaceChildren();
  $("no-reports").hidden = data.reports.length > 0;
  for (const rep of data.reports) {
    const h = document.createElement("h3"); h.textContent = `${rep.model_name || rep.model} — ${rep.where}`; host.appendChild(h);
    const t = document.createElement("table");
    t.innerHTML = "<thead><tr><th>rung</th><th class=num>size</th><th class=num>bpw</th><th class=num>PPL</th><th class=num>KLD</th><th class=num>same top</th><th class=num>tok/s</th></tr></thead>";
    const body = document.createElement("tbody");
    for (const r of rep.rungs) {
      const tr = document.createElement("tr"); const e = r.eval || {}, s = r.speed || {};
      cell(tr, r.name + (r.name === rep.recommendation ? " *" : "")); cell(tr, gib(r.file_bytes), "num");
      cell(tr, r.bits_per_weight.toFixed(2), "num"); cell(tr, e.ppl ? e.ppl.toFixed(3) : "-", "num");
      cell(tr, e.kld_mean != null ? e.kld_mean.toFixed(5) : "-", "num"); cell(tr, e.top1 != null ? e.top1.toFixed(2) + "%" : "-", "num");
      cell(tr, s.tg_tps ? s.tg_tps.toFixed(1) : "-", "num");
      body.appendChild(tr);
    }
    t.appendChild(body); host.appendChild(t); chart(rep, host);
  }
}

async function load() {
  try { await loadModels(); await loadReports(); status("ready"); }
  catch (e) { status(e.message, true); }
}

let history = [];
function say(role, text) { const d = document.createElement("div"); d.className = "msg " + role; d.textContent = text; $("log").appendChild(d); return d; }
$("clear").addEventListener("click", () => { history = []; $("log").replaceChildren(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat").requestSubmit(); } });
$("chat").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim(); if (!text) return;
  $("prompt").value = ""; say("user", text); history.push({ role: "user", content: text });
  const out = say("assistant", ""); $("send").disabled = true; status("generating…");
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("chat-model").value, messages: history, stream: true,
        max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256) }) });
    if (!resp.ok) throw new Error(resp.status + ": " + await errorText(resp));
    const reader = resp.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const payload = ev.slice(6); if (payload === "[DONE]") continue;
        const j = JSON.parse(payload);
        if (j.error) throw new Error(j.error.message);
        const delta = j.choices && j.choices[0] && j.choices[0].delta;
        if (delta && delta.content) { out.textContent += delta.content; $("log").scrollTop = 1e9; }
      }
    }
    history.push({ role: "assistant", content: out.textContent }); status("ready");
  } catch (err) { out.remove(); history.pop(); say("error", err.message).className = "msg error"; status(err.message, true); }
  finally { $("send").disabled = false; }
});
load();
