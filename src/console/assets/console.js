// holdclear console: live updates only. Every read and every action works
// without this script. Every 5 seconds, while the page is visible and no
// field inside a live region is being edited, the page is fetched again
// and each element marked data-live is replaced by its new version.
(function () {
  "use strict";
  var PERIOD = 5000;
  function editing() {
    var a = document.activeElement;
    return a && a.closest && a.closest("[data-live]") &&
      (a.tagName === "INPUT" || a.tagName === "TEXTAREA" || a.tagName === "SELECT");
  }
  function refresh() {
    if (document.hidden || editing() || !document.querySelector("[data-live]")) return;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Live": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) el.replaceWith(document.importNode(fresh, true));
        });
        document.documentElement.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next round tries again */ });
  }
  setInterval(refresh, PERIOD);
})();
