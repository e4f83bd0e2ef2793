// The console: client-side routes over the management API (no framework, no build step).
import { ApiError, get, request, stream, scopeMessage } from "./api.js";
import { chart, sparkline, SERIES } from "./charts.js";

const main = document.getElementById("main");
let pageAbort = new AbortController();  // ends a page's streams and timers when it is left

// -- tiny DOM helpers ---------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const link = (href, text, attrs = {}) => h("a", { href, "data-link": true, ...attrs }, text);
const enc = encodeURIComponent;
const fmt = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en"));
const when = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, " UTC") : "—");

function page(title, ...children) {
  document.title = `${title} · Audiences console`;
  main.replaceChildren(h("h1", {}, title), ...children);
}
function failure(error, what = "load this page") {
  return h("p", { class: "error", role: "alert" }, scopeMessage(error, what) || `Could not ${what}: ${error.message}`);
}

// -- routing ------------------------------------------------------------------------------
const ROUTES = [
  [/^\/ui\/?$/, audiencesPage, "audiences"],
  [/^\/ui\/audiences\/([^/]+)\/?$/, audiencePage, "audiences"],
  [/^\/ui\/users\/([^/]+)\/?$/, userPage, null],
  [/^\/ui\/users\/?$/, userSearchPage, null],
  [/^\/ui\/live\/?$/, livePage, "live"],
  [/^\/ui\/new\/?$/, editorPage, "new"],
];

export function navigate(href) {
  history.pushState(null, "", href);
  render();
}

async function render() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const url = new URL(location.href);
  for (const [pattern, view, nav] of ROUTES) {
    const match = url.pathname.match(pattern);
    if (!match) continue;
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      await view(url, ...match.slice(1).map(decodeURIComponent));
    } catch (error) {
      if (error.name !== "AbortError") main.replaceChildren(failure(error));
    }
    return;
  }
  page("Not found", h("p", {}, "No page at this address. ", link("/ui", "See the audiences.")));
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-link]");
  if (!a || event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", render);
document.getElementById("user-search").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = event.target.elements.id.value.trim();
  if (id) navigate(`/ui/users/${enc(id)}`);
});

// -- history (GET /v1/audiences/{key}/history) ----------------------------------------------
async function sizeHistory(key, params = "") {
  try {
    const points = await get(`/v1/audiences/${enc(key)}/history${params}`, { signal: pageAbort.signal });
    return Array.isArray(points) ? points : [];
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 400)) return [];
    throw error;
  }
}
const noHistory = () => h("span", { class: "muted" }, "no history yet");

