// fastchat demo page: two browser users pick names, see each other online, open a chat, see
// typing and delivery ticks, keep the socket alive with PING, reconnect after a server restart
// (re-HELLO, chat re-opened) and see the other go offline.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, openPage, screenshot, waitForText, waitUntil, httpGet } from '../lib/harness.mjs';

let server, browser;

before(async () => {
  server = await startServer('fastchat');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const person = (page, name) => page.locator('#people button.person', { hasText: name });
const bubble = (page, text) => page.locator('#messages li.msg', { hasText: text });

async function join(page, name) {
  await page.getByRole('textbox', { name: 'Display name' }).fill(name);
  await page.getByRole('button', { name: 'Start chatting' }).click();
  await waitForText(page.locator('#status'), 'Online');
  await waitForText(page.locator('#me-name'), name);
}

/** Records the app-level frames a page sends (to check PING and HELLO). */
function recordSentFrames(page) {
  const sent = [];
  sent.at = []; // when each frame was sent
  page.on('websocket', (ws) => ws.on('framesent', ({ payload }) => {
    try { sent.push(JSON.parse(payload).type); sent.at.push(Date.now()); } catch { /* not JSON */ }
  }));
  return sent;
}

test('GET / serves the page', async () => {
  const res = await httpGet(server.url + '/');
  assert.equal(res.status, 200);
  assert.match(res.contentType, /text\/html/);
});

test('two users see each other, chat with typing and ticks, and survive a restart', async () => {
  const alice = await openPage(browser, null);
  const aliceSent = recordSentFrames(alice);
  await alice.goto(server.url);
  await join(alice, 'Alice');
  await waitUntil(() => alice.locator('#nobody').isVisible(), { message: 'alice sees nobody else yet' });
  const aliceId = await alice.evaluate(() => localStorage.getItem('fastchat.userId'));
  assert.match(aliceId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);

  const bob = await openPage(browser, server.url, { mobile: true });
  await join(bob, 'Bob');

  // Presence on both sides.
  await waitForText(person(alice, 'Bob'), 'online');
  await waitForText(person(bob, 'Alice'), 'online');

  // Alice opens the chat; Bob (phone layout) opens it from his list too.
  await person(alice, 'Bob').click();
  await waitForText(alice.locator('#chat-title'), 'Bob');
  await person(bob, 'Alice').click();
  await waitForText(bob.locator('#chat-title'), 'Alice');
  assert.equal(await bob.locator('#people').isVisible(), false, 'phone layout shows the chat alone');

  // Typing indicator.
  await alice.locator('#text').pressSequentially('Hi Bob', { delay: 20 });
  await waitForText(bob.locator('#typing'), 'Alice is typing');
  await alice.press('#text', 'Enter');
  await waitForText(bob.locator('#messages'), 'Hi Bob');
  await waitUntil(async () => (await bob.locator('#typing').textContent()) === '', { message: 'typing cleared on bob' });

  // Delivery ticks: Bob's page acks, Alice's tick turns into ✓✓ delivered.
  await waitUntil(async () => (await bubble(alice, 'Hi Bob').locator('.tick').getAttribute('data-status')) === 'delivered',
    { message: 'alice sees delivered' });
  assert.equal(await bubble(alice, 'Hi Bob').locator('.tick').textContent(), '✓✓');

  await bob.fill('#text', 'Hey Alice, all good');
  await bob.press('#text', 'Enter');
  await waitForText(alice.locator('#messages'), 'Hey Alice, all good');
  await waitUntil(async () => (await bubble(bob, 'Hey Alice').locator('.tick').getAttribute('data-status')) === 'delivered',
    { message: 'bob sees delivered' });
  await alice.locator('#text').pressSequentially('Typing a reply', { delay: 10 });
  await waitForText(bob.locator('#typing'), 'Alice is typing');
  await screenshot(alice, 'fastchat-alice', { docs: 'fastchat' });
  await screenshot(bob, 'fastchat-bob-mobile');
  await alice.fill('#text', '');

  // Reconnect: restart the server on the same port; both pages come back with backoff, say
  // HELLO again (presence), and a message re-opens the chat the new server does not know.
  const port = server.port;
  await server.stop();
  await waitForText(alice.locator('#status'), /Offline|Reconnecting/);
  server = await startServer('fastchat', [], { port });
  await waitForText(alice.locator('#status'), 'Online', { timeout: 20000 });
  await waitForText(bob.locator('#status'), 'Online', { timeout: 20000 });
  await waitForText(person(alice, 'Bob'), 'online');
  assert.ok(aliceSent.filter((t) => t === 'HELLO').length >= 2, `alice said HELLO again: ${aliceSent}`);
  await bob.fill('#text', 'after the restart');
  await bob.press('#text', 'Enter');
  await waitForText(alice.locator('#messages'), 'after the restart');
  await waitUntil(async () => (await bubble(bob, 'after the restart').locator('.tick').getAttribute('data-status')) === 'delivered',
    { message: 'delivered after restart' });

  // Bob leaves: Alice sees him offline.
  await bob.context().close();
  await waitForText(person(alice, 'Bob'), 'offline');
  await waitForText(alice.locator('#peer-state'), 'offline');
  await screenshot(alice, 'fastchat-bob-offline');

  // App-level PING every 15 s (the server closes sockets silent for 20 s).
  // The timer restarts with each connection: expect a PING within 15 s (+2 s slack) of the last HELLO.
  const lastHello = aliceSent.lastIndexOf('HELLO');
  const helloAt = aliceSent.at[lastHello];
  await waitUntil(() => aliceSent.indexOf('PING', lastHello) !== -1,
    { timeout: Math.max(1000, 17000 - (Date.now() - helloAt)), interval: 200, message: 'a PING within 15 s of HELLO' });
  const pingAt = aliceSent.at[aliceSent.indexOf('PING', lastHello)];
  assert.ok(pingAt - helloAt > 13000, `PING comes about 15 s after HELLO, not ${pingAt - helloAt} ms`);
  assert.deepEqual(alice.consoleErrors.filter((e) => !/WebSocket|ERR_CONNECTION_REFUSED/.test(e)), []);
});
