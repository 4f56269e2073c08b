// agent-bus console: follows GET /ui/feed (a long-poll) and shows what it says.
//
// Everything that came from the bus is put in the page as text (textContent),
// never parsed as HTML: a message body is data, whatever it looks like.
// The page keeps at most KEEP messages, in the DOM and in memory, so one left
// open for days stays as light as it started.
"use strict";

(() => {
  const KEEP = 500;           // messages kept in the page
  const WATCH = 200;          // unsettled messages whose receipts are followed
  const PER_ANSWER = 200;     // messages asked for per feed answer
  const MIN_GAP_MS = 300;     // between feed requests, however busy the bus is
  const STATES = ["queued", "delivered", "filed", "read"];
  // "unreachable": what daemons reported before "not checked" took its place.
  const CHECKS = ["verified", "mismatch", "not checked", "unreachable"];

  const $ = (id) => document.getElementById(id);
  const feedBody = $("feed");

  const view = {
    after: null,              // the newest message id shown
    version: "",              // the feed's version in its last answer
    messages: new Map(),      // id -> {message, row}, oldest first
    filter: {channel: "", agent: ""},
    generation: 0,            // bumped by a filter change: answers to older requests are dropped
    controller: null,
    clockSkew: 0,             // server time minus browser time, in seconds
    agents: [],
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function oneOf(value, allowed, otherwise) {
    return allowed.includes(value) ? value : otherwise;
  }

  function utcTime(ts) {
    const when = new Date(ts * 1000);
    return when.toISOString().slice(11, 19);
  }

  function ago(ts) {
    if (typeof ts !== "number") return "never";
    const seconds = Math.max(0, Date.now() / 1000 + view.clockSkew - ts);
    if (seconds < 60) return `${Math.floor(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function pause(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function setConnection(kind, text) {
    const badge = $("connection");
    badge.className = `connection ${kind}`;
    badge.textContent = text;
  }

  // -- the feed ------------------------------------------------------------------

  function settled(entry) {
    const m = entry.message;
    if (m.gone) return true;
    if (m.state !== "read") return false;   // filed may still turn read
    return !m.handoff || Object.keys(m.handoff).length > 0;
  }

  function feedUrl() {
    const params = new URLSearchParams({max: String(PER_ANSWER)});
    if (view.after !== null) {
      params.set("after", String(view.after));
      params.set("version", view.version);
      params.set("block", "true");
    }
    if (view.filter.channel) params.set("channel", view.filter.channel);
    if (view.filter.agent) params.set("agent", view.filter.agent);
    const watch = [];
    for (const [id, entry] of view.messages) {
      if (!settled(entry)) watch.push(id);
    }
    if (watch.length) params.set("watch", watch.slice(-WATCH).join(","));
    return `/ui/feed?${params}`;
  }

  async function follow() {
    let failures = 0;
    for (;;) {
      const generation = view.generation;
      const started = performance.now();
      view.controller = new AbortController();
      let data = null;
      let problem = null;
      try {
        const response = await fetch(feedUrl(), {
          signal: view.controller.signal, credentials: "same-origin", cache: "no-store",
          headers: {Accept: "application/json"},
        });
        if (response.status === 401 || response.status === 403) {
          setConnection("offline", "logged out: reload the page to log in");
          return;
        }
        if (!response.ok) {
          problem = `the bus answered ${response.status}`;
        } else {
          data = await response.json();
        }
      } catch (error) {
        problem = `cannot reach the bus (${error.message})`;
      }
      if (generation !== view.generation) continue;  // a filter change: start over at once
      if (problem !== null) {
        failures += 1;
        const wait = Math.min(10000, 500 * 2 ** Math.min(failures, 5));
        setConnection("offline", `${problem}; retrying`);
        await pause(wait);
        continue;
      }
      failures = 0;
      show(data);
      setConnection("live", "live");
      const spent = performance.now() - started;
      if (spent < MIN_GAP_MS) await pause(MIN_GAP_MS - spent);
    }
  }

  function show(data) {
    view.version = String(data.version || "");
    if (typeof data.now === "number") view.clockSkew = data.now - Date.now() / 1000;
    $("logout").hidden = !data.auth;
    showAgents(data.agents || []);
    showChannels(data.channels || []);
    for (const message of data.messages || []) addMessage(message, view.after !== null);
    for (const [id, state] of Object.entries(data.states || {})) {
      const entry = view.messages.get(Number(id));
      if (!entry) continue;
      Object.assign(entry.message, state);
      fillReceipt(entry);
    }
    for (const id of data.gone || []) {
      const entry = view.messages.get(Number(id));
      if (entry) entry.message.gone = true;  // removed by retention: nothing more to follow
    }
    const newest = (data.messages || []).reduce((max, m) => Math.max(max, m.id), -1);
    if (newest >= 0) view.after = Math.max(view.after || 0, newest);
    else if (view.after === null) view.after = 0;
    const shown = view.messages.size;
    $("feed-empty").hidden = shown > 0;
    $("feed-summary").textContent = shown ? `${shown} shown (the newest ${KEEP} are kept)` : "";
  }

  function addMessage(message, fresh) {
    if (view.messages.has(message.id)) return;
    const row = el("tr", fresh ? "fresh" : "");
    row.dataset.id = String(message.id);
    const time = el("td", "time", utcTime(message.ts));
    time.title = new Date(message.ts * 1000).toISOString();
    row.append(time, el("td", "id", message.id), el("td", "name", message.from),
               el("td", "name", message.to === "*" ? "* (all)" : message.to),
               el("td", "name", message.channel));
    const body = el("td", "body", message.first_line);
    if (message.more) body.append(el("span", "more", " …"));
    row.append(body, el("td", "receipt"), el("td", "handoff"));
    const entry = {message, row};
    fillReceipt(entry);
    // Newest on top: a message newer than every shown one goes first.
    const newer = [...view.messages.keys()].some((id) => id > message.id);
    if (!newer) feedBody.prepend(row);
    else placeByID(row, message.id);
    view.messages.set(message.id, entry);
    while (view.messages.size > KEEP) {
      const oldest = Math.min(...view.messages.keys());
      view.messages.get(oldest).row.remove();
      view.messages.delete(oldest);
    }
  }

  function placeByID(row, id) {
    for (const other of feedBody.children) {
      if (Number(other.dataset.id) < id) {
        feedBody.insertBefore(row, other);
        return;
      }
    }
    feedBody.append(row);
  }

  function fillReceipt(entry) {
    const m = entry.message;
    const receipt = entry.row.querySelector("td.receipt");
    const state = oneOf(m.state, STATES, "unknown");
    const badge = el("span", `badge ${state}`, state);
    const recipients = Object.entries(m.recipients || {});
    badge.title = recipients.length
      ? recipients.map(([name, s]) => `${name}: ${s}`).join("\n")
      : "no known reader yet";
    if (m.to === "*" && recipients.length) badge.textContent = `${state} (${recipients.length})`;
    receipt.replaceChildren(badge);
    const cell = entry.row.querySelector("td.handoff");
    if (!m.handoff) {
      cell.replaceChildren();
      return;
    }
    const checks = Object.entries(m.handoff);
    if (!checks.length) {
      cell.replaceChildren(el("span", "badge", "no report"));
      cell.title = "no recipient's daemon has reported its check yet";
      return;
    }
    const results = checks.map(([, result]) => oneOf(result, CHECKS, "unknown"));
    // One word for all: a mismatch anywhere matters most, then a copy not checked.
    const overall = ["mismatch", "unreachable", "not checked"].find((r) => results.includes(r))
      || results[0];
    cell.replaceChildren(el("span", `badge ${overall.replace(" ", "-")}`, overall));
    cell.title = checks.map(([name, result]) => `${name}: ${result}`).join("\n");
  }

  // -- roster and channels ---------------------------------------------------------

  function showAgents(agents) {
    view.agents = agents;
    const list = $("agents");
    const items = agents.map((agent) => {
      const item = el("li", agent.name === view.filter.agent ? "selected" : "");
      item.dataset.name = agent.name;
      item.title = agent.online ? `${agent.name}: online` : `${agent.name}: offline`;
      const dot = el("span", agent.online ? "dot online" : "dot");
      const name = el("span", "name", agent.name);
      const waiting = Object.values(agent.pending || {}).reduce((a, b) => a + b, 0);
      if (waiting) name.append(el("span", "pending", `  ${waiting} waiting`));
      const seen = el("span", "seen", agent.online ? "online" : ago(agent.last_seen));
      seen.dataset.lastSeen = agent.online ? "" : String(agent.last_seen ?? "");
      item.append(dot, name, seen);
      item.addEventListener("click", () => setFilter("agent", agent.name));
      return item;
    });
    list.replaceChildren(...items);
    const online = agents.filter((a) => a.online).length;
    $("agents-summary").textContent = agents.length ? `${online} of ${agents.length} online` : "";
    $("agents-empty").hidden = agents.length > 0;
    fillOptions($("filter-agent"), agents.map((a) => a.name), view.filter.agent);
  }

  function showChannels(channels) {
    const rows = channels.map((channel) => {
      const row = el("tr", channel.channel === view.filter.channel ? "selected" : "");
      row.append(el("td", "name", channel.channel), el("td", "num", channel.count),
                 el("td", channel.pending ? "num pending-some" : "num", channel.pending));
      row.addEventListener("click", () => setFilter("channel", channel.channel));
      return row;
    });
    $("channels").replaceChildren(...rows);
    $("channels-empty").hidden = channels.length > 0;
    fillOptions($("filter-channel"), channels.map((c) => c.channel).sort(), view.filter.channel);
  }

  function fillOptions(select, names, chosen) {
    const wanted = ["", ...names];
    if (chosen && !names.includes(chosen)) wanted.push(chosen);
    const current = [...select.options].map((o) => o.value);
    if (current.join("\n") !== wanted.join("\n")) {
      select.replaceChildren(...wanted.map((name) => {
        const option = el("option", "", name || "all");
        option.value = name;
        return option;
      }));
    }
    select.value = chosen;
  }

  function refreshAges() {
    for (const seen of document.querySelectorAll("#agents .seen")) {
      if (seen.dataset.lastSeen) seen.textContent = ago(Number(seen.dataset.lastSeen));
    }
  }

  // -- filters -------------------------------------------------------------------

  function setFilter(kind, value) {
    if (view.filter[kind] === value) value = "";  // a second click lets go
    view.filter[kind] = value;
    restart();
  }

  function restart() {
    view.generation += 1;
    view.after = null;
    view.version = "";
    view.messages.clear();
    feedBody.replaceChildren();
    for (const item of document.querySelectorAll("#agents li")) {
      item.classList.toggle("selected", item.dataset.name === view.filter.agent);
    }
    if (view.controller) view.controller.abort();
  }

  $("filter-channel").addEventListener("change", (event) => {
    view.filter.channel = event.target.value;
    restart();
  });
  $("filter-agent").addEventListener("change", (event) => {
    view.filter.agent = event.target.value;
    restart();
  });
  $("filter-clear").addEventListener("click", () => {
    view.filter = {channel: "", agent: ""};
    restart();
  });

  setInterval(refreshAges, 1000);
  follow();
})();
