// tether label: keyboard shortcuts, timing, double-submit guard and the ranking list (drag + keys).
// No inline scripts anywhere (the Content-Security-Policy forbids them).
(function () {
  "use strict";
  const t0 = performance.now();

  function typing(el) {
    return el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT" || el.isContentEditable);
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.querySelector("form.judge");
    if (!form) return;
    const kind = form.dataset.kind;
    let sending = false;

    form.addEventListener("submit", function (ev) {
      if (sending) { ev.preventDefault(); return; } // a second click never sends twice (the server is idempotent anyway)
      sending = true;
      const ms = form.querySelector(".client-ms");
      if (ms) ms.value = String(Math.round(performance.now() - t0));
      if (kind === "rank") writeRanking();
    });

    function press(key) {
      const b = form.querySelector('button[data-key="' + key + '"]');
      if (b) { b.click(); return true; }
      return false;
    }

    // ---------------------------------------------------------------- ranking
    const list = document.getElementById("rank-list");
    function items() { return Array.from(list.querySelectorAll(".rankitem")); }
    function writeRanking() {
      if (!list) return;
      const its = items();
      its.forEach(function (li, i) { li.querySelector(".pos").textContent = String(i + 1); });
      document.getElementById("ranking").value = its.map(function (li) { return li.dataset.index; }).join(",");
    }
    function move(li, to) {
      const its = items();
      to = Math.max(0, Math.min(its.length - 1, to));
      const from = its.indexOf(li);
      if (to === from) return;
      list.removeChild(li);
      const rest = items();
      if (to >= rest.length) list.appendChild(li); else list.insertBefore(li, rest[to]);
      writeRanking();
      li.focus();
    }
    if (list) {
      let dragged = null;
      list.addEventListener("dragstart", function (ev) {
        dragged = ev.target.closest(".rankitem");
        if (!dragged) return;
        dragged.classList.add("dragging");
        ev.dataTransfer.effectAllowed = "move";
        ev.dataTransfer.setData("text/plain", dragged.dataset.index);
      });
      list.addEventListener("dragend", function () {
        if (dragged) dragged.classList.remove("dragging");
        items().forEach(function (x) { x.classList.remove("over"); });
        dragged = null;
      });
      list.addEventListener("dragover", function (ev) {
        ev.preventDefault();
        const over = ev.target.closest(".rankitem");
        items().forEach(function (x) { x.classList.toggle("over", x === over && x !== dragged); });
      });
      list.addEventListener("drop", function (ev) {
        ev.preventDefault();
        const over = ev.target.closest(".rankitem");
        if (!dragged || !over || over === dragged) return;
        const its = items();
        const r = over.getBoundingClientRect();
        let to = its.indexOf(over);
        const after = ev.clientY > r.top + r.height / 2;
        if (its.indexOf(dragged) < to && !after) to -= 1;
        if (its.indexOf(dragged) > to && after) to += 1;
        move(dragged, to);
      });
      list.addEventListener("click", function (ev) {
        const b = ev.target.closest("button");
        if (!b) return;
        const li = b.closest(".rankitem");
        const i = items().indexOf(li);
        if (b.classList.contains("up")) move(li, i - 1);
        if (b.classList.contains("down")) move(li, i + 1);
      });
      list.addEventListener("keydown", function (ev) {
        const li = ev.target.closest(".rankitem");
        if (!li || ev.target !== li) return;
        const its = items();
        const i = its.indexOf(li);
        if (ev.key === "ArrowUp" || ev.key === "ArrowDown") {
          const d = ev.key === "ArrowUp" ? -1 : 1;
          if (ev.shiftKey || ev.altKey) move(li, i + d);
          else if (its[i + d]) its[i + d].focus();
          ev.preventDefault();
          ev.stopPropagation();
        } else if (/^[1-9]$/.test(ev.key) && !ev.ctrlKey && !ev.metaKey) {
          move(li, parseInt(ev.key, 10) - 1);
          ev.preventDefault();
          ev.stopPropagation();
        }
      });
      writeRanking();
    }

    // ---------------------------------------------------------------- shortcuts
    document.addEventListener("keydown", function (ev) {
      if (ev.defaultPrevented) return;
      if ((ev.ctrlKey || ev.metaKey) && ev.key === "Enter") {
        const primary = kind === "rank" ? document.getElementById("submit-ranking") : null;
        if (primary) { primary.click(); ev.preventDefault(); }
        return;
      }
      if (typing(ev.target) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      let key = ev.key;
      if (kind === "compare" && key === "ArrowLeft") key = "1";
      if (kind === "compare" && key === "ArrowRight") key = "2";
      if (kind === "rank") {
        if (key === "s") { press("s"); ev.preventDefault(); }
        else if (key === "ArrowDown" || key === "ArrowUp") { const f = items()[0]; if (f) { f.focus(); ev.preventDefault(); } }
        return;
      }
      if (press(key.toLowerCase())) ev.preventDefault();
    });
  });
})();
