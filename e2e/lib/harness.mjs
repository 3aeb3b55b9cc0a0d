// Browser-test harness for Switchboard's demo pages (`GET /` of every protocol).
//
// Usage in a test file (e2e/tests/<protocol>.test.mjs, run with `npm test --prefix e2e`):
//
//   import { test, before, after } from 'node:test';
//   import assert from 'node:assert/strict';
//   import { startServer, launchBrowser, openPage, screenshot, waitForText } from '../lib/harness.mjs';
//
//   let server, browser;
//   before(async () => {
//     server = await startServer('ip-chat', ['--history-limit', '50']);
//     browser = await launchBrowser();
//   });
//   after(async () => { await browser?.close(); await server?.stop(); });
//
//   test('two pages see each other', async () => {
//     const alice = await openPage(browser, server.url);   // own context: own localStorage
//     const bob = await openPage(browser, server.url, { mobile: true });
//     ...
//     await waitForText(bob.locator('#log'), 'hello');      // bounded (default 10 s)
//     await screenshot(bob, 'ip-chat-bob', { docs: 'ip-chat' }); // + docs/screenshots/ip-chat.png
//   });
//
// Exports
//   ROOT, BIN                  repo root; the binary ($SWITCHBOARD_BIN or target/debug/switchboard)
//   startServer(protocol, extraArgs = [], { env, readyPath = '/healthz', timeoutMs = 15000, port })
//       (`port`: reuse a known port, e.g. to restart a server and test a page's reconnect)
//       -> { url: 'http://127.0.0.1:PORT', wsUrl: 'ws://127.0.0.1:PORT', port, host,
//            output(): string (server stdout+stderr so far), stop(): Promise<void> }
//       Picks a free port, spawns `BIN serve --protocol <protocol> --listen 127.0.0.1:PORT ...`,
//       waits for GET /healthz = 200 (retries on another port if the process exits early).
//       stop() sends SIGTERM, then SIGKILL after 5 s; it is idempotent. Every process the harness
//       spawned is also SIGKILLed when the test process exits, so a failed test leaks nothing.
//   spawnBinary(args, { env, name }) -> { proc, output(), stop(), exited: Promise<code> }
//       Runs BIN with any arguments (e.g. the teambot client: ['teambot', '--url', ...]).
//   launchBrowser() -> playwright Browser (Debian's /usr/bin/chromium, or $CHROMIUM_PATH, headless,
//       flags below; Playwright gives it a fresh empty temporary --user-data-dir and deletes it on
//       close — it refuses an explicit --user-data-dir argument with launch()).
//   openPage(browser, url, { mobile = false, viewport, headers }) -> Page in a NEW browser context
//       (separate cookies/localStorage = a separate user; `headers` are sent with every request,
//       e.g. { 'X-Forwarded-For': '10.0.0.2' } with `serve --trust-proxy` to look like another
//       IP). Mobile = 390x780 touch viewport. Default timeout 10 s. Page errors and
//       console errors are collected in page.consoleErrors (array of strings) and printed.
//       url null: the page stays blank (attach listeners, e.g. page.on("websocket"), then goto).
//   screenshot(page, name, { docs }) -> path of artifacts/screenshots/<name>.png;
//       with docs: '<protocol>' it is also copied to docs/screenshots/<protocol>.png, but only
//       when SWITCHBOARD_UPDATE_SCREENSHOTS=1 (so ordinary test runs leave the tree clean).
//   waitUntil(fn, { timeout = 10000, interval = 50, message }) -> fn's first truthy value;
//       throws `timed out: <message>` (with the last error, if fn threw) after the timeout.
//   waitForText(locator, textOrRegExp, { timeout }) -> the locator's textContent once it contains
//       the text / matches the RegExp.
//   waitForCount(locator, n, { timeout }) -> waits until locator.count() === n.
//   withTimeout(promise, ms, what) -> the promise's value, or throws after ms (timer cleared, so
//       it never keeps the test process alive; a bare setTimeout in Promise.race would).
//   Tip: put <link rel="icon" href="data:,"> in pages, or the favicon 404 shows up in consoleErrors.
//   httpGet(url) -> { status, contentType, text, json() }
//   freePort() -> a port that was free a moment ago on 127.0.0.1.

import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.SWITCHBOARD_BIN
  ? path.resolve(process.env.SWITCHBOARD_BIN)
  : path.join(ROOT, 'target', 'debug', 'switchboard');
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const children = new Set();
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A port that was free on 127.0.0.1 a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Poll `fn` until it returns a truthy value; bounded by `timeout` ms. */
export async function waitUntil(fn, { timeout = 10000, interval = 50, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
      lastError = undefined;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) {
      const why = lastError ? ` (last error: ${lastError.message ?? lastError})` : '';
      throw new Error(`timed out after ${timeout} ms: ${message}${why}`);
    }
    await sleep(interval);
  }
}

