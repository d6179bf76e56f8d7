// Rendering helpers shared by the box page and the fleet page: number formatting, a line chart,
// and the booster panel parts (figures, map, graph, table, series).  Everything is built with
// DOM calls and textContent: no data from a booster is ever parsed as HTML.
"use strict";
(function () {
  const SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fmt(value, unit) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    const abs = Math.abs(value);
    let text;
    if (abs >= 1e9) text = (value / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "G";
    else if (abs >= 1e6) text = (value / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
    else if (abs >= 1e4) text = (value / 1e3).toFixed(abs >= 1e5 ? 0 : 1) + "k";
    else if (Number.isInteger(value)) text = String(value);
    else text = value.toFixed(abs >= 100 ? 0 : abs >= 10 ? 1 : 2);
    return unit ? text + " " + unit : text;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return seconds.toFixed(0) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  // Line chart: series = [{name, points: [[t, v], ...]}]; t in seconds (any origin).
  function lineChart(series, opts) {
    opts = opts || {};
    const W = opts.width || 640, H = opts.height || 170, L = 46, R = 8, T = 8, B = 20;
    const root = el("div", "linechart");
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    let tMin = Infinity, tMax = -Infinity, vMax = 0;
    for (const s of series) for (const [t, v] of s.points) {
      if (t < tMin) tMin = t;
      if (t > tMax) tMax = t;
      if (v !== null && v > vMax) vMax = v;
    }
    if (opts.span && isFinite(tMax)) tMin = Math.min(tMin, tMax - opts.span);
    if (!isFinite(tMin) || tMax <= tMin) { tMin = 0; tMax = 1; }
    if (vMax <= 0) vMax = 1;
    const step = Math.pow(10, Math.floor(Math.log10(vMax)));      // a round top: 1, 2 or 5 x 10^k
    vMax = [1, 2, 5, 10].map((m) => m * step).find((top) => top >= vMax);
    const x = (t) => L + (t - tMin) / (tMax - tMin) * (W - L - R);
    const y = (v) => T + (1 - v / vMax) * (H - T - B);
    for (const frac of [0, 0.5, 1]) {
      chart.appendChild(svg("line", { x1: L, x2: W - R, y1: y(vMax * frac), y2: y(vMax * frac), class: "axis" }));
      const label = svg("text", { x: L - 4, y: y(vMax * frac) + 4, "text-anchor": "end" });
      label.textContent = fmt(vMax * frac);
      chart.appendChild(label);
    }
    const left = svg("text", { x: L, y: H - 4 });
    left.textContent = opts.relative ? "-" + duration(tMax - tMin) : fmt(tMin);
    const right = svg("text", { x: W - R, y: H - 4, "text-anchor": "end" });
    right.textContent = opts.relative ? "now" : fmt(tMax);
    chart.appendChild(left);
    chart.appendChild(right);
    series.forEach((s, i) => {
      let d = "", pen = false;
      for (const [t, v] of s.points) {
        if (v === null) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
        pen = true;
      }
      if (d) chart.appendChild(svg("path", { d, class: `line s${i % 8}`, "data-series": s.name }));
    });
    root.appendChild(chart);
    const legend = el("div", "legend");
    series.forEach((s, i) => {
      const item = el("span");
      item.appendChild(el("span", `swatch s${i % 8}`));
      item.appendChild(document.createTextNode(s.name + (opts.unit ? ` (${opts.unit})` : "")));
      legend.appendChild(item);
    });
    root.appendChild(legend);
    return root;
  }

  function ramp(frac) {              // 0 = green, 1 = red
    const f = Math.max(0, Math.min(1, frac));
    return `hsl(${Math.round(120 * (1 - f))}, ${65 + 15 * Math.sin(Math.PI * f)}%, ${40 + 6 * Math.sin(Math.PI * f)}%)`;
  }

  function renderFigures(part) {
    const dl = el("dl", "figures");
    for (const [label, value, unit] of part.items) {
      const cell = el("div");
      cell.appendChild(el("dt", null, label));
      cell.appendChild(el("dd", null, fmt(value, unit)));
      dl.appendChild(cell);
    }
    return dl;
  }

  function renderMap(part) {
    const root = el("div", "map");
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    const grow = (x, y) => { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); };
    for (const line of part.lines) for (let i = 0; i < line.length; i += 2) grow(line[i], line[i + 1]);
    for (const p of part.points) grow(p[0], p[1]);
    const pad = Math.max(x1 - x0, y1 - y0, 1) * 0.03;
    x0 -= pad; y0 -= pad; x1 += pad; y1 += pad;
    const width = x1 - x0, height = y1 - y0;
    // Map y grows northwards; SVG y grows downwards.
    const map = svg("svg", { viewBox: `${x0} ${-y1} ${width} ${height}`, role: "img", class: "mapsvg" });
    const values = part.values.filter((v) => v !== null);
    let lo = part.scale ? part.scale[0] : Math.min(0, ...values);
    let hi = part.scale ? part.scale[1] : Math.max(1, ...values);
    if (!(hi > lo)) hi = lo + 1;
    part.lines.forEach((line, i) => {
      const pts = [];
      for (let j = 0; j < line.length; j += 2) pts.push(`${line[j]},${-line[j + 1]}`);
      const value = part.values[i];
      const road = svg("polyline", { points: pts.join(" "), class: "road", "data-index": i,
                                     stroke: value === null ? "#c3c9d3" : ramp((value - lo) / (hi - lo)) });
      const title = svg("title");
      title.textContent = `#${i}: ${value === null ? "no data" : fmt(value, part.unit)}`;
      road.appendChild(title);
      map.appendChild(road);
    });
    const r = Math.max(width, height) / 110;
    for (const [x, y, colour, label] of part.points) {
      const dot = svg("circle", { cx: x, cy: -y, r, class: `marker m-${colour}` });
      if (label) { const t = svg("title"); t.textContent = label; dot.appendChild(t); }
      map.appendChild(dot);
    }
    root.appendChild(map);
    const scale = el("div", "scale");
    scale.appendChild(el("span", null, (part.label || "value") + ":"));
    scale.appendChild(el("span", null, fmt(lo, part.unit)));
    scale.appendChild(el("span", "ramp"));
    scale.appendChild(el("span", null, fmt(hi, part.unit)));
    for (const [colour, label] of part.legend) {
      const item = el("span");
      item.appendChild(el("span", `dot m-${colour}`));
      item.appendChild(document.createTextNode(label));
      scale.appendChild(item);
    }
    root.appendChild(scale);
    return root;
  }

  function renderGraph(part) {
    const W = 760, H = 440;
    // groups in order of first appearance: the first (e.g. this booster's cluster) in the middle,
    // the others around it; in a group of three or more nodes its first node sits in the middle
    const groups = [...new Set(part.nodes.map((n) => n[2]))];
    const groupIndex = new Map(groups.map((g, i) => [g, i]));
    const members = new Map(groups.map((g) => [g, []]));
    for (const node of part.nodes) members.get(node[2]).push(node);
    const pos = new Map();
    const labelAt = new Map();          // node id -> [x, y, anchor]
    const outer = groups.length - 1;
    const R = outer ? Math.min(W, H) * 0.36 : 0;
    groups.forEach((g, gi) => {
      const a = outer ? 2 * Math.PI * (gi - 1) / outer : 0;
      const cx = W / 2 + (gi === 0 ? 0 : R * 1.45 * Math.cos(a)), cy = H / 2 + (gi === 0 ? 0 : R * Math.sin(a));
      const list = members.get(g);
      const centred = list.length >= 3 ? list.slice(0, 1) : [];
      const ring = list.slice(centred.length);
      const r = ring.length > 1 ? Math.min(gi === 0 ? 80 : 55, 24 + 8 * ring.length) : 0;
      for (const node of centred) {
        pos.set(node[0], [cx, cy]);
        labelAt.set(node[0], [cx, cy + 20, "middle"]);
      }
      ring.forEach((node, ni) => {
        const b = 2 * Math.PI * ni / ring.length - Math.PI / 2;
        const x = cx + r * Math.cos(b), y = cy + r * Math.sin(b);
        pos.set(node[0], [x, y]);
        const c = Math.cos(b);
        labelAt.set(node[0], [x + 12 * c, y + 12 * Math.sin(b) + 4,
                              Math.abs(c) < 0.3 ? "middle" : c > 0 ? "start" : "end"]);
      });
    });
    const root = el("div", "graph");
    // fit the drawing: the nodes' extent plus room for their labels
    const xs = [...pos.values()].map((p) => p[0]), ys = [...pos.values()].map((p) => p[1]);
    const x0 = Math.max(0, Math.min(...xs) - 110), x1 = Math.min(W, Math.max(...xs) + 110);
    const y0 = Math.max(0, Math.min(...ys) - 30), y1 = Math.min(H, Math.max(...ys) + 36);
    const g = svg("svg", { viewBox: `${x0} ${y0} ${x1 - x0} ${y1 - y0}`, role: "img" });
    const group = new Map(part.nodes.map((n) => [n[0], n[2]]));
    const labels = [];
    for (const [a, b, count] of part.edges) {
      const [xa, ya] = pos.get(a), [xb, yb] = pos.get(b);
      const cross = group.get(a) !== group.get(b);
      g.appendChild(svg("line", { x1: xa, y1: ya, x2: xb, y2: yb, class: cross ? "edge cross" : "edge" }));
      if (count !== null && count !== undefined && cross) {
        const t = svg("text", { x: (xa + xb) / 2, y: (ya + yb) / 2 - 4, "text-anchor": "middle", class: "count" });
        t.textContent = fmt(count);
        labels.push(t);
      }
    }
    for (const [id, label, grp] of part.nodes) {
      const [x, y] = pos.get(id);
      const dot = svg("circle", { cx: x, cy: y, r: 7, class: `node g${groupIndex.get(grp) % 8}`, "data-node": id });
      const t = svg("title");
      t.textContent = `${label} (${grp})`;
      dot.appendChild(t);
      g.appendChild(dot);
      if (part.nodes.length <= 40) {
        const [lx, ly, anchor] = labelAt.get(id);
        const text = svg("text", { x: lx, y: ly, "text-anchor": anchor });
        text.textContent = label;
        g.appendChild(text);
      }
    }
    for (const t of labels) g.appendChild(t);
    root.appendChild(g);
    const legend = el("div", "legend");
    groups.forEach((grp, i) => {
      const item = el("span");
      item.appendChild(el("span", `dot g${i % 8}`));
      item.appendChild(document.createTextNode(`${grp} (${members.get(grp).length})`));
      legend.appendChild(item);
    });
    legend.appendChild(el("span", null, "thick lines cross clusters; numbers count their messages"));
    root.appendChild(legend);
    return root;
  }

  function renderTable(part) {
    const wrap = el("div", "table-wrap");
    const table = el("table");
    const head = el("tr");
    for (const c of part.columns) head.appendChild(el("th", null, c));
    const thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    const body = el("tbody");
    for (const row of part.rows) {
      const tr = el("tr");
      for (const cell of row) tr.appendChild(el("td", typeof cell === "number" ? "num" : null, fmt(cell)));
      body.appendChild(tr);
    }
    table.appendChild(body);
    wrap.appendChild(table);
    return wrap;
  }

  function renderSeries(part) {
    const series = Object.entries(part.series).map(([name, points]) => ({ name, points }));
    return lineChart(series, { unit: part.unit, relative: true, width: 900, height: 170 });
  }

  const RENDER = { figures: renderFigures, map: renderMap, graph: renderGraph, table: renderTable, series: renderSeries };

  // entry = {booster, panel} or {booster, error}
  function renderPanel(entry) {
    const card = el("div", "card panel");
    card.dataset.booster = entry.booster;
    const h = el("h2", null, entry.panel ? entry.panel.title : entry.booster);
    h.appendChild(document.createTextNode(" "));
    h.appendChild(el("span", "muted", "booster " + entry.booster));
    card.appendChild(h);
    if (entry.error) {
      card.appendChild(el("p", "error", "panel refused: " + entry.error));
      return card;
    }
    for (const part of entry.panel.parts) {
      const box = el("div", "part part-" + part.kind);
      if (part.title) box.appendChild(el("h3", null, part.title));
      box.appendChild(RENDER[part.kind](part));
      card.appendChild(box);
    }
    return card;
  }

  window.BoosterPanels = { el, svg, fmt, duration, lineChart, renderPanel };
})();
