// The only file that touches the VS Code API. It is CommonJS because VS Code
// loads extensions with require(); the logic lives in src/feedback.js (ESM,
// tested with node --test) and the socket client in @palate/client (ESM).
const vscode = require('vscode');
const path = require('node:path');

/**
 * Activate the extension: register the commands and return the API for other
 * extensions, `vscode.extensions.getExtension('palate.palate-vscode').exports`.
 * @param {vscode.ExtensionContext} context
 * @returns {Promise<{sendFeedback: (event: object) => Promise<{id: string, seq: number, duplicate: boolean}>}>}
 */
async function activate(context) {
  const { Client } = await import('@palate/client');
  const { FeedbackSender, FeedbackSession, externalEvent } = await import('./src/feedback.js');
  const sender = new FeedbackSender(() => Client.connect());
  const session = new FeedbackSession(sender);
  context.subscriptions.push({ dispose: () => void sender.dispose() });

  /** @param {(selection: import('./src/feedback.js').Selection) => Promise<unknown>} action */
  const onSelection = (action) => async () => {
    const selection = readSelection();
    if (!selection) {
      void vscode.window.showWarningMessage('Palate: select the answer first.');
      return;
    }
    try {
      const outcome = await action(selection);
      void vscode.window.setStatusBarMessage(`Palate: ${describe(outcome)}`, 4000);
    } catch (e) {
      void vscode.window.showErrorMessage(`Palate: ${/** @type {Error} */ (e).message}`);
    }
  };

  context.subscriptions.push(
    vscode.commands.registerCommand('palate.markGood', onSelection((s) => session.mark(s, 1))),
    vscode.commands.registerCommand('palate.markBad', onSelection((s) => session.mark(s, -1))),
    vscode.commands.registerCommand('palate.preferOverPrevious', onSelection((s) => session.prefer(s))),
  );

  return {
    /**
     * Send one v1 event (docs/events.md); `source` defaults to "vscode".
     * Rejects with a PalateError (`code`, `message`, `details`).
     * @param {object} event
     */
    sendFeedback: (event) => sender.send(externalEvent(event)),
  };
}

/** @returns {import('./src/feedback.js').Selection | null} */
function readSelection() {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.selection.isEmpty) return null;
  const { document, selection } = editor;
  return {
    text: document.getText(selection),
    prefix: document.getText(new vscode.Range(new vscode.Position(0, 0), selection.start)),
    fileName: path.basename(document.fileName),
    languageId: document.languageId,
  };
}

/** @param {any} outcome */
function describe(outcome) {
  if (outcome.remembered) return 'remembered this answer; select the other one and run the command again.';
  return outcome.result.duplicate ? 'already stored.' : `stored (${outcome.event.kind}).`;
}

module.exports = { activate };
