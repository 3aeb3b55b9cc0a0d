// reqack demo page: two browser users message each other; receipts (delivered, then read),
// edit, delete, typing and presence propagate; then Bob's connection drops with his acks lost
// and the page shows "reconnecting…", reconnects and reports the redelivered events, shown once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, screenshot, waitForText, waitForCount, waitUntil, httpGet,
} from '../lib/harness.mjs';

// A long redelivery timeout: the only redeliveries in this test are the ones a reconnect causes.
const ARGS = ['--redelivery-timeout', '60s'];
const DURABLE = new Set(['new', 'edit', 'delete', 'dlvrd', 'read', 'call', 'newCall', 'closeCall']);
let server, browser;

before(async () => {
  server = await startServer('reqack', ARGS);
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const message = (page, text) => page.locator('#messages li.msg', { hasText: text });
const tick = (page, text) => message(page, text).locator('.tick');

async function login(page, userId) {
  await page.fill('#user-id', userId);
  await page.press('#user-id', 'Enter');
  await waitForText(page.locator('#status'), 'connected');
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function receipt(page, text) {
  return tick(page, text).getAttribute('data-receipt', { timeout: 1000 });
}

test('GET / serves the page', async () => {
  const res = await httpGet(server.url + '/');
  assert.equal(res.status, 200);
  assert.match(res.contentType, /text\/html/);
  assert.match(res.text, /reqack/);
});

test('two users message each other with receipts, edits, deletes and a reconnect', async () => {
  const alice = await openPage(browser, server.url);

  // Bob's WebSocket goes through a test proxy (Playwright's routeWebSocket) that can drop his
  // acks and cut his connection, like a flaky network would.
  const bob = await openPage(browser, '', { mobile: true });
  const proxy = { dropAcks: false, route: null, server: null, toPage: [], acked: new Set(), durableWhileDropping: 0, connections: 0 };
  await bob.routeWebSocket(/\/ws\?userId=/, (ws) => {
    const upstream = ws.connectToServer();
    proxy.route = ws;
    proxy.server = upstream;
    proxy.connections += 1;
    ws.onMessage((data) => {
      let frame = null;
      try { frame = JSON.parse(data); } catch { /* forward as is */ }
      if (frame && frame.type === 'ack') {
        if (proxy.dropAcks) return;
        proxy.acked.add(String(frame.id));
      }
      upstream.send(data);
    });
    upstream.onMessage((data) => {
      const frame = JSON.parse(data);
      if (frame.type === 'event') {
        proxy.toPage.push(frame);
        if (proxy.dropAcks && DURABLE.has(frame.eventType)) proxy.durableWhileDropping += 1;
      }
      ws.send(data);
    });
  });
  await bob.goto(server.url);

  await login(alice, 'alice');
  await login(bob, 'bob');

  // Alice opens a conversation by typing Bob's id; Bob is online.
  await alice.fill('#new-chat', 'bob');
  await alice.press('#new-chat', 'Enter');
  await waitForText(alice.locator('#chat-title'), 'bob');
  await waitForText(alice.locator('#chat-meta'), 'online');

  await say(alice, 'Hello Bob');
  // Bob's page acks the event and sends `dlvrd`: Alice sees two ticks, not yet read.
  await waitForText(bob.locator('#conversations'), 'alice');
  await waitUntil(async () => (await receipt(alice, 'Hello Bob')) === 'delivered', { message: 'delivered tick' });
  await waitForText(bob.locator('#conversations .badge'), '1'); // unread
  assert.equal(await receipt(alice, 'Hello Bob'), 'delivered');

  // Bob opens the conversation (history is loaded): `read` goes back to Alice.
  await bob.locator('#conversations button', { hasText: 'alice' }).click();
  await waitForText(bob.locator('#messages'), 'Hello Bob');
  await waitUntil(async () => (await receipt(alice, 'Hello Bob')) === 'read', { message: 'read tick' });
  await waitForCount(bob.locator('#conversations .badge'), 0);

  // Typing indicator and a reply.
  await bob.locator('#text').pressSequentially('Hi Al', { delay: 20 });
  await waitForText(alice.locator('#typing'), 'bob is typing');
  await bob.fill('#text', 'Hi Alice! 👋');
  await bob.press('#text', 'Enter');
  await waitForText(alice.locator('#messages'), 'Hi Alice! 👋');
  await waitUntil(async () => (await receipt(bob, 'Hi Alice')) === 'read', { message: "bob's reply read by alice" });
  assert.equal(await alice.locator('#typing').textContent(), '', 'typing cleared by the message');

  // Alice edits her message: Bob's copy changes and is marked edited.
  await message(alice, 'Hello Bob').locator('button.edit').click();
  await waitForText(alice.locator('#editing'), 'Editing');
  await alice.fill('#text', 'Hello Bob (edited by Alice)');
  await alice.press('#text', 'Enter');
  await waitForText(bob.locator('#messages'), 'Hello Bob (edited by Alice)');
  await waitForText(message(bob, 'Hello Bob (edited by Alice)').locator('.edited'), 'edited');

  // A second message, then Alice deletes it: Bob sees the deletion.
  await say(alice, 'Oops, wrong chat');
  await waitForText(bob.locator('#messages'), 'Oops, wrong chat');
  await message(alice, 'Oops, wrong chat').locator('button.delete').click();
  await waitForText(bob.locator('#messages'), 'This message was deleted');
  await waitForCount(message(bob, 'Oops, wrong chat'), 0);
  await waitForText(alice.locator('#messages'), 'You deleted this message');

  // Everything Bob got so far has been acked through the proxy: now his acks get lost.
  await waitUntil(() => proxy.toPage.every((f) => proxy.acked.has(String(f.id))), { message: 'all acks forwarded' });
  proxy.dropAcks = true;
  await say(alice, 'Are you there? 1');
  await say(alice, 'Are you there? 2');
  await waitForText(bob.locator('#messages'), 'Are you there? 2');
  await waitUntil(() => proxy.durableWhileDropping === 2, { message: 'two durable events unacked' });
  await screenshot(bob, 'reqack-bob-mobile');

  // The connection drops. The page shows "reconnecting…" and reconnects by itself (backoff).
  const sawReconnecting = bob.waitForFunction(
    () => document.getElementById('status').textContent.startsWith('reconnecting'),
    null, { polling: 10, timeout: 10000 },
  );
  proxy.dropAcks = false;
  const before = proxy.connections;
  proxy.route.close({ code: 4000, reason: 'test: network drop' });
  proxy.server.close();
  await sawReconnecting;
  await waitForText(alice.locator('#chat-meta'), 'offline');
  await waitUntil(() => proxy.connections > before, { message: 'bob reconnected' });
  await waitForText(bob.locator('#status'), 'connected');
  // The server re-sends the two unacked events with their ids; the page acks them, counts them
  // and shows each message once.
  await waitForText(bob.locator('#redelivered'), 'redelivered 2 events');
  await waitForCount(message(bob, 'Are you there? 1'), 1);
  await waitForCount(message(bob, 'Are you there? 2'), 1);
  await waitUntil(() => proxy.toPage.every((f) => proxy.acked.has(String(f.id))), { message: 'redelivered events acked' });
  await waitForText(alice.locator('#chat-meta'), 'online');
  await waitUntil(async () => (await receipt(alice, 'Are you there? 2')) === 'read', { message: 'read after reconnect' });
  await screenshot(bob, 'reqack-bob-reconnected');

  // Nothing is redelivered again: the outbox is empty once acked.
  const n = proxy.toPage.length;
  await say(alice, 'Welcome back');
  await waitForText(bob.locator('#messages'), 'Welcome back');
  await waitForText(bob.locator('#redelivered'), 'redelivered 2 events');
  const later = proxy.toPage.slice(n).filter((f) => f.eventType === 'new');
  assert.deepEqual(later.map((f) => f.payload.message), ['Welcome back']);

  await waitUntil(async () => (await receipt(alice, 'Welcome back')) === 'read', { message: 'last message read' });
  await screenshot(alice, 'reqack-alice', { docs: 'reqack' });
  assert.deepEqual(alice.consoleErrors, []);
  assert.deepEqual(bob.consoleErrors.filter((e) => !/WebSocket/.test(e)), []);
});
