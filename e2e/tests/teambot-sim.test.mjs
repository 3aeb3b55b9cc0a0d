// teambot-sim dashboard: the simulator runs a short chaotic scenario against the real
// `switchboard teambot` client process; two dashboard pages follow it live (teams, connection
// states, counts) and both end on a perfect scorecard.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, spawnBinary, withTimeout, launchBrowser, openPage, screenshot, waitForText, waitUntil, httpGet,
} from '../lib/harness.mjs';

const TEAMS = 6;
const SIM_ARGS = [
  '--sim-seed', '7', '--sim-teams', String(TEAMS), '--sim-duration', '6s', '--sim-join-window', '1s',
  '--sim-message-rate', '40', '--sim-leaving-teams', '2', '--sim-healthcheck-interval', '2s',
  '--sim-team-drop-rate', '1', '--sim-refuse-connect-share', '0.1', '--sim-connect-delay-max', '100ms',
  '--sim-settle-timeout', '10s',
];
let server, bot, browser;

before(async () => {
  server = await startServer('teambot-sim', SIM_ARGS);
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await bot?.stop();
  await server?.stop();
});

test('GET / serves the dashboard and /scorecard still answers', async () => {
  const page = await httpGet(server.url + '/');
  assert.equal(page.status, 200);
  assert.match(page.contentType, /text\/html/);
  const card = await httpGet(server.url + '/scorecard');
  assert.equal(card.status, 200);
  assert.equal(card.json().phase, 'waiting');
});

test('two dashboards follow a scenario run by the real teambot client to a perfect scorecard', async () => {
  const desk = await openPage(browser, server.url);
  const phone = await openPage(browser, server.url, { mobile: true });
  for (const page of [desk, phone]) {
    await waitForText(page.locator('#verdict'), 'Waiting for the bot');
    await waitForText(page.locator('#cmd'), `ws://${server.host}/global`);
  }

  bot = spawnBinary(['teambot', '--url', `${server.wsUrl}/global`, '--backoff-initial', '100ms', '--backoff-max', '1s'],
    { name: 'teambot' });

  // Live: teams join and connect, messages are counted, the phase moves on.
  await waitForText(desk.locator('#verdict'), 'Scenario running');
  await waitUntil(async () => (await desk.locator('#teams tbody tr').count()) === TEAMS, { message: `${TEAMS} team rows` });
  await waitUntil(async () => (await desk.locator('#teams .state[data-state="connected"]').count()) > 0,
    { message: 'a connected team' });
  await waitUntil(async () => Number((await desk.locator('#messages-count').textContent()).replace(/,/g, '')) > 0,
    { message: 'messages counted' });
  await screenshot(desk, 'teambot-sim-running');

  // The end: goodbye, the bot exits 0, both pages show the perfect scorecard.
  const code = await withTimeout(bot.exited, 45000, 'the teambot client exiting after goodbye');
  assert.equal(code, 0, `teambot exit: ${code}\n${bot.output().slice(-3000)}`);
  const card = (await httpGet(server.url + '/scorecard')).json();
  assert.equal(card.perfect, true, JSON.stringify(card.mismatches));
  for (const page of [desk, phone]) {
    await waitForText(page.locator('#verdict'), 'Perfect scorecard', { timeout: 5000 });
    await waitForText(page.locator('#phase'), 'finished');
    await waitForText(page.locator('#mismatch-count'), '0');
    await waitForText(page.locator('#teams-count'), `${TEAMS} / ${TEAMS}`);
    assert.equal(await page.locator('#teams .state[data-state="left"]').count(), 2);
    assert.equal(await page.locator('#teams td.bad').count(), 0);
    assert.equal(await page.locator('#teams .state[data-state="connected"]').count(), TEAMS - 2);
  }
  // Totals on the page match the scorecard.
  assert.equal((await desk.locator('#messages-count').textContent()).replace(/,/g, ''), String(card.totals.messages));
  await screenshot(desk, 'teambot-sim-perfect', { docs: 'teambot-sim' });
  await screenshot(phone, 'teambot-sim-perfect-mobile', { fullPage: true });
  assert.deepEqual(desk.consoleErrors, []);
});
