// A small SVG line chart: one series, one point per report (an epoch), no dependencies.

const NS = "http://www.w3.org/2000/svg";
const W = 320;
const H = 170;
const PAD = { left: 44, right: 12, top: 12, bottom: 26 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

function short(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 1) return +v.toFixed(2) + "";
  return +v.toPrecision(2) + "";
}

/**
 * Draw `points` ([{x, y, label}]) into `container` (replacing what was there).
 * options: title, series (a CSS class), yMin, yMax (fixed domain ends), xMax (e.g. total epochs),
 * format (value -> text for tooltips and the latest value).
 */
export function lineChart(container, points, options = {}) {
  const { title = "", series = "s1", format = short } = options;
  const svg = el("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: `chart ${series}`,
    role: "img",
    "aria-label": `${title}: ${points.length} point${points.length === 1 ? "" : "s"}`,
  });
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const xLo = 1;
  const xHi = Math.max(options.xMax || 1, ...xs, 2);
  let yLo = options.yMin ?? Math.min(0, ...ys);
  let yHi = options.yMax ?? Math.max(...ys, yLo + 1e-9) * 1.1;
  if (!(yHi > yLo)) yHi = yLo + 1;
  const px = (x) => PAD.left + ((x - xLo) / (xHi - xLo)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - yLo) / (yHi - yLo)) * (H - PAD.top - PAD.bottom);

  const grid = el("g", { class: "grid" });
  for (const t of niceTicks(yLo, yHi, 4)) {
    grid.append(el("line", { x1: PAD.left, x2: W - PAD.right, y1: py(t), y2: py(t) }));
    grid.append(el("text", { x: PAD.left - 6, y: py(t) + 3.5, "text-anchor": "end" }, short(t)));
  }
  const xTicks = niceTicks(xLo, xHi, Math.min(8, xHi - xLo)).filter((t) => Number.isInteger(t));
  for (const t of xTicks) {
    grid.append(el("text", { x: px(t), y: H - PAD.bottom + 15, "text-anchor": "middle" }, String(t)));
  }
  grid.append(el("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
  svg.append(grid);

  if (!points.length) {
    svg.append(el("text", { class: "waiting", x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first epoch…"));
  } else {
    const d = points.map((p, i) => `${i ? "L" : "M"}${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join(" ");
    svg.append(el("path", { class: "line", d }));
    const dots = el("g", { class: "points" });
    for (const p of points) {
      const c = el("circle", { class: "pt", cx: px(p.x).toFixed(1), cy: py(p.y).toFixed(1), r: 3.5, "data-x": p.x, "data-y": p.y });
      c.append(el("title", {}, `${p.label || "epoch " + p.x}: ${format(p.y)}`));
      dots.append(c);
    }
    svg.append(dots);
  }

  const head = document.createElement("div");
  head.className = "chart-head";
  const h = document.createElement("span");
  h.className = "chart-title";
  h.textContent = title;
  const last = document.createElement("span");
  last.className = "chart-last";
  last.textContent = points.length ? format(points[points.length - 1].y) : "–";
  head.append(h, last);
  container.replaceChildren(head, svg);
}