/** `promise`, or a rejection `timed out after ms: what` (the timer never keeps node alive). */
export async function withTimeout(promise, ms, what = 'operation') {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Wait until the locator's text contains `expected` (string) or matches it (RegExp). */
export async function waitForText(locator, expected, { timeout = 10000 } = {}) {
  let last = '';
  try {
    return await waitUntil(
      async () => {
        last = (await locator.first().textContent({ timeout: 1000 })) ?? '';
        const ok = expected instanceof RegExp ? expected.test(last) : last.includes(expected);
        return ok ? last : false;
      },
      { timeout, message: `text ${expected} in ${locator}` },
    );
  } catch (err) {
    err.message += `; last text: ${JSON.stringify(last.slice(0, 500))}`;
    throw err;
  }
}

/** Wait until `locator` matches exactly `n` elements. */
export async function waitForCount(locator, n, { timeout = 10000 } = {}) {
  let last = -1;
  try {
    await waitUntil(
      async () => {
        last = await locator.count();
        return last === n;
      },
      { timeout, message: `${n} elements for ${locator}` },
    );
  } catch (err) {
    err.message += `; last count: ${last}`;
    throw err;
  }
}

/** GET (or another method) with a bounded wait. */
export async function httpGet(url, { method = 'GET', body, timeout = 5000 } = {}) {
  const res = await fetch(url, { method, body, signal: AbortSignal.timeout(timeout) });
  const text = await res.text();
  return {
    status: res.status,
    contentType: res.headers.get('content-type') ?? '',
    text,
    json: () => JSON.parse(text),
  };
}

/** Spawn the switchboard binary with `args`; output is kept for diagnostics. */
export function spawnBinary(args, { env = {}, name = 'switchboard' } = {}) {
  if (!existsSync(BIN)) {
    throw new Error(`${BIN} not found: run \`cargo build -p switchboard-cli\` or set SWITCHBOARD_BIN`);
  }
  const proc = spawn(BIN, args, {
    cwd: ROOT,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', NO_COLOR: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(proc);
  let out = '';
  const keep = (chunk) => {
    out += chunk.toString();
    if (out.length > 200_000) out = out.slice(-100_000);
  };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  const exited = new Promise((resolve) => {
    proc.on('exit', (code, signal) => {
      children.delete(proc);
      resolve(code ?? signal);
    });
    proc.on('error', (err) => {
      children.delete(proc);
      out += `\n[${name}] spawn error: ${err.message}`;
      resolve('error');
    });
  });
  let stopping;
  const stop = () => {
    stopping ??= (async () => {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const done = await withTimeout(exited, 5000, 'exit').then(() => true, () => false);
      if (!done) {
        proc.kill('SIGKILL');
        await withTimeout(exited, 2000, 'exit after SIGKILL').catch(() => {});
      }
    })();
    return stopping;
  };
  return { proc, exited, output: () => out, stop };
}

/** Start `switchboard serve --protocol <protocol>` on a free port and wait until it is healthy. */
export async function startServer(
  protocol,
  extraArgs = [],
  { env = {}, readyPath = '/healthz', timeoutMs = 15000, port: fixedPort } = {},
) {
  let lastOutput = '';
  for (let attempt = 0; attempt < (fixedPort ? 1 : 3); attempt++) {
    const port = fixedPort ?? (await freePort());
    const host = `127.0.0.1:${port}`;
    const child = spawnBinary(['serve', '--protocol', protocol, '--listen', host, ...extraArgs], {
      env,
      name: protocol,
    });
    const url = `http://${host}`;
    let exitedEarly = false;
    child.exited.then(() => {
      exitedEarly = true;
    });
    try {
      await waitUntil(
        async () => {
          if (exitedEarly) throw new Error('server exited');
          const res = await httpGet(url + readyPath, { timeout: 1000 });
          return res.status === 200;
        },
        { timeout: timeoutMs, interval: 100, message: `${protocol} server healthy at ${url}${readyPath}` },
      );
      return { url, wsUrl: `ws://${host}`, port, host, output: child.output, stop: child.stop, proc: child.proc };
    } catch (err) {
      await child.stop();
      lastOutput = child.output();
      if (!exitedEarly) {
        throw new Error(`${err.message}\n--- server output ---\n${lastOutput}`);
      }
      // The process died (e.g. the port was taken in between): try another port.
    }
  }
  throw new Error(`${protocol} server did not start\n--- server output ---\n${lastOutput}`);
}

/** Headless Debian chromium through playwright-core. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `${CHROMIUM} not found: apt-get install -y chromium (or set CHROMIUM_PATH; SWITCHBOARD_SKIP_BROWSER_TESTS=1 skips in CI)`,
    );
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30000,
  });
}

/** A page in a fresh browser context (its own storage: a separate user), opened at `url`. */
export async function openPage(browser, url, { mobile = false, viewport, headers } = {}) {
  const context = await browser.newContext({
    extraHTTPHeaders: headers,
    viewport: viewport ?? (mobile ? { width: 390, height: 780 } : { width: 1100, height: 760 }),
    deviceScaleFactor: 1,
    isMobile: mobile,
    hasTouch: mobile,
  });
  const page = await context.newPage();
  page.setDefaultTimeout(10000);
  page.setDefaultNavigationTimeout(15000);
  page.consoleErrors = [];
  page.on('pageerror', (err) => {
    page.consoleErrors.push(`pageerror: ${err.message}`);
    console.error(`[page ${url}] pageerror: ${err.message}`);
  });
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      page.consoleErrors.push(msg.text());
      console.error(`[page ${url}] console.error: ${msg.text()}`);
    }
  });
  if (url) await page.goto(url, { waitUntil: 'load' });
  return page;
}

/**
 * Save a PNG to artifacts/screenshots/<name>.png; with { docs: '<protocol>' } and
 * SWITCHBOARD_UPDATE_SCREENSHOTS=1 also to docs/screenshots/<protocol>.png (the README's pictures).
 */
export async function screenshot(page, name, { docs, fullPage = false } = {}) {
  const dir = path.join(ROOT, 'artifacts', 'screenshots');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.png`);
  await page.screenshot({ path: file, fullPage, animations: 'disabled', timeout: 10000 });
  if (docs && process.env.SWITCHBOARD_UPDATE_SCREENSHOTS === '1') {
    const docsDir = path.join(ROOT, 'docs', 'screenshots');
    mkdirSync(docsDir, { recursive: true });
    copyFileSync(file, path.join(docsDir, `${docs}.png`));
  }
  return file;
}
