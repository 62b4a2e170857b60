// A stacked bar chart drawn as SVG elements (no HTML strings, no library). Every segment carries its value
// (`data-value`) and a <title> tooltip; the figure is one labelled image, and the tables beside it hold the
// same numbers for screen readers and keyboards.

const NS = "http://www.w3.org/2000/svg";
const DAY_S = 86400;
const TICK_STEPS = [1, 2, 3, 6, 12, 24, 48, 168, 336, 720, 2160].map((hours) => hours * 3600);
let uid = 0;

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** 1, 2 or 5 times a power of ten, at least `raw`. */
function niceStep(raw) {
  if (raw <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/**
 * Draw into `box` (replacing what was there).
 * chart = { times: [unix], step (seconds per bar), series: [{label, values}], title, description,
 *           integer (value ticks are whole numbers), formatValue(v), formatTime(t) (tooltips) }.
 * Times are UTC: the time axis names days as MM-DD and hours as HH:00.
 */
export function drawStackedBars(box, chart) {
  const width = Math.max(280, Math.floor(box.clientWidth || 640));
  const height = width < 500 ? 200 : 260;
  const n = chart.times.length;
  const stacks = chart.times.map((_, i) => chart.series.reduce((sum, s) => sum + s.values[i], 0));
  const max = Math.max(0, ...stacks);
  const ticks = 4;
  const step = chart.integer ? Math.max(1, niceStep(max / ticks)) : niceStep(max / ticks);
  const top = max > 0 ? Math.ceil(max / step) * step : step * ticks;
  const tickLabels = [];
  for (let v = 0; v <= top + step / 2; v += step) tickLabels.push([v, chart.formatValue(v)]);
  const left = 12 + 7.5 * Math.max(...tickLabels.map(([, s]) => s.length));
  const m = { left, right: 8, top: 10, bottom: 26 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const y = (v) => m.top + plotH - (v / top) * plotH;
  const band = plotW / Math.max(1, n);

  const id = `chart-${++uid}`;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                            "aria-labelledby": `${id}-t`, "aria-describedby": `${id}-d` });
  root.append(svg("title", { id: `${id}-t` }, chart.title), svg("desc", { id: `${id}-d` }, chart.description));

  for (const [v, label] of tickLabels) {
    root.append(svg("line", { class: "grid", x1: m.left, x2: width - m.right, y1: y(v), y2: y(v) }));
    root.append(svg("text", { x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, label));
  }

  const bars = svg("g", { "aria-hidden": "true" });
  const barW = Math.max(1, band * (n > 60 ? 0.9 : 0.7));
  chart.times.forEach((t, i) => {
    let acc = 0;
    chart.series.forEach((s, si) => {
      const v = s.values[i];
      if (v <= 0) return;
      const y0 = y(acc);
      acc += v;
      const rect = svg("rect", {
        class: `bar s${si}`, x: m.left + i * band + (band - barW) / 2, y: y(acc), width: barW,
        height: Math.max(1, y0 - y(acc)), "data-series": s.label, "data-time": t, "data-value": v,
      });
      rect.append(svg("title", {}, `${chart.formatTime(t)} · ${s.label}: ${chart.formatValue(v)}`));
      bars.append(rect);
    });
  });
  root.append(bars);

  // Time labels on round boundaries (every 3 hours, every day, every week...), as many as fit without touching.
  const labelW = 7 * 5 + 14; // "MM-DD" or "HH:00"
  const tickStep = TICK_STEPS.find((t) => t >= chart.step && (t / chart.step) * band >= labelW) ?? TICK_STEPS.at(-1);
  chart.times.forEach((t, i) => {
    if (t % tickStep) return;
    const x = m.left + i * band + band / 2;
    if (x < labelW / 2 || x > width - labelW / 2) return;
    const iso = new Date(t * 1000).toISOString();
    const label = tickStep < DAY_S && t % DAY_S ? iso.slice(11, 16) : iso.slice(5, 10);
    root.append(svg("line", { class: "axis", x1: x, x2: x, y1: m.top + plotH, y2: m.top + plotH + 4 }));
    root.append(svg("text", { x, y: height - 6, "text-anchor": "middle" }, label));
  });
  root.append(svg("line", { class: "axis", x1: m.left, x2: width - m.right, y1: m.top + plotH, y2: m.top + plotH }));
  if (max === 0) {
    root.append(svg("text", { x: m.left + plotW / 2, y: m.top + plotH / 2, "text-anchor": "middle" },
                    "No usage in this range"));
  }
  box.replaceChildren(root);
}