// -- audiences ------------------------------------------------------------------------------
async function audiencesPage(url) {
  const [{ audiences }, { traits }] = await Promise.all([get("/v1/audiences"), get("/v1/traits")]);
  const rows = [
    ...audiences.map((a) => ({ ...a, type: a.kind === "priority" ? "priority list" : "audience", entered: null, exited: null, points: null })),
    ...traits.map((t) => ({ ...t, type: `trait (${t.kind})`, size: null, entered: null, exited: null, points: null })),
  ];
  let sort = url.searchParams.get("sort") || "name", desc = url.searchParams.get("desc") === "1";
  const filter = h("input", { id: "filter", type: "search", value: url.searchParams.get("q") || "", placeholder: "name or key" });
  const tbody = h("tbody");
  const columns = [["name", "Name"], ["key", "Key", "hide-narrow"], ["type", "Type", "hide-narrow"], ["version", "Version", "num"],
    ["size", "Size", "num"], ["entered", "Entered 1h", "num hide-narrow"], ["exited", "Exited 1h", "num hide-narrow"]];
  const headRow = h("tr");
  function draw() {
    const q = filter.value.trim().toLowerCase();
    const shown = rows.filter((r) => !q || r.key.toLowerCase().includes(q) || String(r.name).toLowerCase().includes(q));
    shown.sort((a, b) => {  // rows without a value (traits have no size) last either way
      const x = a[sort], y = b[sort];
      if (x === null || y === null) return (x === null) - (y === null);
      const c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return desc ? -c : c;
    });
    tbody.replaceChildren(...shown.map((r) => h("tr", { "data-key": r.key },
      h("td", {}, r.type.startsWith("trait") ? r.name : link(`/ui/audiences/${enc(r.key)}`, r.name)),
      h("td", { class: "hide-narrow" }, h("code", {}, r.key)), h("td", { class: "hide-narrow" }, r.type), h("td", { class: "num" }, r.version),
      h("td", { class: "num", "data-col": "size" }, fmt(r.size)),
      h("td", { class: "num hide-narrow", "data-col": "entered" }, fmt(r.entered)),
      h("td", { class: "num hide-narrow", "data-col": "exited" }, fmt(r.exited)),
      h("td", { class: "hide-narrow" }, r.points === null ? "" : r.points.length ? sparkline(r.points, `size of ${r.name} over the last hour`) : noHistory()))));
    headRow.replaceChildren(...columns.map(([key, label, cls]) => h("th", { class: cls, "aria-sort": key === sort ? (desc ? "descending" : "ascending") : "none", scope: "col" },
      h("button", { type: "button", onclick: () => { desc = key === sort ? !desc : false; sort = key; keep(); draw(); } }, label, key === sort ? h("span", { "aria-hidden": "true" }, desc ? " ▼" : " ▲") : ""))),
      h("th", { class: "hide-narrow", scope: "col" }, "Size, last hour"));
  }
  function keep() {
    const next = new URL(location.href);
    for (const [k, v] of [["q", filter.value.trim()], ["sort", sort === "name" ? "" : sort], ["desc", desc ? "1" : ""]]) {
      if (v) next.searchParams.set(k, v); else next.searchParams.delete(k);
    }
    history.replaceState(null, "", next);
  }
  filter.addEventListener("input", () => { keep(); draw(); });
  page("Audiences",
    h("div", { class: "toolbar" }, h("label", { for: "filter" }, "Filter"), filter,
      h("span", { class: "muted" }, `${audiences.length} audience${audiences.length === 1 ? "" : "s"}, ${traits.length} computed trait${traits.length === 1 ? "" : "s"}`), link("/ui/new", "New audience")),
    h("div", { class: "table-wrap" }, h("table", { "aria-label": "Audiences and computed traits" }, h("thead", {}, headRow), tbody)));
  draw();
  await Promise.all(rows.filter((r) => !r.type.startsWith("trait")).map(async (r) => {
    const points = await sizeHistory(r.key).catch(() => []);
    r.points = points;
    r.entered = points.reduce((s, p) => s + p.entered, 0);
    r.exited = points.reduce((s, p) => s + p.exited, 0);
  }));
  draw();
}

// -- one audience ---------------------------------------------------------------------------
function conditionTree(node) {
  if (node === null || typeof node !== "object") return h("li", {}, JSON.stringify(node));
  const [[name, body]] = Object.entries(node).length ? Object.entries(node) : [["?", null]];
  if ((name === "and" || name === "or") && Array.isArray(body)) {
    return h("li", {}, h("strong", {}, name === "and" ? "all of" : "any of"), h("ul", {}, body.map(conditionTree)));
  }
  if (name === "not") return h("li", {}, h("strong", {}, "not"), h("ul", {}, conditionTree(body)));
  const detail = body && typeof body === "object" ? Object.entries(body).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(", ") : JSON.stringify(body);
  return h("li", {}, h("strong", {}, name), " ", h("span", {}, detail));
}

const RANGES = [["1h", 3600e3, "1m"], ["6h", 6 * 3600e3, "5m"], ["24h", 24 * 3600e3, "15m"], ["7d", 7 * 86400e3, "1h"]];

