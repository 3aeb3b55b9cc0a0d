// Web Worker that runs the session's JavaScript in the browser (never on the server).
// The page terminates this worker on timeout, so an infinite loop cannot hang the tab.
'use strict';
const MAX_OUTPUT = 64 * 1024;
let size = 0;
let truncated = false;

function format(value) {
  if (typeof value === 'string') return value;
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  try {
    const json = JSON.stringify(value);
    return json === undefined ? String(value) : json;
  } catch {
    return String(value);
  }
}

function emit(stream, args) {
  if (truncated) return;
  let line = args.map(format).join(' ');
  if (size + line.length > MAX_OUTPUT) {
    line = `${line.slice(0, Math.max(0, MAX_OUTPUT - size))}\n… output truncated`;
    truncated = true;
  }
  size += line.length;
  postMessage({ kind: 'line', stream, line });
}

for (const [name, stream] of [['log', 'out'], ['info', 'out'], ['debug', 'out'], ['warn', 'err'], ['error', 'err']]) {
  console[name] = (...args) => emit(stream, args);
}

onmessage = async (event) => {
  const { code } = event.data;
  try {
    // An async function body, so top-level `await` works and returned promises settle.
    const run = new Function(`return (async () => {\n${code}\n})();`);
    await run();
    // Let timers scheduled with a zero delay fire before reporting completion.
    await new Promise((resolve) => setTimeout(resolve, 0));
    postMessage({ kind: 'done' });
  } catch (error) {
    postMessage({ kind: 'done', error: error instanceof Error ? `${error.name}: ${error.message}` : String(error) });
  }
};
