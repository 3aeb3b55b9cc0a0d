// collab demo page: Alice creates a session, Bob joins it from the invite link; both type at
// the same time at different places (operations in flight on both sides, transformed) and both
// editors converge on the server's text; cursors, language switch and Run (in a Web Worker,
// output shared as execution-result) show on both pages.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import vm from 'node:vm';
import {
  ROOT, startServer, launchBrowser, openPage, screenshot, waitForText, waitForCount, waitUntil, httpGet,
} from '../lib/harness.mjs';

let server, browser;
const LATENCY_MS = 60; // each way, for every frame of both pages: edits overlap in flight

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Forwards frames after `ms`, in order.
function delayed(send, ms) {
  const queue = [];
  let pumping = false;
  const pump = async () => {
    pumping = true;
    while (queue.length) {
      const wait = queue[0].at - Date.now();
      if (wait > 0) await sleep(wait);
      send(queue.shift().data);
    }
    pumping = false;
  };
  return (data) => {
    queue.push({ at: Date.now() + ms, data });
    if (!pumping) pump();
  };
}

// Opens a page whose WebSocket goes through a proxy adding latency (a slow network), so that
// each side has edits in flight and buffered when the other's arrive.
async function openSlowPage(url, options) {
  const page = await openPage(browser, '', options);
  await page.routeWebSocket(/\/ws\//, (ws) => {
    const upstream = ws.connectToServer();
    ws.onMessage(delayed((data) => upstream.send(data), LATENCY_MS));
    upstream.onMessage(delayed((data) => ws.send(data), LATENCY_MS));
  });
  await page.goto(url);
  return page;
}

const stats = (page) => page.evaluate(() => ({ ...window.collabStats }));

