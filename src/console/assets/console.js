// The newsroom console's only script: refreshes the parts of a page marked data-live every
// two seconds, and asks before a form marked data-confirm is sent.
"use strict";
document.querySelectorAll("[data-live]").forEach(function (part) {
  setInterval(function () {
    fetch(part.dataset.live, { credentials: "same-origin", redirect: "manual" })
      .then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401) {
          location.reload();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null) {
          // Keep open details open across refreshes.
          var open = Array.from(part.querySelectorAll("details[open]")).map(function (d) {
            return d.closest("tr") && d.closest("tr").id;
          });
          part.innerHTML = html;
          open.forEach(function (id) {
            var row = id && document.getElementById(id);
            var details = row && row.querySelector("details");
            if (details) details.open = true;
          });
        }
      })
      .catch(function () {});
  }, 2000);
});
document.addEventListener("submit", function (event) {
  var button = event.submitter;
  var question = button && button.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
