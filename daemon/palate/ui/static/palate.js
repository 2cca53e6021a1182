// Palate UI: small enhancements on top of pages that work without script.
// - Review: keys 1 / 2 / t / s press the matching answer button.
// - Data: "select all" checkbox and a live count of selected events.
// Loaded once; listeners are on the document, so they survive htmx page swaps.
(function () {
  "use strict";

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) return;
    var form = document.querySelector("form.answers");
    if (!form) return;
    var button = form.querySelector('button[data-key="' + e.key.toLowerCase() + '"]');
    if (!button || button.disabled) return;
    e.preventDefault();
    form.querySelectorAll("button").forEach(function (b) { b.disabled = b !== button; });
    button.classList.add("chosen");
    button.click();  // a click, so htmx sends this button's answer with the form
  });

  function updateSelection() {
    var form = document.getElementById("selection");
    if (!form) return;
    var boxes = form.querySelectorAll('input[name="id"]');
    var n = 0;
    boxes.forEach(function (b) { if (b.checked) n++; });
    var count = form.querySelector("[data-selection-count]");
    if (count) count.textContent = n ? n + " selected" : "";
    var button = form.querySelector("[data-needs-selection]");
    if (button) button.disabled = n === 0;
    var all = form.querySelector("[data-select-all]");
    if (all) all.checked = n > 0 && n === boxes.length;
  }

  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t && t.matches && t.matches("[data-select-all]")) {
      var form = document.getElementById("selection");
      form.querySelectorAll('input[name="id"]').forEach(function (b) { b.checked = t.checked; });
    }
    updateSelection();
  });

  document.addEventListener("DOMContentLoaded", updateSelection);
  document.addEventListener("htmx:afterSettle", updateSelection);
})();
