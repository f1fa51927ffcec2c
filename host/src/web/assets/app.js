// wasmq dashboard: the little JavaScript it has, served as a file so the
// Content-Security-Policy can forbid inline script. It draws the
// overview's charts from /t/TENANT/api/overview (polled every 5 s), asks
// before destructive actions, and submits the tenant switcher.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var W = 720, H = 160, LEFT = 44, BOTTOM = 18, TOP = 8;

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function clear(svg) { while (svg.firstChild) svg.removeChild(svg.firstChild); }

  function label(minute) {
    var d = new Date(minute * 60000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }

  // Axes and grid for values 0..max over n slots; returns x(i) and y(v).
  function frame(svg, n, max, minutes) {
    clear(svg);
    var plotW = W - LEFT - 4, plotH = H - TOP - BOTTOM;
    var x = function (i) { return LEFT + (i + 0.5) * plotW / n; };
    var y = function (v) { return TOP + plotH - (max ? v / max : 0) * plotH; };
    for (var g = 0; g <= 4; g++) {
      var v = max * g / 4, yy = y(v);
      el("line", { x1: LEFT, x2: W - 4, y1: yy, y2: yy, "class": "grid" }, svg);
      var t = el("text", { x: LEFT - 4, y: yy + 3, "text-anchor": "end", "class": "axis" }, svg);
      t.textContent = Math.round(v * 10) / 10;
    }
    for (var i = 0; i < n; i += 10) {
      var tx = el("text", { x: x(i), y: H - 4, "text-anchor": "middle", "class": "axis" }, svg);
      tx.textContent = label(minutes[i]);
    }
    return { x: x, y: y, slot: plotW / n };
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var m = [1, 2, 5, 10].find(function (k) { return k * p >= v; });
    return m * p;
  }

  function bars(svg, s) {
    var n = s.minutes.length, max = 0, points = 0;
    for (var i = 0; i < n; i++) max = Math.max(max, s.succeeded[i] + s.failed[i]);
    var f = frame(svg, n, niceMax(max), s.minutes), w = Math.max(1, f.slot - 2);
    for (i = 0; i < n; i++) {
      var ok = s.succeeded[i], bad = s.failed[i];
      if (ok + bad > 0) points++;
      var base = f.y(0);
      if (ok) {
        var r = el("rect", { x: f.x(i) - w / 2, y: f.y(ok), width: w, height: base - f.y(ok), "class": "ok" }, svg);
        el("title", {}, r).textContent = label(s.minutes[i]) + ": " + ok + " succeeded";
      }
      if (bad) {
        var r2 = el("rect", { x: f.x(i) - w / 2, y: f.y(ok + bad), width: w, height: f.y(ok) - f.y(ok + bad), "class": "bad" }, svg);
        el("title", {}, r2).textContent = label(s.minutes[i]) + ": " + bad + " failed";
      }
    }
    svg.setAttribute("data-points", points);
  }

  function lines(svg, s, series, pct) {
    var n = s.minutes.length, max = 0, points = 0;
    series.forEach(function (k) { s[k[0]].forEach(function (v) { if (v != null) max = Math.max(max, v); }); });
    var f = frame(svg, n, pct ? 100 : niceMax(max), s.minutes);
    series.forEach(function (k) {
      var d = "", up = false;
      s[k[0]].forEach(function (v, i) {
        if (v == null) { up = false; return; }
        d += (up ? "L" : "M") + f.x(i).toFixed(1) + " " + f.y(v).toFixed(1) + " ";
        up = true;
        points++;
        el("circle", { cx: f.x(i), cy: f.y(v), r: 2, "class": k[1].replace("line", "dot") }, svg);
      });
      if (d) el("path", { d: d, "class": k[1] }, svg);
    });
    svg.setAttribute("data-points", points);
  }

  function draw(s) {
    var sum = function (xs) { return xs.reduce(function (a, b) { return a + b; }, 0); };
    document.getElementById("total-succeeded").textContent = sum(s.succeeded);
    document.getElementById("total-failed").textContent = sum(s.failed);
    bars(document.getElementById("chart-throughput"), s);
    lines(document.getElementById("chart-latency"), s,
      [["e2e_p95_ms", "line-p95"], ["e2e_p50_ms", "line-p50"], ["run_p50_ms", "line-run"]], false);
    var rate = { minutes: s.minutes, rate: s.succeeded.map(function (ok, i) {
      var all = ok + s.failed[i];
      return all ? Math.round(1000 * s.failed[i] / all) / 10 : null;
    }) };
    lines(document.getElementById("chart-failures"), rate, [["rate", "line-rate"]], true);
    document.getElementById("chart-status").textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every 5 s.";
    document.getElementById("charts").setAttribute("data-loaded", "1");
  }

  function poll(section) {
    fetch(section.getAttribute("data-src"), { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(draw)
      .catch(function (e) { document.getElementById("chart-status").textContent = "Could not load the chart data (" + e.message + ")."; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var charts = document.getElementById("charts");
    if (charts) { poll(charts); setInterval(function () { poll(charts); }, 5000); }
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (e) {
        if (!window.confirm(form.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
    document.querySelectorAll("select[data-autosubmit]").forEach(function (sel) {
      sel.addEventListener("change", function () { sel.form.submit(); });
    });
  });
})();
