// The live line page: draws /api/state and every "state" server-sent event; posts the operator's actions.
// Plain JavaScript, no build step, nothing from the internet.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const STRIP_W = 600, STRIP_H = 120;
  const VERDICT_TEXT = { not_defect: "marked: not a defect", defect: "marked: defect" };
  let actions = { reset: false, feedback: false };
  let lastEvent = 0;
  const armedResets = new Map(); // line -> timer of a reset waiting for its confirming click
  const pending = new Set(); // "line\u0000frame" feedback being posted

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  const replaceWith = (node, ...children) => node.replaceChildren(...children.filter(Boolean));
  const num = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
  const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
  const picture = (line, frameId, kind) =>
    `picture?line=${encodeURIComponent(line)}&frame=${encodeURIComponent(frameId)}&kind=${kind}`;

  function setImage(img, src, alt) {
    if (img.getAttribute("src") !== src) img.setAttribute("src", src);
    img.alt = alt;
  }

  function notice(text, isError) {
    const box = $("notice");
    box.textContent = text;
    box.className = isError ? "notice error" : "notice";
    box.hidden = !text;
    clearTimeout(notice.timer);
    if (text) notice.timer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  // -- the service bar ----------------------------------------------------------------------
  function renderService(s) {
    const broker = $("broker");
    broker.textContent = s.connected ? `connected ${s.broker || ""}` : (s.problem || `not connected ${s.broker || ""}`);
    broker.className = s.connected ? "ok" : "bad";
    $("rate").textContent = num(s.frames_per_s, 1);
    $("queue").textContent = s.queue_capacity ? `${s.queue} / ${s.queue_capacity}` : String(s.queue ?? "–");
    $("held").textContent = String(s.held ?? "–");
    $("model").textContent = s.weights ? `${s.model} · ${s.weights}` : (s.model || "–");
  }

  function renderFeed() {
    const live = Date.now() - lastEvent < 6000;
    $("feed").textContent = live ? "live" : "reconnecting…";
    $("feed").className = live ? "ok" : "bad";
  }

  // -- one line ---------------------------------------------------------------------------------
  function makeLine(name) {
    const reset = el("button", { class: "reset", type: "button", title: "Product changeover: forget this line's " +
      "references, memory and threshold; it warms up again", onclick: () => onReset(name, reset) }, "Reset line");
    const strip = document.createElementNS(SVG, "svg");
    strip.setAttribute("class", "strip");
    strip.setAttribute("viewBox", `0 0 ${STRIP_W} ${STRIP_H}`);
    strip.setAttribute("preserveAspectRatio", "none");
    strip.setAttribute("role", "img");
    return el("section", { class: "line", "data-line": name },
      el("div", { class: "line-head" },
        el("h2", { text: name }), el("span", { class: "badges" }), el("div", { class: "facts" }),
        el("span", { class: "spacer" }), reset),
      el("div", { class: "now" },
        el("figure", { class: "latest-frame" }, el("img", { alt: "" }), el("figcaption")),
        el("figure", { class: "latest-heatmap" }, el("img", { alt: "" }), el("figcaption")),
        el("figure", { class: "latest-alert-frame" }, el("img", { alt: "" }), el("figcaption"))),
      strip,
      el("div", { class: "legend" }, el("span", { class: "s", text: "— score" }),
        el("span", { class: "t", text: "- - threshold" }), el("span", { class: "range" })),
      el("h3", { text: "Last frames" }), el("ul", { class: "recent" }),
      el("h3", { text: "Alerts" }), el("ul", { class: "alerts" }));
  }

  function figure(fig, src, alt, caption) {
    const img = fig.querySelector("img");
    img.hidden = !src;
    if (src) setImage(img, src, alt);
    fig.querySelector("figcaption").textContent = caption;
  }

  function updateLine(sec, line) {
    const badges = sec.querySelector(".badges");
    replaceWith(badges,
      line.warmup ? el("span", { class: "badge warm", text: "warming up" }) : el("span", { class: "badge steady", text: "steady" }),
      line.latest && line.latest.is_anomaly ? el("span", { class: "badge alert", text: "ALERT" }) : null,
      line.reset_requested_at ? el("span", { class: "badge reset", text: `reset asked ${clock(line.reset_requested_at)}` }) : null,
      line.last_changeover ? el("span", { class: "badge reset", text: `changeover at ${line.last_changeover.frame_id}` +
        ` (${line.last_changeover.detected ? "detected" : "reset"})` }) : null);
    const fact = (label, value) => el("span", {}, `${label} `, el("b", { text: value }));
    sec.querySelector(".facts").replaceChildren(
      fact("threshold", num(line.threshold)), fact("window", String(line.window_size)),
      fact("memory", `${line.memory_size} patches`), fact("frames", String(line.frames)),
      fact("alerts", String(line.alerts_total)));
    const reset = sec.querySelector("button.reset");
    reset.disabled = !actions.reset;

    const latest = line.latest;
    figure(sec.querySelector(".latest-frame"),
      latest && latest.pictures.includes("frame") ? picture(line.line, latest.frame_id, "frame") : null,
      latest ? `frame ${latest.frame_id}` : "",
      latest ? `latest frame ${latest.frame_id} · score ${num(latest.score)} · ${clock(latest.decided_at)}` : "no frame yet");
    const alert = line.latest_alert;
    figure(sec.querySelector(".latest-heatmap"),
      alert && alert.pictures.includes("heatmap") ? picture(line.line, alert.frame_id, "heatmap") : null,
      alert ? `heatmap of alert ${alert.frame_id}` : "",
      alert ? `heatmap of the latest alert ${alert.frame_id} · score ${num(alert.score)} > ${num(alert.threshold)}`
            : "no alert yet (heatmaps are made for alerts)");
    figure(sec.querySelector(".latest-alert-frame"),
      alert && alert.pictures.includes("frame") ? picture(line.line, alert.frame_id, "frame") : null,
      alert ? `frame of alert ${alert.frame_id}` : "", alert ? `clean frame of alert ${alert.frame_id}` : "");

    drawStrip(sec.querySelector("svg.strip"), sec.querySelector(".legend .range"), line.points);
    syncList(sec.querySelector("ul.recent"), line.recent, makeRecent(line.line), updateRecent);
    syncList(sec.querySelector("ul.alerts"), line.alerts, makeAlert(line.line), updateAlert(line.line));
    if (!line.alerts.length && !sec.querySelector("ul.alerts .none")) {
      sec.querySelector("ul.alerts").append(el("li", { class: "none", text: "none kept" }));
    }
  }

  // Keyed by frame id: existing nodes (and their loaded pictures) are kept, moved, or dropped.
  function syncList(ul, items, make, update) {
    const have = new Map();
    for (const node of [...ul.children]) {
      if (node.dataset.frameId === undefined) node.remove(); else have.set(node.dataset.frameId, node);
    }
    let prev = null;
    for (const item of items) {
      let node = have.get(item.frame_id);
      if (node) have.delete(item.frame_id); else node = make(item);
      update(node, item);
      const want = prev ? prev.nextSibling : ul.firstChild;
      if (node !== want) ul.insertBefore(node, want);
      prev = node;
    }
    for (const node of have.values()) node.remove();
  }

  const makeRecent = (line) => (item) => el("li", { "data-frame-id": item.frame_id },
    el("img", { alt: `frame ${item.frame_id}`, loading: "lazy",
      src: item.pictures.includes("frame") ? picture(line, item.frame_id, "frame") : null }),
    el("span", { class: "id", title: item.frame_id, text: item.frame_id }), el("span", { class: "score" }));

  function updateRecent(node, item) {
    node.classList.toggle("is-alert", item.is_anomaly);
    node.querySelector(".score").textContent = item.warmup ? `${num(item.score)} (warm-up)` :
      `${num(item.score)} / ${num(item.threshold)}${item.is_anomaly ? " ALERT" : ""}`;
  }

  const makeAlert = (line) => (item) => {
    const button = (verdict, label, cls) => el("button", { type: "button", class: `feedback ${cls}`,
      "data-verdict": verdict, onclick: (e) => onFeedback(line, item.frame_id, verdict, e.target.closest("li")) }, label);
    return el("li", { "data-frame-id": item.frame_id },
      el("div", { class: "pics" },
        el("img", { alt: `heatmap of ${item.frame_id}`, src: item.pictures.includes("heatmap") ? picture(line, item.frame_id, "heatmap") : null }),
        el("img", { alt: `frame ${item.frame_id}`, src: item.pictures.includes("frame") ? picture(line, item.frame_id, "frame") : null })),
      el("div", { class: "meta" }),
      el("div", { class: "actions" }, button("not_defect", "Not a defect", "not-defect"), button("defect", "Defect", "defect"),
        el("span", { class: "verdict" })));
  };

  const updateAlert = (line) => (node, item) => {
    node.querySelector(".meta").replaceChildren(el("b", { text: item.frame_id }),
      ` · score ${num(item.score)} > threshold ${num(item.threshold)} · ${item.regions.length} region(s) · ${clock(item.decided_at)}`);
    const verdict = node.querySelector(".verdict");
    verdict.textContent = item.feedback ? VERDICT_TEXT[item.feedback] : "";
    verdict.className = `verdict ${item.feedback || ""}`;
    const busy = pending.has(`${line}\u0000${item.frame_id}`);
    for (const b of node.querySelectorAll("button.feedback")) b.disabled = !actions.feedback || busy;
  };

  function drawStrip(svg, rangeLabel, points) {
    const scores = points.map((p) => p.score).filter((v) => v !== null);
    const thresholds = points.map((p) => p.threshold).filter((v) => v !== null);
    const all = scores.concat(thresholds);
    svg.replaceChildren();
    if (!all.length) { rangeLabel.textContent = ""; return; }
    let lo = Math.min(...all), hi = Math.max(...all);
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
    const n = Math.max(points.length - 1, 1);
    const x = (i) => (i / n) * STRIP_W;
    const y = (v) => STRIP_H - ((v - lo) / (hi - lo)) * STRIP_H;
    const path = (key) => {
      let d = "", open = false;
      points.forEach((p, i) => {
        if (p[key] === null) { open = false; return; }
        d += `${open ? "L" : "M"}${x(i).toFixed(1)},${y(p[key]).toFixed(1)} `;
        open = true;
      });
      return d;
    };
    const add = (tag, attrs) => {
      const node = document.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      svg.append(node);
      return node;
    };
    points.forEach((p, i) => {
      if (p.alert) add("line", { x1: x(i), x2: x(i), y1: 0, y2: STRIP_H, stroke: "#f2b8b3", "stroke-width": 3,
        "vector-effect": "non-scaling-stroke", class: "alert-mark", "data-frame-id": p.frame_id });
    });
    add("path", { d: path("threshold"), class: "thr", "vector-effect": "non-scaling-stroke" });
    add("path", { d: path("score"), class: "score", "vector-effect": "non-scaling-stroke" });
    svg.setAttribute("aria-label", `score and threshold of the last ${points.length} frames`);
    rangeLabel.textContent = `last ${points.length} frames · scale ${num(lo)} to ${num(hi)} · red bars: alerts`;
  }

  // -- actions ----------------------------------------------------------------------------------
  async function post(path, body) {
    const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "X-Musc-Action": "1" },
      body: JSON.stringify(body), credentials: "same-origin" });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: `HTTP ${response.status}` }; }
    if (!response.ok || !data.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  async function onFeedback(line, frameId, verdict, node) {
    const key = `${line}\u0000${frameId}`;
    pending.add(key);
    node.querySelectorAll("button.feedback").forEach((b) => { b.disabled = true; });
    try {
      await post("api/feedback", { line, frame_id: frameId, verdict });
      const span = node.querySelector(".verdict");
      span.textContent = VERDICT_TEXT[verdict];
      span.className = `verdict ${verdict}`;
      notice(`${line}: ${frameId} ${VERDICT_TEXT[verdict]}`, false);
    } catch (err) {
      notice(`${line}: feedback on ${frameId} not taken: ${err.message}`, true);
    } finally {
      pending.delete(key);
      node.querySelectorAll("button.feedback").forEach((b) => { b.disabled = !actions.feedback; });
    }
  }

  async function onReset(line, button) {
    if (!armedResets.has(line)) { // first click arms, a second within 5 s resets
      button.classList.add("armed");
      button.textContent = `Confirm reset of ${line}`;
      armedResets.set(line, setTimeout(() => disarm(line, button), 5000));
      return;
    }
    disarm(line, button);
    button.disabled = true;
    try {
      await post("api/reset", { line });
      notice(`${line}: reset queued; the line warms up again on its next frames`, false);
    } catch (err) {
      notice(`${line}: reset not taken: ${err.message}`, true);
    } finally {
      button.disabled = !actions.reset;
    }
  }

  function disarm(line, button) {
    clearTimeout(armedResets.get(line));
    armedResets.delete(line);
    button.classList.remove("armed");
    button.textContent = "Reset line";
  }

  // -- data in ----------------------------------------------------------------------------------
  function render(data) {
    actions = data.actions || actions;
    lastEvent = Date.now();
    renderFeed();
    renderService(data.service || {});
    const main = $("lines");
    const names = Object.keys(data.lines || {});
    $("empty").hidden = names.length > 0;
    for (const name of names) {
      let sec = [...main.querySelectorAll("section.line")].find((s) => s.dataset.line === name);
      if (!sec) { sec = makeLine(name); main.append(sec); }
      updateLine(sec, data.lines[name]);
    }
    document.body.dataset.version = String(data.version);
  }

  function connect() {
    const events = new EventSource("events");
    events.addEventListener("state", (e) => render(JSON.parse(e.data)));
    events.onerror = () => renderFeed();
  }

  fetch("api/state").then((r) => r.json()).then(render).catch(() => renderFeed());
  connect();
  setInterval(renderFeed, 2000);
})();
