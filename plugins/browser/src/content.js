// Content script (classic, loaded after sites.js): reports the site's own
// feedback clicks and answers the background's question about the current
// selection. It never sends anything itself; the background owns the native
// messaging Port.
(function () {
  'use strict';
  const api = globalThis.browser || globalThis.chrome;
  const { siteFor, captureClick, selectionContext } = globalThis.PalateSites;
  const site = siteFor(location.hostname);
  if (!site) return;

  // Capture phase: sites often stop propagation on their own buttons.
  document.addEventListener(
    'click',
    (ev) => {
      if (!(ev.target instanceof Element)) return;
      const capture = captureClick(site, ev.target);
      if (capture) api.runtime.sendMessage({ type: 'palate:capture', capture, url: location.href });
    },
    true,
  );

  api.runtime.onMessage.addListener((msg, _sender, sendResponse) => {
    if (!msg || msg.type !== 'palate:selection') return undefined;
    const sel = window.getSelection();
    sendResponse(selectionContext(site, sel ? sel.toString() : '', sel ? sel.anchorNode : null));
    return undefined;
  });
})();
