// The box page: one EventSource on /api/events (snapshot, then tick / panel / panel_removed
// events); the browser never polls.  Rendering helpers come from panels.js.
"use strict";
(function () {
  const { el, fmt, duration, lineChart, renderPanel } = window.BoosterPanels;
  const $ = (id) => document.getElementById(id);
  let history = [];
  let interval = 1;
  const panels = new Map();

  function setPill(node, text, state) {
    node.textContent = text;
    node.className = "pill" + (state ? " " + state : "");
  }

  function fillTable(id, rows, cells) {
    const body = $(id).querySelector("tbody");
    body.replaceChildren();
    for (const row of rows) {
      const tr = el("tr");
      for (const [text, cls] of cells(row)) tr.appendChild(el("td", cls || null, text));
      body.appendChild(tr);
    }
    return body;
  }

  function renderChart() {
    const span = history.length ? history[history.length - 1][0] - history[0][0] : 0;
    const series = [
      { name: "matched packets/s", points: history.map((p) => [p[0], p[1]]) },
      { name: "passed without verdict/s", points: history.map((p) => [p[0], p[3]]) },
    ];
    $("chart").replaceChildren(lineChart(series, { relative: true, span: Math.max(span, 60), width: 1200, height: 200 }));
  }

  function renderTick(tick) {
    if (!tick) return;
    interval = tick.interval || interval;
    setPill($("engine"), "engine " + tick.engine);
    const health = tick.health || { state: "?" };
    setPill($("health"), "health " + health.state, health.state === "ok" ? "ok" : "warn");
    $("uptime").textContent = "up " + duration(tick.uptime_s) + " · control " + (tick.control || "");
    $("n-boosters").textContent = fmt(tick.counts.boosters);
    $("n-rules").textContent = fmt(tick.counts.rules);
    $("total-pps").textContent = fmt(tick.traffic.pps);
    $("total-pps").dataset.value = tick.traffic.pps;
    $("total-bps").textContent = fmt(tick.traffic.bps);
    $("n-evictions").textContent = fmt(tick.counts.evictions);
    $("failopen-state").textContent = tick.failopen.state;
    $("failopen-state").className = "value small " + (tick.failopen.pps > 0 ? "state-late" : "state-ok");

    const boosters = fillTable("boosters", tick.boosters, (b) => [
      [b.name], [b.pid, "num"], [b.uid, "num"], [b.rules, "num"],
      [b.heartbeat + " (" + b.heartbeat_age_s.toFixed(1) + " s)", "state-" + b.heartbeat],
      [duration(b.connected_s)], [fmt(b.handler_errors), "num"], [fmt(b.channel_dropped), "num"],
      [fmt(b.evictions || 0), "num"],
    ]);
    [...boosters.children].forEach((tr, i) => { tr.dataset.booster = tick.boosters[i].name; });
    const events = $("events");
    events.replaceChildren();
    for (const e of [...tick.events].reverse()) {
      const when = new Date(e.t * 1000).toLocaleTimeString();
      const why = e.reason ? `: ${e.reason}` : "";
      events.appendChild(el("li", e.what === "evicted" ? "state-bad" : null, `${when} ${e.booster} (pid ${e.pid}) ${e.what}${why}`));
    }
    if (!tick.events.length) events.appendChild(el("li", "muted", "no booster joined or left since this page's boxd view started"));

    const rules = fillTable("rules", tick.rules, (r) => [
      [r.cookie, "num"], [r.owner], [r.action], [r.match, "match"], [r.delivery],
      [fmt(r.packets), "num packets"], [fmt(r.pps), "num pps"], [fmt(r.bps), "num"],
    ]);
    [...rules.children].forEach((tr, i) => {
      tr.dataset.cookie = tick.rules[i].cookie;
      tr.dataset.packets = tick.rules[i].packets;
    });
    $("rules-more").textContent = tick.rules_not_shown ? `(${tick.rules_not_shown} more not shown)` : "";

    $("failopen-mode").textContent = tick.failopen.mode;
    fillTable("failopen", Object.keys(tick.failopen.counters), (k) => [
      [k], [fmt(tick.failopen.counters[k]), "num"], [fmt(tick.failopen.rates[k]), "num"]]);
    $("health-detail").textContent = health.rising && health.rising.length
      ? "rising in the last " + health.window_s + " s: " + health.rising.join(", ")
      : "no error, failure, stall or malformed counter rose in the last " + health.window_s + " s";
    fillTable("directory", tick.directory, (d) => [
      [d.booster + (d.connected ? "" : " (not connected)")], [fmt(d.keys), "num"], [fmt(d.bytes), "num"],
      [d.names.join(", ") + (d.keys > d.names.length ? ", …" : ""), "match"]]);
  }

  function showPanel(entry) {
    const card = renderPanel(entry);
    const old = panels.get(entry.booster);
    if (old) old.replaceWith(card); else $("panels").appendChild(card);
    panels.set(entry.booster, card);
  }

  function dropPanel(booster) {
    const card = panels.get(booster);
    if (card) card.remove();
    panels.delete(booster);
  }

  function connect() {
    // A token in the page's URL was checked by boxd when it served this page, which then set a
    // cookie the stream presents (EventSource cannot send headers): take it out of the address
    // bar and the history, and never put it in another URL.
    const params = new URLSearchParams(location.search);
    if (params.has("token")) {
      params.delete("token");
      window.history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : "") + location.hash);
    }
    const source = new EventSource("/api/events");
    source.onopen = () => setPill($("conn-state"), "live", "ok");
    source.onerror = () => {
      // a refused stream (boxd has a token and this page was not opened with it) is not retried
      if (source.readyState === EventSource.CLOSED) setPill($("conn-state"), "refused: open /?token=…", "warn");
      else setPill($("conn-state"), "reconnecting", "warn");
    };
    source.addEventListener("snapshot", (e) => {
      const snap = JSON.parse(e.data);
      interval = snap.interval || interval;
      history = snap.history || [];
      for (const booster of [...panels.keys()]) dropPanel(booster);
      for (const entry of snap.panels) showPanel(entry);
      renderTick(snap.tick);
      renderChart();
    });
    source.addEventListener("tick", (e) => {
      const tick = JSON.parse(e.data);
      if (tick.point) {
        history.push(tick.point);
        const keep = Math.ceil(300 / interval);
        if (history.length > keep) history.splice(0, history.length - keep);
      }
      renderTick(tick);
      renderChart();
    });
    source.addEventListener("panel", (e) => showPanel(JSON.parse(e.data)));
    source.addEventListener("panel_removed", (e) => dropPanel(JSON.parse(e.data).booster));
  }

  connect();
})();
