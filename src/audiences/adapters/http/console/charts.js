// Inline SVG: sparklines and the size/entered/exited chart.
const NS = "http://www.w3.org/2000/svg";

function el(name, attrs = {}) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function path(values, x, y) {
  return values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
}

export function sparkline(points, label) {
  const w = 120, h = 28;
  const svg = el("svg", { viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img", "aria-label": label });
  const sizes = points.map((p) => p.size);
  const lo = Math.min(...sizes), hi = Math.max(...sizes);
  const x = (i) => (sizes.length < 2 ? w / 2 : (i / (sizes.length - 1)) * (w - 2) + 1);
  const y = (v) => (hi === lo ? h / 2 : h - 2 - ((v - lo) / (hi - lo)) * (h - 4));
  svg.append(el("path", { d: path(sizes, x, y), fill: "none", stroke: "#0b5cad", "stroke-width": 1.5 }));
  return svg;
}

export function chart(points) {
  const w = 800, h = 240, left = 48, bottom = 24, top = 8;
  const svg = el("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "data-testid": "history-chart",
    "aria-label": `Size, entered and exited, ${points.length} steps from ${points[0].t} to ${points[points.length - 1].t}` });
  const all = points.flatMap((p) => [p.size, p.entered, p.exited]);
  const hi = Math.max(1, ...all);
  const x = (i) => left + (points.length < 2 ? 0 : (i / (points.length - 1)) * (w - left - 8));
  const y = (v) => h - bottom - (v / hi) * (h - bottom - top);
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(hi * frac);
    svg.append(el("line", { x1: left, x2: w - 8, y1: y(v), y2: y(v), stroke: "#d0d7de" }));
    const t = el("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#57606a" });
    t.textContent = v;
    svg.append(t);
  }
  for (const [i, anchor] of [[0, "start"], [points.length - 1, "end"]]) {
    const t = el("text", { x: x(i), y: h - 6, "text-anchor": anchor, "font-size": 11, fill: "#57606a" });
    t.textContent = points[i].t.replace("T", " ").slice(0, 16);
    svg.append(t);
  }
  for (const [key, color] of [...SERIES].reverse()) {  // size drawn last: on top
    svg.append(el("path", { d: path(points.map((p) => p[key]), x, y), fill: "none", stroke: color,
      "stroke-width": key === "size" ? 2 : 1.5, "data-series": key }));
  }
  return svg;
}

export const SERIES = [["size", "#0b5cad"], ["entered", "#116329"], ["exited", "#a40e26"]];