before(async () => {
  server = await startServer('collab');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const editorValue = (page) => page.locator('#editor').inputValue();
const person = (page, name) => page.locator('#participants li', { hasText: name });

async function caretAt(page, where) {
  await page.locator('#editor').focus();
  await page.evaluate((w) => {
    const e = document.getElementById('editor');
    const at = w === 'end' ? e.value.length : w;
    e.setSelectionRange(at, at);
  }, where);
}

test("the page's OT (ot.js) keeps the transform and compose laws on code points", () => {
  const sandbox = {};
  vm.runInNewContext(readFileSync(path.join(ROOT, 'protocols/collab/web/ot.js'), 'utf8'), sandbox);
  const OT = sandbox.CollabOT;
  let seed = 42;
  const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
  const alphabet = ['a', 'b', 'é', '😀', '\n', ' '];
  const randText = (n) => Array.from({ length: n }, () => alphabet[rnd(alphabet.length)]).join('');
  const randOp = (text) => {
    const len = [...text].length; const op = []; let i = 0;
    while (i < len) {
      const n = 1 + rnd(Math.min(3, len - i)); const kind = rnd(3);
      if (kind === 0) { OT.push(op, n); i += n; } else if (kind === 1) { OT.push(op, -n); i += n; } else OT.push(op, randText(1 + rnd(3)));
    }
    if (rnd(2)) OT.push(op, randText(2));
    return op;
  };
  for (let i = 0; i < 3000; i++) {
    const s = randText(rnd(12)); const a = randOp(s); const b = randOp(s);
    const [a2, b2] = OT.transform(a, b);
    assert.equal(OT.apply(OT.apply(s, a), b2), OT.apply(OT.apply(s, b), a2), JSON.stringify({ s, a, b }));
    const c = randOp(OT.apply(s, a));
    assert.equal(OT.apply(s, OT.compose(a, c)), OT.apply(OT.apply(s, a), c));
    const t = randText(rnd(12));
    assert.equal(OT.apply(s, OT.diff(s, t)), t);
  }
  // Ties: the first argument's insert goes first, as on the server.
  const [x2, y2] = OT.transform(['x'], ['y']);
  assert.equal(OT.apply('x', y2), 'xy');
  assert.equal(OT.apply('y', x2), 'xy');
  // Editor offsets are UTF-16; the wire counts code points.
  assert.equal(OT.toCp('é😀a', 3), 2);
  assert.equal(OT.toU16('é😀a', 2), 3);
});

test('GET / serves the page; the REST API still works', async () => {
  const res = await httpGet(server.url + '/');
  assert.equal(res.status, 200);
  assert.match(res.contentType, /text\/html/);
  assert.equal((await httpGet(server.url + '/runner.js')).status, 200);
  const created = await httpGet(server.url + '/api/sessions', { method: 'POST' });
  assert.equal(created.status, 201);
});

test('two participants edit one document concurrently and share cursors, language and runs', async () => {
  const alice = await openSlowPage(server.url);
  await alice.fill('#username', 'Alice');
  await alice.click('#create-btn');
  await waitForText(alice.locator('#status'), 'connected');
  const id = await alice.locator('#session-id').textContent();
  assert.match(id, /^[0-9a-f-]{36}$/);
  assert.equal(new URL(alice.url()).hash, `#${id}`);
  const initial = await editorValue(alice);
  assert.match(initial, /console\.log\('hello from ' \+ 'collab'\);\n$/);

  // Bob follows the invite link on a phone-sized screen: the session id is prefilled.
  const bob = await openSlowPage(`${server.url}/#${id}`, { mobile: true });
  assert.equal(await bob.locator('#session-input').inputValue(), id);
  await bob.fill('#username', 'Bob');
  await bob.press('#username', 'Enter');
  await waitForText(bob.locator('#status'), 'connected');
  await waitUntil(async () => (await editorValue(bob)) === initial, { message: 'bob got the document' });
  await waitForCount(alice.locator('#participants li'), 2);
  await waitForCount(bob.locator('#participants li'), 2);
  await waitForText(person(alice, 'Bob'), 'Bob');
  await waitForText(alice.locator('#activity'), 'Bob joined');

  // Concurrent typing: Alice appends a line at the end while Bob types at the very start
  // (non-ASCII included: positions are code points, not UTF-16 units). Keystrokes interleave,
  // so each side has edits in flight when the other's arrive.
  await caretAt(alice, 'end');
  await caretAt(bob, 0);
  await Promise.all([
    (async () => {
      await alice.keyboard.type('const a = 1;', { delay: 25 });
      await alice.keyboard.press('Backspace');
      await alice.keyboard.press('Backspace');
      await alice.keyboard.type('42;', { delay: 25 });
    })(),
    (async () => {
      await bob.keyboard.type('/* é', { delay: 30 });
      await bob.keyboard.insertText('😀');
      await bob.keyboard.type(' */ ', { delay: 30 });
    })(),
  ]);
  const expected = `/* é😀 */ ${initial}const a = 42;`;
  await waitUntil(async () => (await editorValue(alice)) === expected && (await editorValue(bob)) === expected, {
    message: 'both editors converge',
  }).catch(async (err) => {
    err.message += `\nalice: ${JSON.stringify(await editorValue(alice))}\nbob:   ${JSON.stringify(await editorValue(bob))}`;
    throw err;
  });
  await waitUntil(async () => (await httpGet(`${server.url}/api/sessions/${id}`)).json().code === expected, {
    message: 'the server has the same text',
  });
  // The edits really were concurrent: both pages composed local edits into a buffer and
  // transformed incoming operations against their pending ones; none needed a reset.
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    const s = await stats(page);
    assert.ok(s.transformed > 0 && s.composed > 0, `${who} ${JSON.stringify(s)}`);
    assert.equal(s.resets, 1, `${who} only the join reset the document: ${JSON.stringify(s)}`);
    assert.ok(s.sent < 20, `${who} sent operations, batched while one was in flight: ${JSON.stringify(s)}`);
  }

  // Second round in the middle of the same line: both insert at different columns of line 2.
  const line2 = expected.indexOf('console.log');
  await caretAt(alice, line2);                                  // before `console`
  await caretAt(bob, expected.indexOf("'collab'") + 1);         // inside 'collab'
  await Promise.all([
    alice.keyboard.type('void ', { delay: 20 }),
    bob.keyboard.type('co-', { delay: 20 }),
  ]);
  const expected2 = expected.replace('console.log', 'void console.log').replace("'collab'", "'co-collab'");
  await waitUntil(async () => (await editorValue(alice)) === expected2 && (await editorValue(bob)) === expected2, {
    message: 'both editors converge (round 2)',
  });

  // Cursors: each page lists the other's caret as line:column (code points: é😀 count 1 each).
  await caretAt(bob, [...'/* é😀 */ '].length + 1); // UTF-16 index 10 = after "/* é😀 */ "
  await waitForText(person(alice, 'Bob').locator('.cursor'), 'Ln 1, Col 10');
  await caretAt(alice, expected2.length);
  const lastLine = expected2.split('\n').length;
  await waitForText(person(bob, 'Alice').locator('.cursor'), `Ln ${lastLine}, Col 14`);
  // ... and draws it over the editor with the name.
  await waitForText(alice.locator('#carets .caret'), 'Bob');
  await waitForText(bob.locator('#carets .caret'), 'Alice');
  // Alice types before Bob's caret: her page moves his caret along until he sends a new one.
  await caretAt(alice, 0);
  await alice.keyboard.type('// ');
  await waitForText(person(alice, 'Bob').locator('.cursor'), 'Ln 1, Col 13');
  await waitUntil(async () => (await editorValue(bob)).startsWith('// /*'), { message: 'bob got the prefix' });
  await alice.keyboard.press('Backspace');
  await alice.keyboard.press('Backspace');
  await alice.keyboard.press('Backspace');
  await waitForText(person(alice, 'Bob').locator('.cursor'), 'Ln 1, Col 10');
  await waitUntil(async () => (await editorValue(bob)) === expected2, { message: 'prefix removed on bob' });

  // Language switch propagates both ways.
  await bob.selectOption('#language', 'python');
  await waitUntil(async () => (await alice.locator('#language').inputValue()) === 'python', { message: 'alice sees python' });
  await waitForText(alice.locator('#activity'), 'Bob switched the language to python');
  await alice.selectOption('#language', 'javascript');
  await waitUntil(async () => (await bob.locator('#language').inputValue()) === 'javascript', { message: 'bob sees javascript' });

  // Run on Alice's page: the code runs in her browser; Bob sees the shared output.
  await alice.click('#run');
  await waitForText(alice.locator('#output'), 'hello from co-collab');
  await waitForText(alice.locator('#output-meta'), 'Run by you');
  await waitForText(bob.locator('#output'), 'hello from co-collab');
  await waitForText(bob.locator('#output-meta'), 'Run by Alice');
  await screenshot(alice, 'collab-alice', { docs: 'collab' });
  await screenshot(bob, 'collab-bob-mobile');

  // An infinite loop: the worker is stopped after the time limit and both pages say so.
  await bob.locator('#editor').focus();
  await bob.keyboard.press('ControlOrMeta+a');
  await bob.keyboard.type('console.log("spinning"); while (true) {}');
  await waitUntil(async () => (await editorValue(alice)) === 'console.log("spinning"); while (true) {}', { message: 'alice sees the loop' });
  await bob.click('#run');
  await waitForText(alice.locator('#output-meta'), 'Bob is running the code');
  await waitForText(bob.locator('#output'), 'Timed out', { timeout: 8000 });
  await waitForText(alice.locator('#output'), 'Timed out');
  await waitForText(alice.locator('#output'), 'spinning');
  await waitForText(alice.locator('#output-meta'), 'Run by Bob');
  assert.equal(await bob.locator('#run').isEnabled(), true, 'Run is usable again');

  // Bob leaves: Alice's list shrinks.
  await bob.context().close();
  await waitForCount(alice.locator('#participants li'), 1);
  await waitForText(alice.locator('#activity'), 'Bob left');
  assert.deepEqual(alice.consoleErrors, []);
});
