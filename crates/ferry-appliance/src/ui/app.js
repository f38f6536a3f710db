// Live updates: when the appliance's event stream reports anything, fetch this page
// again and swap its content in. The server renders every page whole, so without this
// script (or with the stream down) a plain reload shows the same truth.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var main = document.getElementById("main");
  var pending = null;
  // Set once the user changes a field: the page is theirs until they submit or reload.
  var editing = false;
  document.addEventListener("input", function () { editing = true; });
  document.addEventListener("change", function () { editing = true; });
  function say(text) { if (live) live.textContent = text; }
  function refresh() {
    pending = null;
    if (editing || document.querySelector(".confirm")) {
      say("Live updates paused while you edit: reload to refresh");
      return;
    }
    fetch(location.href, { credentials: "same-origin", headers: { "X-Ferry-Live": "1" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main");
        if (fresh && main) { main.innerHTML = fresh.innerHTML; say("Updated " + new Date().toLocaleTimeString()); }
      })
      .catch(function () { say("Live updates paused: reload to refresh"); });
  }
  // Pages built around a form are never refreshed under the user's hands.
  if (window.EventSource && main && main.dataset.live === "on") {
    var es = null;
    var kick = function () { if (!pending) pending = setTimeout(refresh, 250); };
    var connect = function () {
      es = new EventSource("/ui/stream");
      // The stream starts at its connection: whatever happened between this page's
      // rendering and then (or during a reconnection) is fetched once on opening.
      es.onopen = function () { say("Live"); kick(); };
      es.onerror = function () { say("Live updates paused: reload to refresh"); };
      es.onmessage = kick;
    };
    connect();
    // While a sync runs, its progress moves without events: look every two seconds.
    setInterval(function () { if (document.querySelector("[data-running]")) kick(); }, 2000);
    // A page left (or kept in the back/forward cache) must not hold its stream open:
    // browsers allow only a few connections per host, and the next page would wait.
    window.addEventListener("pagehide", function () { if (es) { es.close(); es = null; } });
    window.addEventListener("pageshow", function (e) { if (e.persisted && !es) connect(); });
  }
})();
