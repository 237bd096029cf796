// msibench report: filtering and sorting of the task cards. Plain DOM, no libraries, no network.
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

  function apply() {
    var track = $("f-track").value, k = $("f-k").value, cat = $("f-cat").value, status = $("f-status").value;
    var runs = shownRuns();
    var metricSelect = $("s-metric"), metric = metricSelect.value, sortRun = $("s-run") ? $("s-run").value : "";
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
      d.el.hidden = !ok;
      if (ok) { visible += 1; }
    });
    var value = function (d) {
      var r = d.runs[sortRun];
      var v = r && r.v ? r.v[metric] : undefined;
      return typeof v === "number" ? v : null;
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
    $("count").textContent = visible + " of " + data.length + " tasks";
    document.body.dataset.sorted = metric ? metric + ":" + sortRun + ":" + (desc ? "desc" : "asc") : "";
  }

  ["f-track", "f-k", "f-cat", "f-status", "s-metric", "s-run", "s-order"].forEach(function (id) {
    var el = $(id);
    if (el) { el.addEventListener("change", apply); }
  });
  document.querySelectorAll(".f-run").forEach(function (b) { b.addEventListener("change", apply); });
  apply();
  document.body.dataset.ready = "1";
})();
