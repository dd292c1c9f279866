// Dataset files parsed in the browser, with the rules of mangwale_cli/datafile.py:
// JSONL ({"text", "intent", "entities"?} per line), a JSON array of the same, or CSV with a header
// naming `text` and `intent` (or `category`, or `label`). Errors name the line.

export class DataFileError extends Error {
  constructor(message, line = null) {
    super(line === null ? message : `line ${line}: ${message}`);
    this.line = line;
  }
}

const INTENT_COLUMNS = ["intent", "category", "label"];

export function detectFormat(text, filename) {
  const lower = (filename || "").toLowerCase();
  if (lower.endsWith(".jsonl") || lower.endsWith(".ndjson")) return "jsonl";
  if (lower.endsWith(".csv")) return "csv";
  if (lower.endsWith(".json")) return "json";
  const head = text.trimStart();
  if (head.startsWith("[")) return "json";
  if (head.startsWith("{")) return "jsonl";
  return "csv";
}

function field(value, name, line) {
  if (value === undefined || value === null) throw new DataFileError(`missing '${name}'`, line);
  if (typeof value !== "string") throw new DataFileError(`'${name}' must be a string, got ${typeof value}`, line);
  const v = value.trim();
  if (!v) throw new DataFileError(`empty '${name}'`, line);
  return v;
}

function example(obj, line) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj)) {
    throw new DataFileError(`expected a JSON object, got ${Array.isArray(obj) ? "array" : typeof obj}`, line);
  }
  const raw = obj.text;
  const text = field(raw, "text", line);
  const ex = { text, intent: field(obj.intent, "intent", line) };
  if (Array.isArray(obj.entities) && obj.entities.length) {
    const shift = raw.length - raw.trimStart().length;
    ex.entities = obj.entities.map((e, i) => {
      const start = e.start - shift;
      const end = e.end - shift;
      if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end <= start || end > text.length) {
        throw new DataFileError(`entity ${i}: span ${e.start}:${e.end} is out of range`, line);
      }
      if (text.slice(start, end) !== e.value) {
        throw new DataFileError(`entity ${i}: value ${JSON.stringify(e.value)} does not match the text`, line);
      }
      return { start, end, value: e.value, entity: field(e.entity, "entity", line) };
    });
  }
  return ex;
}

function parseJsonl(text) {
  const out = [];
  text.split(/\r\n|\n|\r/).forEach((raw, i) => {
    if (!raw.trim()) return;
    let obj;
    try {
      obj = JSON.parse(raw);
    } catch (err) {
      throw new DataFileError(`invalid JSON: ${err.message}`, i + 1);
    }
    out.push(example(obj, i + 1));
  });
  return out;
}

function parseJson(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new DataFileError(`invalid JSON: ${err.message}`);
  }
  if (!Array.isArray(data)) throw new DataFileError("expected a JSON array of objects");
  return data.map((obj, i) => example(obj, i + 1));
}

/** RFC 4180 rows: [cells, lineNumberWhereTheRowStarts]. */
export function csvRows(text) {
  const rows = [];
  let row = [];
  let cell = "";
  let quoted = false;
  let line = 1;
  let rowLine = 1;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          cell += '"';
          i++;
        } else quoted = false;
      } else {
        if (c === "\n") line++;
        cell += c;
      }
    } else if (c === '"' && cell === "") {
      quoted = true;
    } else if (c === ",") {
      row.push(cell);
      cell = "";
    } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(cell);
      rows.push([row, rowLine]);
      row = [];
      cell = "";
      line++;
      rowLine = line;
    } else {
      cell += c;
    }
  }
  if (quoted) throw new DataFileError("invalid CSV: unterminated quoted field", rowLine);
  if (cell !== "" || row.length) {
    row.push(cell);
    rows.push([row, rowLine]);
  }
  return rows;
}

function parseCsv(text) {
  const rows = csvRows(text).filter(([cells]) => cells.some((c) => c.trim()));
  if (!rows.length) throw new DataFileError("empty file: no examples found");
  const [header, headerLine] = rows[0];
  const cols = header.map((c) => c.trim().toLowerCase());
  const ti = cols.indexOf("text");
  const ii = INTENT_COLUMNS.map((c) => cols.indexOf(c)).find((i) => i >= 0);
  if (ti < 0 || ii === undefined) {
    const missing = [ti < 0 ? "text" : null, ii === undefined ? "intent" : null].filter(Boolean);
    const hint = ii === undefined ? " ('category' or 'label' may replace 'intent')" : "";
    throw new DataFileError(
      `CSV header is missing required column(s) ${missing.join(", ")}${hint}; found: ${cols.join(", ") || "none"}`,
      headerLine,
    );
  }
  return rows.slice(1).map(([cells, line]) => {
    if (cells.length <= Math.max(ti, ii)) {
      throw new DataFileError(`row has ${cells.length} field(s), expected at least ${Math.max(ti, ii) + 1}`, line);
    }
    return { text: field(cells[ti], "text", line), intent: field(cells[ii], "intent", line) };
  });
}

/** The examples of a dataset file; throws DataFileError naming the line of the first problem. */
export function parseExamples(text, filename) {
  if (text.startsWith("\ufeff")) text = text.slice(1);
  if (!text.trim()) throw new DataFileError("empty file: no examples found");
  const fmt = detectFormat(text, filename);
  const examples = fmt === "jsonl" ? parseJsonl(text) : fmt === "json" ? parseJson(text) : parseCsv(text);
  if (!examples.length) {
    const what = fmt === "csv" ? "only a header line" : "no example in it";
    throw new DataFileError(`no examples found: the file has ${what}`);
  }
  return examples;
}
