// Live pages: a container with data-poll="URL" fetches its fragment again every
// data-poll-s seconds and replaces its content, until a fragment holds [data-final].
document.querySelectorAll("[data-poll]").forEach((el) => {
  const url = el.dataset.poll;
  const every = 1000 * Number(el.dataset.pollS || 2);
  if (el.querySelector("[data-final]")) return;
  const tick = async () => {
    try {
      const resp = await fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } });
      if (resp.redirected || !resp.ok) return; // signed out, or gone: stop
      el.innerHTML = await resp.text();
      if (el.querySelector("[data-final]")) {
        // The run ended: reload once so the page's actions match its state.
        if (el.id === "live") window.location.reload();
        return;
      }
    } catch (e) { /* a network blip: try again */ }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
});
