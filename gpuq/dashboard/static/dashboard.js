// The dashboard's live updates and controls. Sections arrive as HTML the server rendered and escaped
// (Jinja2, autoescape) over server-sent events; controls are JSON POSTs carrying the page's CSRF token.
"use strict";

(() => {
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const live = document.getElementById("live");
  const flash = document.getElementById("flash");
  const charts = {};
  const palette = ["#2563eb", "#db2777", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#475569"];

  function setLive(state, text) {
    live.dataset.state = state;
    live.textContent = text;
  }

  function say(text, bad) {
    flash.textContent = text;
    flash.className = bad ? "bad" : "good";
  }

  const source = new EventSource("/events");
  source.addEventListener("open", () => setLive("live", "live"));
  source.addEventListener("error", () => setLive("down", "reconnecting…"));
  source.addEventListener("sections", (event) => {
    const data = JSON.parse(event.data);
    for (const [name, html] of Object.entries(data.sections)) {
      const section = document.getElementById("sec-" + name);
      if (section) section.innerHTML = html; // rendered and escaped by the server's templates
    }
    setLive("live", "live · " + new Date(data.at).toLocaleTimeString());
  });
  source.addEventListener("history", (event) => drawCharts(JSON.parse(event.data)));
  source.addEventListener("trouble", (event) => setLive("down", JSON.parse(event.data)));

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const { action, target, ask, confirm: question } = button.dataset;
    let reason = null;
    if (ask) {
      reason = window.prompt(ask, "");
      if (reason === null) return;
    } else if (question && !window.confirm(question)) {
      return;
    }
    button.disabled = true;
    try {
      const response = await fetch("/api/" + encodeURIComponent(action), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
        body: JSON.stringify({ target, reason }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) say(`${action} ${target}: ${body.outcome}`, false);
      else say(`${action} ${target} refused: ${body.error || response.status}`, true);
    } catch (err) {
      say(`${action} ${target} failed: ${err}`, true);
    } finally {
      button.disabled = false;
    }
  });

  function chart(id, names, columns) {
    const box = document.getElementById(id);
    const key = names.join("\u0000");
    let entry = charts[id];
    if (entry && entry.key !== key) {
      entry.plot.destroy();
      entry = null;
    }
    if (!entry) {
      const series = [{}].concat(
        names.map((name, i) => ({ label: name, stroke: palette[i % palette.length], width: 2 })),
      );
      const options = {
        width: box.clientWidth || 400,
        height: 170,
        series,
        scales: { x: { time: true } },
        axes: [{}, { size: 56 }],
      };
      entry = { key, plot: new uPlot(options, columns, box) };
      charts[id] = entry;
    } else {
      entry.plot.setData(columns);
    }
    box.dataset.points = String(columns[0].length);
  }

  function drawCharts(h) {
    if (!window.uPlot) return;
    const names = Object.keys(h.queues).sort();
    if (names.length) chart("chart-depth", names, [h.t].concat(names.map((n) => h.queues[n])));
    else chart("chart-depth", ["no jobs"], [h.t, h.t.map(() => 0)]);
    chart("chart-fleet", ["instances"], [h.t, h.instances]);
    chart("chart-spend", ["$ billed", "$/h"], [h.t, h.spend, h.dph]);
  }

  window.addEventListener("resize", () => {
    for (const [id, entry] of Object.entries(charts)) {
      entry.plot.setSize({ width: document.getElementById(id).clientWidth, height: 170 });
    }
  });
})();
