// The copy button of the page that shows a new key's secret once. The page works without it: the secret is in a
// read-only field that can be selected and copied by hand.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var button = document.getElementById("copy");
  if (!button || !navigator.clipboard) return;
  var field = document.getElementById(button.dataset.copy);
  var status = document.getElementById("copied");
  button.hidden = false;
  button.addEventListener("click", function () {
    navigator.clipboard.writeText(field.value).then(
      function () { status.textContent = "Copied."; },
      function () { field.select(); status.textContent = "Select the field and copy it."; }
    );
  });
});
