// ip-chat demo page: two browser users (different IPs through X-Forwarded-For + --trust-proxy)
// chat in one room, see history, toggle reactions, hit the counter and the rate limit, and
// survive a server restart.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, screenshot, waitForText, waitForCount, waitUntil, httpGet,
} from '../lib/harness.mjs';

const RATE = 4; // messages per user per minute, small so the test can hit it
const ARGS = ['--trust-proxy', '--rate-limit', String(RATE)];
let server, browser;

before(async () => {
  server = await startServer('ip-chat', ARGS);
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const message = (page, text) => page.locator('#messages li.msg', { hasText: text });
const reaction = (page, text, emoji) => message(page, text).locator(`.reactions button[data-emoji="${emoji}"]`);

async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function reactionState(page, text, emoji) {
  const button = reaction(page, text, emoji);
  return `${(await button.locator('.n').textContent()) || '0'} ${await button.getAttribute('aria-pressed')}`;
}

test('GET / serves the page', async () => {
  const res = await httpGet(server.url + '/');
  assert.equal(res.status, 200);
  assert.match(res.contentType, /text\/html/);
});

test('two users chat, react and see errors on one ip-chat server', async () => {
  const alice = await openPage(browser, server.url, { headers: { 'X-Forwarded-For': '10.0.0.1' } });
  await waitForText(alice.locator('#status'), 'Connected');
  await alice.fill('#author', 'Alice');
  await say(alice, 'Hello from Alice');
  await waitForText(alice.locator('#messages'), 'Hello from Alice');
  // Alice learns her author_id from the echo: her message is marked as hers.
  await waitUntil(async () => (await message(alice, 'Hello from Alice').getAttribute('class')).includes('mine'),
    { message: "Alice's own message marked .mine" });

  // Bob arrives later on a phone-sized screen: the history is replayed.
  const bob = await openPage(browser, server.url, { mobile: true, headers: { 'X-Forwarded-For': '10.0.0.2' } });
  await waitForText(bob.locator('#messages'), 'Hello from Alice');
  assert.equal(await message(bob, 'Hello from Alice').locator('.author').textContent(), 'Alice');
  assert.ok(!(await message(bob, 'Hello from Alice').getAttribute('class')).includes('mine'));

  await bob.fill('#author', 'Bob');
  await say(bob, 'Hi Alice 👋');
  await waitForText(alice.locator('#messages'), 'Hi Alice 👋');
  await waitForText(message(alice, 'Hi Alice').locator('.author'), 'Bob');

  // Reactions toggle and show on both pages; each page highlights only its own.
  await reaction(bob, 'Hello from Alice', '👍').click();
  await waitUntil(async () => (await reactionState(bob, 'Hello from Alice', '👍')) === '1 true', { message: 'bob 👍 1 pressed' });
  await waitUntil(async () => (await reactionState(alice, 'Hello from Alice', '👍')) === '1 false', { message: 'alice sees 👍 1' });
  await reaction(alice, 'Hello from Alice', '👍').click();
  await waitUntil(async () => (await reactionState(alice, 'Hello from Alice', '👍')) === '2 true', { message: 'alice 👍 2 pressed' });
  await waitUntil(async () => (await reactionState(bob, 'Hello from Alice', '👍')) === '2 true', { message: 'bob sees 👍 2' });
  await reaction(alice, 'Hello from Alice', '👍').press('Enter'); // keyboard toggles too
  await waitUntil(async () => (await reactionState(alice, 'Hello from Alice', '👍')) === '1 false', { message: 'alice removed 👍' });
  await waitUntil(async () => (await reactionState(bob, 'Hello from Alice', '👍')) === '1 true', { message: 'bob sees the removal' });
  await reaction(alice, 'Hi Alice', '🎉').click();
  await waitUntil(async () => (await reactionState(bob, 'Hi Alice', '🎉')) === '1 false', { message: 'bob sees 🎉' });
  await screenshot(alice, 'ip-chat-alice', { docs: 'ip-chat' });
  await screenshot(bob, 'ip-chat-bob-mobile');

  // The counter counts code points like the server: 10 emoji are 10 characters, not 20.
  await alice.fill('#text', '😀'.repeat(10));
  await waitForText(alice.locator('#counter'), '10 / 500');
  await alice.fill('#text', 'é'.repeat(501));
  await waitForText(alice.locator('#counter'), '501 / 500');
  assert.match(await alice.locator('#counter').textContent(), /too long/);
  assert.equal(await alice.locator('#send').isDisabled(), true);
  await screenshot(alice, 'ip-chat-too-long');

  // Rate limit: Alice has sent 1; RATE more are refused from the (RATE+1)th, shown as an alert.
  for (let i = 1; i <= RATE; i++) await say(alice, `spam ${i}`);
  await waitForText(alice.locator('#error[role="alert"]'), `Rate limit exceeded. Maximum ${RATE} messages per minute.`);
  assert.equal(await alice.locator('#error').isVisible(), true);
  await waitForText(bob.locator('#messages'), `spam ${RATE - 1}`);
  await waitForCount(bob.locator('#messages li.msg', { hasText: `spam ${RATE}` }), 0);
  await screenshot(alice, 'ip-chat-rate-limited');

  // Reconnect: the server restarts on the same port (empty history); both pages come back.
  const port = server.port;
  await server.stop();
  await waitForText(alice.locator('#status'), /Disconnected|Reconnecting/);
  server = await startServer('ip-chat', ARGS, { port });
  await waitForText(alice.locator('#status'), 'Connected', { timeout: 20000 });
  await waitForText(bob.locator('#status'), 'Connected', { timeout: 20000 });
  await waitForCount(bob.locator('#messages li.msg'), 0);
  await say(bob, 'back again');
  await waitForText(alice.locator('#messages'), 'back again');

  assert.deepEqual(alice.consoleErrors.filter((e) => !/WebSocket|ERR_CONNECTION_REFUSED/.test(e)), []);
  assert.deepEqual(bob.consoleErrors.filter((e) => !/WebSocket|ERR_CONNECTION_REFUSED/.test(e)), []);
});
