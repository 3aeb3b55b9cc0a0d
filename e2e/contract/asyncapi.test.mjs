// AsyncAPI documents (docs/asyncapi/*.json): each one is a valid AsyncAPI 3.0 document, and every
// server -> client frame the protocols' own socket tests received matches the document.
//
// Frames are captured by switchboard-testkit's Client when SWITCHBOARD_CAPTURE_FRAMES names a
// directory (one <crate>.jsonl per protocol crate, one {"path", "frame"} object per line):
//
//   rm -rf target/frames
//   SWITCHBOARD_CAPTURE_FRAMES=$PWD/target/frames cargo test -p switchboard-ip-chat ...
//   npm run asyncapi --prefix e2e   (or: node --test e2e/contract/asyncapi.test.mjs)
//
// This reads $SWITCHBOARD_CAPTURE_FRAMES (relative: to the repository root), or target/frames. Without any
// capture file the frame check is skipped loudly, and fails when $CI is set. No browser or
// server is needed. See docs/asyncapi/README.md.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import Ajv from 'ajv';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const DOCS = join(ROOT, 'docs', 'asyncapi');
// Relative to the repository root, as the testkit takes it.
const FRAMES = resolve(ROOT, process.env.SWITCHBOARD_CAPTURE_FRAMES || join('target', 'frames'));

// Capture file (the crate whose tests wrote it) -> document.
const PACKAGES = {
  'switchboard-ip-chat': 'ip-chat',
  'switchboard-fastchat': 'fastchat',
  'switchboard-reqack': 'reqack',
  'switchboard-collab': 'collab',
  'switchboard-teambot': 'teambot-sim',
};
const DOCUMENTS = Object.values(PACKAGES);
// Mismatches listed in a failure message.
const SHOWN = 20;

const parser = new Parser();
const parsed = new Map();

async function parse(name) {
  if (!parsed.has(name)) {
    const text = readFileSync(join(DOCS, `${name}.json`), 'utf8');
    parsed.set(name, await parser.parse(text, { source: join(DOCS, `${name}.json`) }));
  }
  return parsed.get(name);
}

test('docs/asyncapi holds exactly one document per protocol', () => {
  const files = readdirSync(DOCS).filter((f) => f.endsWith('.json')).sort();
  assert.deepEqual(files, DOCUMENTS.map((d) => `${d}.json`).sort());
});

for (const name of DOCUMENTS) {
  test(`${name}.json is a valid AsyncAPI 3.0 document`, async () => {
    const { document, diagnostics } = await parse(name);
    const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
    assert.deepEqual(
      errors.map((d) => `${d.path.join('.')}: ${d.message}`),
      [],
      `${name}.json has errors`,
    );
    assert.ok(document, `${name}.json did not parse`);
    assert.equal(document.version(), '3.0.0');
    for (const channel of document.channels()) {
      const actions = channel.operations().all().map((op) => op.action());
      assert.ok(actions.includes('send'), `${name}: channel ${channel.id()} has no send operation`);
    }
  });
}

// A channel address such as /ws/{sessionId} as a RegExp for captured paths. A prefix is
// allowed: a protocol can be nested under one in another application (ip-chat's embedding test
// serves it at /chat/ws).
function addressPattern(address) {
  const escaped = address
    .split(/(\{[^}]+\})/)
    .map((part) => (part.startsWith('{') ? '[^/]+' : part.replace(/[.*+?^$()|[\]\\]/g, '\\$&')))
    .join('');
  return new RegExp(`^(?:/.+)?${escaped}/?$`);
}

// The server -> client messages of each channel of a document, with compiled payload schemas.
async function serverMessages(name) {
  const { document } = await parse(name);
  const ajv = new Ajv({ strict: false, allErrors: true });
  const channels = [];
  for (const channel of document.channels()) {
    const messages = [];
    for (const op of channel.operations().all()) {
      if (op.action() !== 'send') continue;
      for (const message of op.messages().all()) {
        const schema = message.payload().json();
        messages.push({ id: message.id(), schema, validate: ajv.compile(schema) });
      }
    }
    channels.push({ id: channel.id(), pattern: addressPattern(channel.address()), messages });
  }
  return channels;
}

