// The dashboard's only script: a banner while the broker (or this server) is
// unreachable, and live numbers on the flow page. No framework, no build step.
(function () {
  "use strict";
  var HEALTH_EVERY_MS = 2000;
  var FLOW_EVERY_MS = 5000;
  var banner = document.getElementById("banner");
  var renderedDown = document.body.dataset.brokerDown === "yes";

  function say(text) {
    banner.textContent = text;
    banner.hidden = false;
  }

  function checkHealth() {
    fetch("/api/health", { cache: "no-store" })
      .then(function (response) { return response.json(); })
      .then(function (health) {
        if (health.ok) {
          banner.hidden = true;
          if (renderedDown) { window.location.reload(); }
        } else {
          say("The broker is unavailable (" + health.error + "). Retrying...");
        }
      })
      .catch(function () { say("The dashboard server does not answer. Retrying..."); });
  }

  function seconds(value) {
    if (value === null) { return "-"; }
    if (value < 1) { return Math.round(value * 1000) + " ms"; }
    return value < 120 ? value.toFixed(2) + " s" : (value / 60).toFixed(1) + " min";
  }

  function refreshFlow() {
    fetch("/api/flow", { cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (flow) {
        if (!flow) { return; }
        flow.edges.forEach(function (edge, index) {
          var label = document.querySelector('[data-edge="' + index + '"]');
          if (label) { label.textContent = edge.rate ? edge.rate.toFixed(2) + "/s" : ""; }
        });
        flow.streams.forEach(function (row, index) {
          var line = document.querySelector('[data-stream="' + index + '"]');
          if (!line) { return; }
          ["lag", "pending", "delayed"].forEach(function (field) {
            line.querySelector('[data-field="' + field + '"]').textContent = String(row[field]);
          });
          var age = row.oldest_pending_age;
          line.querySelector('[data-field="oldest_pending_age"]').textContent =
            age === null ? "-" : (row.oldest_pending_exact ? "" : "\u2265 ") + seconds(age);
          line.className = row.lag || row.pending ? "busy" : "";
        });
      })
      .catch(function () { /* the health check says so */ });
  }

  setInterval(checkHealth, HEALTH_EVERY_MS);
  if (renderedDown) { checkHealth(); }
  if (document.getElementById("flow") || document.getElementById("streams")) {
    setInterval(refreshFlow, FLOW_EVERY_MS);
  }
})();