async function audiencePage(url, key) {
  const doc = await get(`/v1/audiences/${enc(key)}`);
  const { version, size, ...definition } = doc;
  const chartBox = h("div", { class: "chart", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading history…"));
  const range = h("select", { id: "range" }, RANGES.map(([name]) => h("option", { value: name }, `last ${name}`)));
  range.value = url.searchParams.get("range") || "1h";
  const members = h("tbody"), more = h("div");
  const feed = h("ul", { class: "feed", "aria-live": "polite", "data-testid": "audience-feed" });
  const live = h("p", { class: "muted", "data-state": "connecting" }, "Connecting to live transitions…");
  const dests = h("div", {}, h("p", { class: "muted" }, "Loading destinations…"));
  page(doc.name || key,
    h("p", {}, h("code", {}, key), ` · version `, h("span", { "data-testid": "version" }, version), " · ",
      link(`/ui/new?key=${enc(key)}`, "Edit"), " · ", link(`/ui/live?audience=${enc(key)}`, "Live feed")),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "Size"), h("div", { class: "value", "data-testid": "size" }, fmt(size))),
      h("div", { class: "card" }, h("div", { class: "label" }, "Version"), h("div", { class: "value" }, version))),
    h("h2", {}, "Size over time"),
    h("div", { class: "toolbar" }, h("label", { for: "range" }, "Range"), range,
      h("div", { class: "legend" }, SERIES.map(([name, color]) => h("span", {}, h("span", { class: "swatch", style: `background:${color}` }), name)))),
    chartBox,
    h("div", { class: "grid2" },
      h("section", { "aria-labelledby": "def-h" }, h("h2", { id: "def-h" }, "Definition"),
        definition.condition ? h("ul", { class: "tree" }, conditionTree(definition.condition)) : h("p", {}, `Priority list of ${(definition.audiences || []).join(", ")}`),
        h("details", {}, h("summary", {}, "JSON"), h("pre", {}, JSON.stringify(definition, null, 2)))),
      h("section", { "aria-labelledby": "live-h" }, h("h2", { id: "live-h" }, "Latest transitions"), live, feed)),
    h("h2", {}, "Destinations"), dests,
    h("h2", {}, "Members"),
    h("div", { class: "table-wrap" }, h("table", { "aria-label": "Members" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "User"), h("th", { scope: "col" }, "Entered at"))), members)), more);

  async function drawChart() {
    const [name, span, step] = RANGES.find((r) => r[0] === range.value) || RANGES[0];
    let points = await sizeHistory(key, "?step=1m");  // the last hour by the worker's clock
    if (name !== "1h" && points.length) {
      const to = Date.parse(points[points.length - 1].t) + 60e3;
      points = await sizeHistory(key, `?from=${new Date(to - span).toISOString()}&to=${new Date(to).toISOString()}&step=${step}`);
    }
    chartBox.replaceChildren(points.length ? chart(points) : noHistory());
  }
  range.addEventListener("change", () => {
    const next = new URL(location.href); next.searchParams.set("range", range.value);
    history.replaceState(null, "", next); drawChart().catch((e) => chartBox.replaceChildren(failure(e, "load the history")));
  });
  drawChart().catch((e) => chartBox.replaceChildren(failure(e, "load the history")));

  async function page_(cursor) {
    const data = await get(`/v1/audiences/${enc(key)}/members?limit=25${cursor ? `&cursor=${enc(cursor)}` : ""}`);
    members.append(...data.members.map((m) => h("tr", {}, h("td", {}, link(`/ui/users/${enc(m.id)}`, m.id)), h("td", {}, when(m.entered_at)))));
    more.replaceChildren(data.next_cursor ? h("button", { type: "button", class: "secondary", onclick: () => page_(data.next_cursor) }, "More members") :
      h("p", { class: "muted" }, members.children.length ? "All members shown." : "No members."));
  }
  if (doc.kind !== "priority") page_(null).catch((e) => more.replaceChildren(failure(e, "list the members")));

  get(`/v1/destinations?audience=${enc(key)}`).then(({ destinations }) => {
    dests.replaceChildren(destinations.length ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Destinations" },
      h("thead", {}, h("tr", {}, ["Destination", "Type", "Delivered", "Retries", "Queued", "Dead-lettered", "State"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, destinations.map((d) => h("tr", {}, h("td", {}, d.name), h("td", {}, d.type || "—"), h("td", { class: "num" }, fmt(d.delivered)),
        h("td", { class: "num" }, fmt(d.retries)), h("td", { class: "num" }, fmt(d.queue_depth)), h("td", { class: "num" }, fmt(d.dead_lettered)),
        h("td", { class: d.paused ? "warn" : "ok" }, d.paused ? "paused (credentials refused)" : "active")))))) :
      h("p", { class: "muted" }, "This worker delivers this audience to no destination."));
  }).catch((e) => dests.replaceChildren(failure(e, "read the destinations")));

  follow(`/v1/transitions/stream?audience=${enc(key)}`, feed, live);
}

// -- live transitions -----------------------------------------------------------------------
function describe(out) {
  const p = out.properties || {};
  const who = out.userId || out.anonymousId;
  if (out.event === "Trait Computed") return [who, "=", `${p.trait_key}: ${JSON.stringify(p[p.trait_key])}`];
  if (out.event === "User Deleted") return [who, "×", "deleted"];
  return [who, out.event === "Audience Entered" ? "entered" : "exited", p.audience_key];
}