// The discriminators a payload schema pins (`type`, and reqack's `eventType`).
function pins(schema) {
  const out = {};
  for (const key of ['type', 'eventType']) {
    const value = schema?.properties?.[key]?.const;
    if (value !== undefined) out[key] = value;
  }
  return out;
}

// Why `frame` matches none of `messages`: the errors of the messages whose discriminators it
// carries (the fewest errors first), or the types it could have been.
function explain(frame, messages) {
  const candidates = messages.filter((m) =>
    Object.entries(pins(m.schema)).every(([key, value]) => frame?.[key] === value),
  );
  if (candidates.length === 0) {
    const known = [...new Set(messages.map((m) => JSON.stringify(pins(m.schema))))];
    return `no message of this kind (known: ${known.join(', ')})`;
  }
  const scored = candidates
    .map((m) => {
      m.validate(frame);
      return { id: m.id, errors: m.validate.errors ?? [] };
    })
    .sort((a, b) => a.errors.length - b.errors.length);
  const best = scored[0];
  const errors = best.errors
    .slice(0, 5)
    .map((e) => `${e.instancePath || '/'} ${e.message}${e.params ? ` ${JSON.stringify(e.params)}` : ''}`);
  return `as ${best.id}: ${errors.join('; ')}`;
}

const captured = existsSync(FRAMES)
  ? readdirSync(FRAMES).filter((f) => f.endsWith('.jsonl'))
  : [];
const known = captured.filter((f) => PACKAGES[f.replace(/\.jsonl$/, '')]);

if (known.length === 0) {
  test('captured frames match the documents', (t) => {
    const message =
      'SKIPPED: no captured frames (run cargo test with SWITCHBOARD_CAPTURE_FRAMES=target/frames)';
    console.log(`\n${'!'.repeat(message.length)}\n${message}\n${'!'.repeat(message.length)}\n`);
    if (process.env.CI) {
      assert.fail(`${message}; CI is set, so this is a failure (looked in ${FRAMES})`);
    }
    t.skip(message);
  });
} else {
  const others = captured.filter((f) => !known.includes(f));
  if (others.length > 0) {
    console.log(`asyncapi: not checked (no document for these crates): ${others.join(', ')}`);
  }
  for (const [pkg, name] of Object.entries(PACKAGES)) {
    const file = `${pkg}.jsonl`;
    test(`${name}: captured frames (${file}) match ${name}.json`, async (t) => {
      if (!known.includes(file)) {
        const message = `no ${file} in ${FRAMES}`;
        if (process.env.CI) assert.fail(`${message}; CI is set, so this is a failure`);
        t.skip(message);
        return;
      }
      const channels = await serverMessages(name);
      const lines = readFileSync(join(FRAMES, file), 'utf8').split('\n');
      const mismatches = [];
      const seen = new Set();
      let checked = 0;
      lines.forEach((line, index) => {
        if (line.trim() === '') return;
        let entry;
        try {
          entry = JSON.parse(line);
        } catch {
          // A line cut short (a test process killed mid-write) is not the protocol's fault.
          return;
        }
        checked += 1;
        const where = `${file}:${index + 1} ${entry.path}`;
        const shown = JSON.stringify(entry.frame).slice(0, 300);
        const channel = channels.find((c) => c.pattern.test(entry.path));
        if (!channel) {
          mismatches.push(`${where}: no channel for this path; frame ${shown}`);
          return;
        }
        const match = channel.messages.find((m) => m.validate(entry.frame));
        if (match) {
          seen.add(match.id);
          return;
        }
        mismatches.push(`${where}: ${explain(entry.frame, channel.messages)}; frame ${shown}`);
      });
      const all = channels.flatMap((c) => c.messages.map((m) => m.id));
      const unseen = [...new Set(all)].filter((id) => !seen.has(id));
      t.diagnostic(`${checked} frames checked; messages never seen: ${unseen.join(', ') || 'none'}`);
      assert.ok(checked > 0, `${file} holds no frames`);
      assert.equal(
        mismatches.length,
        0,
        `${mismatches.length} of ${checked} frames do not match ${name}.json:\n` +
          mismatches.slice(0, SHOWN).join('\n'),
      );
    });
  }
}
