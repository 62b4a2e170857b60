// Pure helpers over a usage report (GET /api/usage): time buckets, chart series, totals, CSV, formatting.
// Times are UTC throughout, like the API's buckets (a day is 00:00-24:00 UTC).

export const HOUR = 3600;
export const DAY = 86400;
export const MAX_SERIES = 8; // past this, the smallest series share one "Other" colour

export const METRICS = {
  requests: { label: "Requests", of: (r) => r.requests, format: (v) => formatInt(v) },
  tokens: { label: "Tokens", of: (r) => r.prompt_tokens + r.completion_tokens, format: (v) => formatInt(v) },
  cost: { label: "Cost (USD)", of: (r) => r.cost_micro, format: (v) => formatUsd(v) },
};

export function stepOf(report) {
  return report.group_by === "hour" ? HOUR : DAY;
}

/** Every bucket start of the report's range, empty ones included, so the time axis has no gaps. */
export function bucketStarts(report) {
  const step = stepOf(report);
  const out = [];
  for (let t = Math.floor(report.from / step) * step; t < report.to; t += step) out.push(t);
  return out;
}

/** Stacked-chart series: one per key or model (`split`), values per bucket of `metric`, largest first. */
export function chartSeries(report, split, metric, labelOf) {
  const times = bucketStarts(report);
  const index = new Map(times.map((t, i) => [t, i]));
  const of = METRICS[metric].of;
  const byId = new Map();
  for (const row of report.data) {
    const id = split === "model" ? row.model : row.key_id;
    let s = byId.get(id);
    if (!s) {
      s = { id, label: split === "model" ? id : labelOf(id), values: new Array(times.length).fill(0), total: 0 };
      byId.set(id, s);
    }
    const i = index.get(Math.floor(row.start / stepOf(report)) * stepOf(report));
    const v = of(row);
    if (i !== undefined) s.values[i] += v;
    s.total += v;
  }
  let series = [...byId.values()].sort((a, b) => b.total - a.total || a.label.localeCompare(b.label));
  if (series.length > MAX_SERIES) {
    const rest = series.slice(MAX_SERIES - 1);
    const other = { id: "", label: `${rest.length} others`, values: new Array(times.length).fill(0), total: 0 };
    for (const s of rest) {
      s.values.forEach((v, i) => { other.values[i] += v; });
      other.total += s.total;
    }
    series = [...series.slice(0, MAX_SERIES - 1), other];
  }
  return { times, series };
}

export function sumRows(rows) {
  const t = { requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_micro: 0 };
  for (const r of rows) {
    t.requests += r.requests;
    t.prompt_tokens += r.prompt_tokens;
    t.completion_tokens += r.completion_tokens;
    t.cost_micro += r.cost_micro;
  }
  return t;
}

// --- CSV --------------------------------------------------------------------------------------------------
export const CSV_COLUMNS = ["period_start", "period_start_unix", "period", "key_id", "key_name", "model",
  "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "cost_micro"];

function csvField(value) {
  let s = String(value);
  if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // a spreadsheet must not run a key name as a formula
  return /[",\r\n]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
}

/** The report's rows (every key, model and period with usage) in time order, one CSV line each. */
export function toCsv(report, nameOf) {
  const rows = [...report.data].sort((a, b) => a.start - b.start || a.key_id.localeCompare(b.key_id)
    || a.model.localeCompare(b.model));
  const lines = [CSV_COLUMNS.join(",")];
  for (const r of rows) {
    lines.push([formatTime(r.start, true).replace(" ", "T") + ":00Z", r.start, report.group_by, r.key_id,
      nameOf(r.key_id), r.model, r.requests, r.prompt_tokens, r.completion_tokens,
      r.prompt_tokens + r.completion_tokens, microToDecimal(r.cost_micro), r.cost_micro].map(csvField).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

// --- formatting -------------------------------------------------------------------------------------------
const intFormat = new Intl.NumberFormat("en-US");

export function formatInt(n) {
  return intFormat.format(n);
}

/** Integer micro-dollars as an exact decimal string (no float rounding): 1234567 -> "1.234567". */
export function microToDecimal(micro) {
  const sign = micro < 0 ? "-" : "";
  const m = Math.abs(micro);
  return `${sign}${Math.floor(m / 1e6)}.${String(m % 1e6).padStart(6, "0")}`;
}

/** "$0.000123", "$12.50": at least two decimals, up to six when the amount needs them. */
export function formatUsd(micro) {
  const [whole, frac] = microToDecimal(micro).split(".");
  const trimmed = frac.replace(/0+$/, "");
  return `$${intFormat.format(Number(whole))}.${trimmed.padEnd(2, "0")}`.replace("$-", "-$");
}

/** "$1,234.000567": every micro-dollar, for tables whose amounts line up. */
export function formatUsdExact(micro) {
  const [whole, frac] = microToDecimal(micro).split(".");
  return `$${intFormat.format(Number(whole))}.${frac}`.replace("$-", "-$");
}

/** "2025-06-01 14:00–15:00": the UTC hour that starts at `unix`. */
export function formatHour(unix) {
  const end = formatTime(unix + 3600).slice(11);
  return `${formatTime(unix)}–${end === "00:00" ? "24:00" : end}`;
}

/** "2025-06-01 14:00" (withTime) or "2025-06-01", UTC. */
export function formatTime(unix, withTime = true) {
  const iso = new Date(unix * 1000).toISOString();
  return withTime ? `${iso.slice(0, 10)} ${iso.slice(11, 16)}` : iso.slice(0, 10);
}

export function formatPeriod(start, groupBy) {
  return groupBy === "hour" ? formatTime(start, true) : formatTime(start, false);
}
