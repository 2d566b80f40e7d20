// pgwarden console: small progressive enhancements; every page works without them.
// - [data-poll]: the element's content is fetched again every data-poll-seconds; cards
//   ([data-key]) whose data-version did not change are kept as they are, and a card that
//   did change gets back what the person had typed or chosen in it and, if it held the
//   focus, the focus (its control of the same id, else the card itself): a refresh never
//   sends a keyboard user back to the top of the page or loses a note being typed.
// - time[data-since]: "how long it has waited", counted on every second.
// - a[data-shortcut]: the key named (the session replay's ArrowLeft/ArrowRight) follows
//   the link, unless the person is typing in a field or holds a modifier.
// - [data-focus-on-arrival]: reached by its #id (a replay step), it takes the focus, so
//   that Tab goes on to its Previous/Next links rather than from the top of the page.
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

// What a person can focus and use: a card or list given the focus in their place is not.
const CONTROLS = "a[href], button, input, select, textarea, summary";

// The fields of `root` the person changed from what the page served (by element id).
function editedFields(root) {
  const edited = new Map();
  root.querySelectorAll("input:not([type=hidden]), textarea, select").forEach(function (el) {
    if (!el.id) return;
    if (el.type === "checkbox" || el.type === "radio") {
      if (el.checked !== el.defaultChecked) edited.set(el.id, el.checked);
    } else if (el.tagName === "SELECT") {
      const changed = Array.from(el.options).some(function (o) { return o.selected !== o.defaultSelected; });
      if (changed) edited.set(el.id, el.value);
    } else if (el.value !== el.defaultValue) {
      edited.set(el.id, el.value);
    }
  });
  return edited;
}

function restoreFields(root, edited) {
  edited.forEach(function (value, id) {
    const el = root.querySelector("#" + CSS.escape(id));
    if (!el) return; // the card no longer offers that field (decided meanwhile)
    if (el.type === "checkbox" || el.type === "radio") el.checked = value;
    else el.value = value;
  });
}

// Where the focus was, to be put back after the cards are swapped: a node taken out of the
// page loses the focus, and the browser would start the next Tab from the top.
function focusPlace(container) {
  const el = document.activeElement;
  if (!el || el === document.body || !container.contains(el)) return null;
  const card = el.closest("[data-key]");
  let caret = null;
  try {
    if (typeof el.selectionStart === "number") caret = [el.selectionStart, el.selectionEnd, el.selectionDirection];
  } catch (e) {
    // an input type without a caret (select, button)
  }
  return { el: el, id: el.id, key: card ? card.dataset.key : null, caret: caret,
           visible: el.matches(":focus-visible") };
}

function refocus(container, place) {
  let target = place.el.isConnected ? place.el : null;
  if (!target && place.id) target = container.querySelector("#" + CSS.escape(place.id));
  if (!target && place.key !== null) {
    // The control went with the change (the request was decided): its card keeps the focus.
    target = container.querySelector('[data-key="' + CSS.escape(place.key) + '"]');
  }
  if (!target) target = container; // the card left the list: the list keeps the focus
  if (!target.matches(CONTROLS) && !target.hasAttribute("tabindex")) {
    target.setAttribute("tabindex", "-1"); // focusable by script, not a Tab stop
  }
  // A keyboard user keeps seeing where they are (focusVisible: where the browser knows it).
  target.focus({ preventScroll: true, focusVisible: place.visible });
  if (place.caret && (target === place.el || (place.id && target.id === place.id))) {
    try {
      target.setSelectionRange(place.caret[0], place.caret[1], place.caret[2]);
    } catch (e) {
      // not a text field any more
    }
  }
}

function merge(container, html) {
  const fresh = document.createElement("template");
  fresh.innerHTML = html; // a template's content is inert: nothing in it runs
  // The same cards in the same states: leave the page as it is.
  if (cardVersions(fresh.content) === cardVersions(container)) return;
  // Before any card moves.
  const place = focusPlace(container);
  const old = new Map();
  container.querySelectorAll("[data-key]").forEach(function (el) { old.set(el.dataset.key, el); });
  fresh.content.querySelectorAll("[data-key]").forEach(function (el) {
    const before = old.get(el.dataset.key);
    if (!before) return;
    if (before.dataset.version === el.dataset.version) el.replaceWith(before);
    else restoreFields(el, editedFields(before));
  });
  container.replaceChildren(fresh.content);
  if (place) refocus(container, place);
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

document.addEventListener("keydown", function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  const target = event.target;
  if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
  const link = document.querySelector('a[data-shortcut="' + event.key + '"]');
  if (link) {
    event.preventDefault();
    link.click();
  }
});

document.addEventListener("DOMContentLoaded", function () {
  const id = decodeURIComponent(window.location.hash.slice(1));
  const arrived = id ? document.getElementById(id) : null;
  if (arrived && arrived.hasAttribute("data-focus-on-arrival")) arrived.focus();
});