function follow(path, feed, status) {
  const signal = pageAbort.signal;
  stream(path, (event, data) => {
    if (event === "ready") { status.textContent = "Live: new transitions appear here as they happen."; status.dataset.state = "live"; }
    else if (event === "failure") { status.textContent = data.error; status.dataset.state = "failed"; status.className = "error"; }
    else if (event === "transition") {
      const [who, verb, what] = describe(data);
      feed.prepend(h("li", { "data-user": who }, `${when(data.timestamp)}  `, link(`/ui/users/${enc(who)}`, who), ` ${verb} `, h("strong", {}, what)));
      while (feed.children.length > 200) feed.lastChild.remove();
    }
  }, signal).catch((error) => {
    if (error.name === "AbortError") return;
    status.textContent = scopeMessage(error, "follow transitions") || `The live stream stopped: ${error.message}`;
    status.dataset.state = "failed"; status.className = "error";
  });
}

async function livePage(url) {
  const audience = url.searchParams.get("audience") || "";
  const { audiences } = await get("/v1/audiences");
  const { traits } = await get("/v1/traits");
  const select = h("select", { id: "live-filter" }, h("option", { value: "" }, "every audience and trait"),
    [...audiences, ...traits].map((a) => h("option", { value: a.key }, `${a.name} (${a.key})`)));
  select.value = audience;
  select.addEventListener("change", () => navigate(select.value ? `/ui/live?audience=${enc(select.value)}` : "/ui/live"));
  const feed = h("ul", { class: "feed", "aria-live": "polite", "data-testid": "live-feed" });
  const status = h("p", { class: "muted", "data-state": "connecting" }, "Connecting…");
  page("Live transitions", h("div", { class: "toolbar" }, h("label", { for: "live-filter" }, "Show"), select), status, feed);
  follow(`/v1/transitions/stream${audience ? `?audience=${enc(audience)}` : ""}`, feed, status);
}

// -- editor with preview ----------------------------------------------------------------------
const TEMPLATE = { key: "new_audience", name: "New audience", condition: { performed: { event: "Order Completed", within: "30d" } } };

async function editorPage(url) {
  const key = url.searchParams.get("key");
  let start = TEMPLATE, current = null;
  if (key) {
    const doc = await get(`/v1/audiences/${enc(key)}`);
    const { version, size, created_at, ...definition } = doc;
    start = definition; current = version;
  }
  const text = h("textarea", { id: "definition", spellcheck: "false", "aria-describedby": "problems" });
  text.value = JSON.stringify(start, null, 2);
  const problems = h("div", { id: "problems", role: "status", "aria-live": "polite" });
  const result = h("div", { "aria-live": "polite" });
  const saveNote = h("p", { id: "save-note", role: "status" });
  const save = h("button", { type: "button", id: "save", "aria-describedby": "save-note" }, "Save");
  page(key ? `Edit ${key}` : "New audience",
    h("p", { class: "muted" }, key ? `Version ${current}. ` : "", "Edit the definition as JSON; it is checked and previewed against every profile as you type, and saved with Save (needs a `write` token)."),
    h("div", { class: "grid2 editor" },
      h("div", {}, h("label", { for: "definition" }, "Definition (JSON)"), text, problems, h("div", { class: "toolbar" }, save), saveNote),
      h("section", { "aria-labelledby": "preview-h" }, h("h2", { id: "preview-h" }, "Preview"), result)));
  let timer = null, seq = 0;
  const signal = pageAbort.signal;
  async function check() {
    const mine = ++seq;
    let doc;
    try { doc = JSON.parse(text.value); } catch (error) {
      problems.replaceChildren(h("p", { class: "error", "data-path": "$" }, `Not JSON: ${error.message}`));
      return;
    }
    if (!doc || typeof doc !== "object" || (!doc.condition && !doc.audiences)) {
      problems.replaceChildren(h("p", { class: "muted" }, "A computed trait (no `condition`) is checked when saved; only audiences have a preview."));
      result.replaceChildren();
      return;
    }
    problems.replaceChildren(h("p", { class: "muted" }, "Checking…"));
    try {
      const p = await request("POST", "/v1/audiences/preview?sample=5", doc, { signal });
      if (mine !== seq) return;
      problems.replaceChildren(h("p", { class: "ok" }, "Valid."));
      const list = (title, ids, id) => h("div", {}, h("h3", {}, title), ids.length ? h("ul", { "data-testid": id }, ids.map((u) => h("li", {}, link(`/ui/users/${enc(u)}`, u)))) : h("p", { class: "muted", "data-testid": id }, "none"));
      result.replaceChildren(
        h("div", { class: "cards" },
          h("div", { class: "card" }, h("div", { class: "label" }, "Size"), h("div", { class: "value", "data-testid": "preview-size" }, fmt(p.size))),
          h("div", { class: "card" }, h("div", { class: "label" }, "Would enter"), h("div", { class: "value", "data-testid": "preview-entering" }, fmt(p.entering))),
          h("div", { class: "card" }, h("div", { class: "label" }, "Would exit"), h("div", { class: "value", "data-testid": "preview-exiting" }, fmt(p.exiting))),
          h("div", { class: "card" }, h("div", { class: "label" }, "Profiles read"), h("div", { class: "value" }, fmt(p.profiles)))),
        list("Sample members", p.sample, "preview-sample"), list("Would enter", p.would_enter, "would-enter"), list("Would exit", p.would_exit, "would-exit"));
    } catch (error) {
      if (mine !== seq || error.name === "AbortError") return;
      if (error instanceof ApiError && error.status === 422) {
        const b = error.body;
        problems.replaceChildren(h("p", { class: "error", "data-path": b.path || "$" }, h("code", {}, b.path || "$"), ` ${b.error}`,
          b.suggestion ? ` — did you mean ${JSON.stringify(b.suggestion)}?` : ""));
      } else problems.replaceChildren(failure(error, "preview"));
    }
  }
  text.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 350); });
  save.addEventListener("click", async () => {
    let doc;
    try { doc = JSON.parse(text.value); } catch (error) { saveNote.textContent = `Not JSON: ${error.message}`; saveNote.className = "error"; return; }
    const kind = doc.condition || doc.audiences ? "audiences" : "traits";
    saveNote.textContent = "Saving…"; saveNote.className = "muted";
    try {
      const answer = await request("PUT", `/v1/${kind}/${enc(doc.key || "")}`, doc);
      saveNote.className = "ok";
      saveNote.replaceChildren(answer.changed ? `Saved: version ${answer.version}. ` : `Unchanged: still version ${answer.version}. `,
        kind === "audiences" ? link(`/ui/audiences/${enc(answer.key)}`, "Open the audience") : "");
    } catch (error) {
      saveNote.className = "error";
      if (error instanceof ApiError && error.status === 403) {
        save.setAttribute("aria-disabled", "true");
        saveNote.textContent = `Cannot save with this token: ${error.message}. Saving needs a token with the "write" scope.`;
      } else if (error instanceof ApiError && error.status === 422) {
        saveNote.textContent = `Not saved: ${error.body.path || "$"} ${error.message}`;
      } else saveNote.textContent = `Not saved: ${error.message}`;
    }
  });
  check();
}

