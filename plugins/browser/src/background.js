// Background (Chrome service worker / Firefox event page), an ES module: owns
// the native messaging Port, the context menu, and turns captures into events.
// Logic lives in events.js and native.js; this file only wires browser APIs.
import { HOST_NAME, captureEvent, selectionEvent } from './events.js';
import { NativeBridge } from './native.js';

const api = globalThis.browser ?? globalThis.chrome;

const bridge = new NativeBridge(() => api.runtime.connectNative(HOST_NAME), {
  lastError: () => api.runtime.lastError,
});

const MENU = {
  'palate-good': { title: 'Palate: this answer was good', label: 1 },
  'palate-bad': { title: 'Palate: this answer was bad', label: -1 },
};

// Menus are recreated at every start: Chrome keeps them across restarts but
// Firefox event pages may not, and removeAll makes re-creation idempotent.
async function createMenus() {
  await api.contextMenus.removeAll();
  for (const [id, { title }] of Object.entries(MENU)) {
    api.contextMenus.create({ id, title, contexts: ['selection'] });
  }
}
api.runtime.onInstalled.addListener(createMenus);
api.runtime.onStartup.addListener(createMenus);

api.contextMenus.onClicked.addListener(async (info, tab) => {
  const item = MENU[/** @type {keyof typeof MENU} */ (info.menuItemId)];
  if (!item) return;
  // The content script (supported sites only) has the exact selection and the
  // question; elsewhere info.selectionText (whitespace-collapsed) must do.
  let selection = { response: info.selectionText ?? '', prompt: null };
  try {
    const fromPage = await api.tabs.sendMessage(tab.id, { type: 'palate:selection' }, { frameId: info.frameId ?? 0 });
    if (fromPage && fromPage.response) selection = fromPage;
  } catch {
    // No content script on this page: keep the menu's own selection text.
  }
  await send(() => selectionEvent(selection, item.label, { url: info.pageUrl, title: tab?.title }), tab?.id);
});

api.runtime.onMessage.addListener((msg, sender) => {
  if (msg?.type !== 'palate:capture' || sender.id !== api.runtime.id) return undefined;
  void send(() => captureEvent(msg.capture, msg.url), sender.tab?.id);
  return undefined;
});

/**
 * Build and send one event; show the outcome on the toolbar badge of the tab.
 * @param {() => Record<string, unknown>} build
 * @param {number | undefined} tabId
 */
async function send(build, tabId) {
  try {
    await bridge.ingest(build());
    await badge(tabId, '✓', '#2e7d32', 'Palate: feedback stored');
  } catch (e) {
    const err = /** @type {{code?: string, message: string}} */ (e);
    console.warn('Palate: feedback not stored:', err.code ?? '', err.message);
    await badge(tabId, '!', '#c62828', `Palate: feedback not stored: ${err.message}`);
  }
}

/**
 * @param {number | undefined} tabId
 * @param {string} text
 * @param {string} color
 * @param {string} title
 */
async function badge(tabId, text, color, title) {
  if (tabId === undefined || !api.action) return;
  await api.action.setBadgeBackgroundColor({ tabId, color });
  await api.action.setBadgeText({ tabId, text });
  await api.action.setTitle({ tabId, title });
}
