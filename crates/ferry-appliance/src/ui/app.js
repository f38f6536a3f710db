// Live updates: when the appliance's event stream reports anything, fetch this page
// again and swap its content in. The server renders every page whole, so without this
// script (or with the stream down) a plain reload shows the same truth.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var main = document.getElementById("main");
  var pending = null;
  function say(text) { if (live) live.textContent = text; }
  function refresh() {
    pending = null;
    // Not while the user is typing in a form or a confirmation is open.
    var a = document.activeElement;
    if (a && (a.tagName === "INPUT" || a.tagName === "TEXTAREA" || a.tagName === "SELECT")) return;
    if (document.querySelector(".confirm")) return;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Ferry-Live": "1" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main");
        if (fresh && main) { main.innerHTML = fresh.innerHTML; say("Updated " + new Date().toLocaleTimeString()); }
      })
      .catch(function () { say("Live updates paused: reload to refresh"); });
  }
  if (window.EventSource && main && !document.body.classList.contains("login")) {
    var es = new EventSource("/ui/stream");
    es.onopen = function () { say("Live"); };
    es.onerror = function () { say("Live updates paused: reload to refresh"); };
    es.onmessage = function () { if (!pending) pending = setTimeout(refresh, 250); };
  }
  // A CSV file chosen fills the text area (the form posts the text).
  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t && t.dataset && t.dataset.fills && t.files && t.files[0]) {
      var area = document.getElementById(t.dataset.fills);
      t.files[0].text().then(function (text) { if (area) area.value = text; });
    }
  });
})();