// -- users ----------------------------------------------------------------------------------
function userSearchPage() {
  page("Find a user", h("p", {}, "Search by user id or anonymous id with the box at the top."));
  document.getElementById("user-search-id").focus();
}

function table(label, head, rows) {
  return rows.length ? h("div", { class: "table-wrap" }, h("table", { "aria-label": label },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))))
    : h("p", { class: "muted" }, `No ${label.toLowerCase()}.`);
}
const value = (v) => (typeof v === "object" && v !== null ? JSON.stringify(v) : String(v));

function explainNode(node) {
  const { condition, definition, value: v, children, changes_at_ms, changes_at, ...evidence } = node;
  const keep = Object.entries(evidence).filter(([k]) => !k.endsWith("_ms"));
  const body = definition && condition && typeof definition === "object" ? definition[condition] : undefined;
  return h("li", {},
    h("span", { class: `pill ${v ? "true" : "false"}` }, v ? "true" : "false"), " ",
    h("strong", {}, condition || (children ? "group" : "node")),
    body !== undefined && !children ? h("span", { class: "evidence" }, ` ${value(body)}`) : "",
    changes_at ? h("span", { class: "evidence" }, ` · may change at ${when(changes_at)}`) : "",
    keep.length ? h("div", { class: "evidence" }, keep.map(([k, val]) => `${k}: ${value(val)}`).join(" · ")) : "",
    children ? h("ul", {}, children.map(explainNode)) : "");
}

