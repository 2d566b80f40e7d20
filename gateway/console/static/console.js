// pgwarden console: small progressive enhancements; every page works without them.
// - [data-poll]: the element's content is fetched again every data-poll-seconds; cards
//   ([data-key]) whose data-version did not change are kept as they are, so a note being
//   typed, or the focus, survives a refresh.
// - time[data-since]: "how long it has waited", counted on every second.
"use strict";

function formatWaited(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + s + " s";
  return s + " s";
}

function tickWaited() {
  const now = Date.now() / 1000;
  document.querySelectorAll("time[data-since]").forEach(function (el) {
    el.textContent = formatWaited(now - Number(el.dataset.since));
  });
}

function cardVersions(root) {
  return Array.from(root.querySelectorAll("[data-key]"), function (el) {
    return el.dataset.key + "@" + el.dataset.version;
  }).join(" ");
}

function merge(container, html) {
  const fresh = document.createElement("template");
  fresh.innerHTML = html; // a template's content is inert: nothing in it runs
  // The same cards in the same states: leave the page as it is.
  if (cardVersions(fresh.content) === cardVersions(container)) return;
  // Before any card moves: a node taken out of the page loses the focus.
  const focused = container.contains(document.activeElement) ? document.activeElement : null;
  const old = new Map();
  container.querySelectorAll("[data-key]").forEach(function (el) { old.set(el.dataset.key, el); });
  fresh.content.querySelectorAll("[data-key]").forEach(function (el) {
    const before = old.get(el.dataset.key);
    if (before && before.dataset.version === el.dataset.version) el.replaceWith(before);
  });
  container.replaceChildren(fresh.content);
  if (focused && focused.isConnected) focused.focus();
  tickWaited();
}

function poll(container) {
  const every = Number(container.dataset.pollSeconds || 2) * 1000;
  async function tick() {
    try {
      const response = await fetch(container.dataset.poll, {
        credentials: "same-origin",
        headers: { "Accept": "text/html" },
      });
      if (response.redirected) {
        // Signed out meanwhile (the session ended): the page itself shows the login.
        window.location.reload();
        return;
      }
      if (response.ok) merge(container, await response.text());
    } catch (e) {
      // The gateway is restarting or unreachable: try again at the next tick.
    }
    window.setTimeout(tick, every);
  }
  window.setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-poll]").forEach(poll);
  tickWaited();
  window.setInterval(tickWaited, 1000);
});
