// pgwarden console: small progressive enhancements; every page works without them.
"use strict";

// Session replay: the arrow keys follow the Previous/Next links (data-key), unless the
// person is typing in a field or holds a modifier (browser shortcuts stay theirs).
document.addEventListener("keydown", function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  var target = event.target;
  if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
  var link = document.querySelector('a[data-key="' + event.key + '"]');
  if (link) {
    event.preventDefault();
    link.click();
  }
});
