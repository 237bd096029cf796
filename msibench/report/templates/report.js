// msibench report: filtering, sorting and paging of the task cards. Plain DOM, no libraries, no network.
(function () {
  "use strict";
  var tasks = Array.prototype.slice.call(document.querySelectorAll("article.task"));
  var container = document.getElementById("tasks");
  var $ = function (id) { return document.getElementById(id); };
  var data = tasks.map(function (el) {
    return {
      el: el,
      order: Number(el.dataset.order),
      track: el.dataset.track,
      k: el.dataset.k,
      cats: JSON.parse(el.dataset.cats),
      runs: JSON.parse(el.dataset.runs)
    };
  });

  function shownRuns() {
    return Array.prototype.slice.call(document.querySelectorAll(".f-run"))
      .filter(function (b) { return b.checked; })
      .map(function (b) { return b.value; });
  }

  var page = 0;

  function apply(keepPage) {
    if (keepPage !== true) { page = 0; }
    var track = $("f-track").value, k = $("f-k").value, cat = $("f-cat").value, status = $("f-status").value;
    var runs = shownRuns();
    var metricSelect = $("s-metric"), metric = metricSelect.value, sortRun = $("s-run") ? $("s-run").value : "";
    // "minus" a second run: sort by the difference B - A (B = "of", A = "minus") on the tasks both scored
    var base = $("s-base") ? $("s-base").value : "";
    // "worst first" is ascending, except for a metric where lower is better (identity collapse): descending
    var lowerIsBetter = metric && metricSelect.selectedOptions[0].dataset.lower === "1";
    var desc = ($("s-order").value === "desc") !== Boolean(lowerIsBetter);
    document.querySelectorAll(".col.run").forEach(function (col) {
      col.hidden = runs.indexOf(col.dataset.run) < 0;
    });
    var visible = 0;
    data.forEach(function (d) {
      var ok = (!track || d.track === track) && (!k || d.k === k) && (!cat || d.cats.indexOf(cat) >= 0);
      if (ok) {
        var inRuns = runs.some(function (r) { return d.runs[r] && d.runs[r].status.length > 0; });
        ok = inRuns && (!status || runs.some(function (r) {
          return d.runs[r] && d.runs[r].status.indexOf(status) >= 0;
        }));
      }
      d.shown = ok;
      if (ok) { visible += 1; }
    });
    var of = function (d, run) {
      var r = d.runs[run];
      var v = r && r.v ? r.v[metric] : undefined;
      return typeof v === "number" ? v : null;
    };
    var value = function (d) {
      var v = of(d, sortRun);
      if (v === null || !base) { return v; }
      var a = of(d, base);
      return a === null ? null : v - a;
    };
    var sorted = data.slice().sort(function (a, b) {
      if (metric) {
        var va = value(a), vb = value(b);
        if (va === null && vb !== null) { return 1; }   // tasks without the metric go last either way
        if (vb === null && va !== null) { return -1; }
        if (va !== null && vb !== null && va !== vb) { return desc ? vb - va : va - vb; }
      }
      return a.order - b.order;
    });
    sorted.forEach(function (d) { container.appendChild(d.el); });
    // paging: only the cards of the current page are shown (and so only their images load)
    var size = Number($("p-size").value), pages = size > 0 ? Math.max(1, Math.ceil(visible / size)) : 1;
    page = Math.min(page, pages - 1);
    var index = 0;
    sorted.forEach(function (d) {
      var onPage = d.shown && (size === 0 || Math.floor(index / size) === page);
      if (d.shown) { index += 1; }
      d.el.hidden = !onPage;
    });
    $("p-info").textContent = "page " + (page + 1) + " of " + pages;
    $("p-prev").disabled = page === 0;
    $("p-next").disabled = page >= pages - 1;
    $("count").textContent = visible + " of " + data.length + " tasks";
    document.body.dataset.sorted = metric ? metric + ":" + sortRun + (base ? "-" + base : "") + ":" +
      (desc ? "desc" : "asc") : "";
    document.body.dataset.page = String(page);
  }

  $("p-prev").addEventListener("click", function () { page -= 1; apply(true); window.scrollTo(0, 0); });
  $("p-next").addEventListener("click", function () { page += 1; apply(true); window.scrollTo(0, 0); });

  ["f-track", "f-k", "f-cat", "f-status", "s-metric", "s-run", "s-base", "s-order", "p-size"].forEach(function (id) {
    var el = $(id);
    if (el) { el.addEventListener("change", apply); }
  });
  document.querySelectorAll(".f-run").forEach(function (b) { b.addEventListener("change", apply); });
  apply();
  document.body.dataset.ready = "1";
})();
