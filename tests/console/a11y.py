"""Accessibility checks a console page must pass, measured in the real browser: every
control reached by Tab with a visible focus indicator, every control named in the
accessibility tree, and WCAG contrast of all visible text against its background."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import Page

# Every control a person must reach: links, buttons, form fields (hidden inputs aside).
CONTROLS = "a[href], button, input:not([type=hidden]), select, textarea, summary"

_TEXTS = """() => {
  const rgba = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c.length >= 3 && (c.length < 4 || c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || !el || !el.checkVisibility()) continue;
    const r = el.getBoundingClientRect();
    if (r.width <= 1 || r.height <= 1) continue;  // visually hidden (screen-reader) text
    const s = getComputedStyle(el);
    out.push({text: n.textContent.trim().slice(0, 40), fg: rgba(s.color).slice(0, 3),
              bg: background(el), size: parseFloat(s.fontSize), weight: Number(s.fontWeight)});
  }
  return out;
}"""


def luminance(rgb: list[float]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else float(((c + 0.055) / 1.055) ** 2.4)

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(fg: list[float], bg: list[float]) -> float:
    lighter, darker = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def contrast_failures(page: Page) -> list[str]:
    """Visible text below WCAG AA: 4.5:1, or 3:1 for large text (24px, or 18.66px bold)."""
    failures = []
    texts: list[dict[str, Any]] = page.evaluate(_TEXTS)
    assert texts, "no visible text found"
    for t in texts:
        large = t["size"] >= 24 or (t["size"] >= 18.66 and t["weight"] >= 700)
        ratio = contrast_ratio(t["fg"], t["bg"])
        if ratio < (3.0 if large else 4.5):
            failures.append(f"{t['text']!r}: {ratio:.2f}:1 ({t['fg']} on {t['bg']})")
    return failures


# Counts changes of the page's elements (not of text alone: the approvals page counts the
# seconds a request has waited), so that a walk knows whether the page changed under it.
_WATCH = """() => {
  if (window.__a11yChanges !== undefined) return;
  window.__a11yChanges = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      const nodes = [...r.addedNodes, ...r.removedNodes];
      if (nodes.some((n) => n.nodeType === Node.ELEMENT_NODE)) { window.__a11yChanges++; return; }
    }
  }).observe(document.body, {childList: true, subtree: true});
}"""

# The focused element, marked as reached; null when the focus is on no element of the page.
_FOCUSED = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const again = el.dataset.a11yReached === '1';
  el.dataset.a11yReached = '1';
  const s = getComputedStyle(el);
  const outline = s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2;
  return {again, name: el.getAttribute('aria-label') || el.textContent.trim() || el.id,
          visible: outline && el.matches(':focus-visible')};
}"""

# Controls on the page now, visible, that no Tab of this round reached.
_UNREACHED = f"""() => [...document.querySelectorAll({CONTROLS!r})]
  .filter((el) => el.checkVisibility() && el.dataset.a11yReached !== '1')
  .map((el) => el.getAttribute('aria-label') || el.textContent.trim() || el.id || el.outerHTML)"""

_NEW_ROUND = """() => {
  document.querySelectorAll('[data-a11y-reached]').forEach((el) => delete el.dataset.a11yReached);
  if (document.activeElement) document.activeElement.blur();
  return window.__a11yChanges;
}"""


def tab_through(page: Page, limit: int = 200, rounds: int = 3) -> tuple[list[str], list[str]]:
    """Press Tab from the top of the page until focus comes round again. Returns the
    controls on the page that Tab never reached and those whose focus was not visible.

    A page may change while it is walked (the approvals list refreshes every 2 s, and a
    request held or decided elsewhere adds or redraws a card): a round during which the
    page's elements changed is walked again, up to `rounds` times, so that what is judged is
    one page as it stood, never controls counted on one page and sought on the next."""
    page.evaluate(_WATCH)
    assert page.evaluate(f"() => document.querySelectorAll({CONTROLS!r}).length"), "no controls"
    missed: list[str] = []
    invisible: list[str] = []
    for _ in range(rounds):
        before = page.evaluate(_NEW_ROUND)
        invisible = []
        for _ in range(limit):
            page.keyboard.press("Tab")
            focused = page.evaluate(_FOCUSED)
            if focused is None:
                continue
            if focused["again"]:
                break
            if not focused["visible"]:
                invisible.append(focused["name"])
        missed = page.evaluate(_UNREACHED)
        if page.evaluate("() => window.__a11yChanges") == before:
            break
    return missed, invisible


_UNNAMED = re.compile(r"^\s*- (button|link|textbox|combobox|checkbox|radio)\s*(:.*)?$")


def unnamed_controls(page: Page) -> list[str]:
    """Lines of the page's accessibility tree naming a control without a name."""
    tree = page.locator("body").aria_snapshot()
    return [line for line in tree.splitlines() if _UNNAMED.match(line)]
