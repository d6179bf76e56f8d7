// The fleet page: one EventSource on /api/fleet/events; a card per box, side by side.
"use strict";
(function () {
  const { el, fmt, duration, lineChart } = window.BoosterPanels;
  const boxes = new Map();           // index -> {view, history, card}

  function figure(label, value, id) {
    const cell = el("div", "figure");
    cell.appendChild(el("div", "label", label));
    const v = el("div", "value small", value);
    if (id) v.dataset.figure = id;
    cell.appendChild(v);
    return cell;
  }

  function render(box) {
    const { view, history } = box;
    const card = el("div", "card box");
    card.dataset.box = view.url;
    const h = el("h2");
    const link = el("a", null, view.url);
    link.href = view.url + "/";
    h.appendChild(link);
    h.appendChild(document.createTextNode(" "));
    const live = view.status === "live";
    const pill = el("span", "pill " + (live ? "ok" : "warn"), view.status.split(":")[0]);
    pill.dataset.status = live ? "live" : "down";
    h.appendChild(pill);
    card.appendChild(h);
    if (!live && view.status.includes(":")) card.appendChild(el("p", "muted", view.status));
    const s = view.summary;
    if (s) {
      const figs = el("div", "figs");
      figs.appendChild(figure("engine", s.engine, "engine"));
      figs.appendChild(figure("health", s.health ? s.health.state : "?", "health"));
      figs.appendChild(figure("up", duration(s.uptime_s)));
      figs.appendChild(figure("boosters", fmt(s.counts.boosters), "boosters"));
      figs.appendChild(figure("rules", fmt(s.counts.rules), "rules"));
      figs.appendChild(figure("evictions", fmt(s.counts.evictions)));
      figs.appendChild(figure("matched packets/s", fmt(s.traffic.pps), "pps"));
      figs.appendChild(figure("bytes/s", fmt(s.traffic.bps)));
      figs.appendChild(figure("fail-open", s.failopen.state));
      card.appendChild(figs);
      card.appendChild(lineChart([{ name: "matched packets/s", points: history.map((p) => [p[0], p[1]]) }],
                                 { relative: true, span: 60, width: 640, height: 140 }));
      const list = el("table");
      const head = el("tr");
      for (const c of ["booster", "pid", "rules", "heartbeat", "panel"]) head.appendChild(el("th", null, c));
      list.appendChild(head);
      const panels = new Map(view.panels);
      for (const b of s.boosters) {
        const tr = el("tr");
        tr.dataset.booster = b.name;
        tr.appendChild(el("td", null, b.name));
        tr.appendChild(el("td", "num", b.pid));
        tr.appendChild(el("td", "num", b.rules));
        tr.appendChild(el("td", "state-" + b.heartbeat, b.heartbeat));
        tr.appendChild(el("td", null, panels.get(b.name) || ""));
        list.appendChild(tr);
      }
      card.appendChild(list);
    }
    if (box.card) box.card.replaceWith(card); else document.getElementById("fleet").appendChild(card);
    box.card = card;
  }

  function update(view) {
    let box = boxes.get(view.index);
    if (!box) { box = { view, history: [], card: null }; boxes.set(view.index, box); }
    if (view.incremental) {
      box.history.push(...view.history);
      if (box.history.length > 300) box.history.splice(0, box.history.length - 300);
    } else {
      box.history = view.history.slice();
    }
    box.view = view;
    render(box);
  }

  const source = new EventSource("/api/fleet/events");
  const state = document.getElementById("conn-state");
  source.onopen = () => { state.textContent = "live"; state.className = "pill ok"; };
  source.onerror = () => { state.textContent = "reconnecting"; state.className = "pill warn"; };
  source.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    document.getElementById("fleet-size").textContent = snap.boxes.length + " boxes";
    for (const view of snap.boxes) update({ ...view, incremental: false });
  });
  source.addEventListener("box", (e) => update(JSON.parse(e.data)));
})();