async function userPage(url, id) {
  document.getElementById("user-search-id").value = id;
  let user;
  try { user = await get(`/v1/users/${enc(id)}`); } catch (error) {
    if (error instanceof ApiError && error.status === 404) { page(id, h("p", { role: "alert" }, error.message)); return; }
    throw error;
  }
  const { audiences: all } = await get("/v1/audiences");
  const why = h("section", { "aria-live": "polite", id: "why" });
  const pick = h("select", { id: "why-key" }, all.filter((a) => a.kind !== "priority").map((a) => h("option", { value: a.key }, `${a.name} (${a.key})`)));
  async function explainIt(key) {
    pick.value = key;
    why.replaceChildren(h("p", { class: "muted" }, "Asking…"));
    try {
      const e = await get(`/v1/users/${enc(id)}/explain/${enc(key)}`);
      why.replaceChildren(h("h3", {}, `Why ${e.member ? "in" : "not in"} ${key}`),
        h("p", {}, e.member ? `Member since ${when(e.member_since)}.` : "Not a member.", e.next_check ? ` Next check ${when(e.next_check)}.` : "",
          e.anonymous_excluded ? " Anonymous profiles are excluded from this audience." : "", ` Evaluated at ${when(e.at)}, version ${e.version}.`),
        h("ul", { class: "tree", "data-testid": "explain-tree" }, explainNode(e.condition)));
    } catch (error) { why.replaceChildren(failure(error, "explain")); }
  }
  const { userId, partition, anonymous, merged_into, anonymous_ids, traits, computed_traits, audiences, devices, accounts, updated_at, ...rest } = user;
  const note = h("p", { role: "status" });
  const confirmBox = h("dialog", { "aria-labelledby": "del-h" }, h("form", { method: "dialog" },
    h("h2", { id: "del-h" }, `Delete ${id}?`), h("p", {}, "Every worker forgets this profile and destinations are told (User Deleted). This cannot be undone."),
    h("div", { class: "actions" }, h("button", { value: "cancel", class: "secondary" }, "Cancel"), h("button", { value: "delete", class: "danger", id: "confirm-delete" }, "Delete"))));
  confirmBox.addEventListener("close", async () => {
    if (confirmBox.returnValue !== "delete") return;
    try { await request("DELETE", `/v1/users/${enc(id)}`); note.className = "ok"; note.textContent = "Deletion accepted: the profile is being removed."; }
    catch (error) { note.className = "error"; note.textContent = error instanceof ApiError && error.status === 403 ? `Cannot delete with this token: ${error.message}. Deleting a user needs the "admin" scope.` : `Not deleted: ${error.message}`; }
  });
  page(anonymous ? `Anonymous ${id}` : `User ${id}`,
    h("p", { class: "muted" }, `Partition ${partition} · last event ${when(updated_at)}`, merged_into ? ` · merged into ${merged_into}` : ""),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Audiences"), table("Audiences", ["Audience", "Entered at", ""], audiences.map((a) =>
        [link(`/ui/audiences/${enc(a.key)}`, a.name), when(a.entered_at), h("button", { type: "button", class: "secondary", "aria-label": `Why in ${a.name}?`, onclick: () => explainIt(a.key) }, "Why?")]))),
      h("section", {}, h("h2", {}, "Why (not)?"), h("div", { class: "toolbar" }, h("label", { for: "why-key" }, "Audience"), pick,
        h("button", { type: "button", onclick: () => explainIt(pick.value) }, "Explain")), why)),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Traits"), table("Traits", ["Trait", "Value"], Object.entries(traits || {}).map(([k, v]) => [k, value(v)]))),
      h("section", {}, h("h2", {}, "Computed traits"), table("Computed traits", ["Trait", "Value"], Object.entries(computed_traits || {}).map(([k, v]) => [k, value(v)])))),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Devices"), table("Devices", ["Device", "Type", "Push", "Last seen"], (devices || []).map((d) => [d.id, d.type, d.push_enabled ? "on" : "off", when(d.last_seen)]))),
      h("section", {}, h("h2", {}, "Linked ids"), table("Linked ids", ["Anonymous id", "Merged"], (anonymous_ids || []).map((a) => [a.id, a.merged ? "yes" : "pending"])))),
    h("section", {}, h("h2", {}, "Accounts"), table("Accounts", ["Account", "Profile"], (accounts || []).map((a) => [a.groupId, link(`/ui/users/${enc(a.profile)}`, a.profile)]))),
    Object.keys(rest).length ? h("section", {}, h("h2", {}, "More"), Object.entries(rest).map(([k, v]) => h("div", {}, h("h3", {}, k), h("pre", {}, JSON.stringify(v, null, 2))))) : "",
    h("h2", {}, "Delete"), h("p", {}, h("button", { type: "button", class: "danger", onclick: () => confirmBox.showModal() }, "Delete this user…")), note, confirmBox);
  const asked = url.searchParams.get("why");
  if (asked) explainIt(asked);
}

render();
