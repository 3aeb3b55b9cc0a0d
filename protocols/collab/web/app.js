// collab demo client: joins a session, edits one shared document with operational
// transformation (one edit in flight, a buffer, incoming ops transformed against pending ones),
// shows participants and their cursors, switches the language and runs JavaScript in a Web
// Worker, sharing the output as `execution-result`.
'use strict';
(() => {
  // Signed identity: a token given in this page's own URL (?token=...) is passed on to the
  // server, and its `sub` (read here for display only; the server verifies it) is who we are.
  const authToken = new URLSearchParams(location.search).get('token');
  const tokenSubject = (() => {
    try { return JSON.parse(atob(authToken.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sub || null; }
    catch { return null; }
  })();
  const withToken = (url) => authToken ? `${url}${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(authToken)}` : url;
  const OT = window.CollabOT;
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $('status'), sessionLabel: $('session-label'), sessionId: $('session-id'), copyLink: $('copy-link'),
    join: $('join'), joinForm: $('join-form'), username: $('username'), sessionInput: $('session-input'),
    createBtn: $('create-btn'), workspace: $('workspace'), language: $('language'), run: $('run'),
    position: $('position'), editor: $('editor'), participants: $('participants'), output: $('output'),
    outputMeta: $('output-meta'), activity: $('activity'), error: $('error'), carets: $('carets'),
  };
  const RUN_TIMEOUT_MS = 3000;
  const CURSOR_THROTTLE_MS = 100;

  let userId = tokenSubject;
  if (!userId) { try { userId = sessionStorage.getItem('collab.userId'); } catch { /* ignore */ } }
  if (!userId) {
    userId = `u-${Math.random().toString(36).slice(2, 10)}`;
    try { sessionStorage.setItem('collab.userId', userId); } catch { /* ignore */ }
  }
  let username = '';
  let sessionId = null;
  let ws = null;
  let joined = false;
  let attempt = 0;
  let retryTimer = null;

  // Document state (the ot.js client algorithm; see docs/protocols/collab.md).
  let text = '';        // our copy, always equal to the editor's value once input is processed
  let version = 0;      // last server version seen
  let inflight = null;  // sent, not acknowledged
  let buffer = null;    // local edits since, composed

  // Counters for debugging (and for the browser test): how often OT actually had work to do.
  const stats = { sent: 0, acks: 0, updates: 0, transformed: 0, composed: 0, resets: 0 };
  window.collabStats = stats;

  const people = new Map(); // userId -> {username, cursor}
  let language = 'javascript';
  let worker = null;

  // ---------- helpers ----------
  function setStatus(kind, msg) { el.status.className = `status status-${kind}`; el.status.textContent = msg; }
  function showError(msg) {
    el.error.textContent = msg;
    clearTimeout(showError.t);
    showError.t = setTimeout(() => { el.error.textContent = ''; }, 8000);
  }
  function logActivity(msg) {
    const li = document.createElement('li');
    li.textContent = `${new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })} ${msg}`;
    el.activity.prepend(li);
    while (el.activity.children.length > 30) el.activity.lastChild.remove();
  }
  function nameOf(id) { const p = people.get(id); return p ? p.username : id; }
  function colorOf(id) {
    let h = 0;
    for (const ch of id) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    return `hsl(${h % 360} 65% 48%)`;
  }
  function send(type, payload) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type, payload }));
  }

  // ---------- connection ----------
  function connect() {
    clearTimeout(retryTimer);
    const socket = new WebSocket(withToken(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/${encodeURIComponent(sessionId)}`));
    ws = socket;
    socket.onopen = () => {
      if (ws !== socket) return;
      attempt = 0;
      socket.send(JSON.stringify({ type: 'join-session', payload: { userId, username } }));
    };
    socket.onmessage = (ev) => {
      if (ws !== socket) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      onFrame(frame.type, frame.payload || {});
    };
    socket.onclose = (ev) => {
      if (ws !== socket) return;
      ws = null;
      joined = false;
      if (!sessionId) return;
      if (ev.code === 1008) { setStatus('offline', 'disconnected'); showError(ev.reason || 'the server closed the connection'); return; }
      const delay = Math.min(10000, 500 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
      attempt += 1;
      setStatus('reconnecting', `reconnecting… (attempt ${attempt})`);
      retryTimer = setTimeout(connect, delay);
    };
  }

  function onFrame(type, p) {
    switch (type) {
      case 'session-state': {
        const first = !joined;
        joined = true;
        setStatus('online', 'connected');
        if (inflight || buffer) showError('Your unsent edits were dropped: the document was reset from the server.');
        resetDocument(p.code || '', p.version || 0);
        people.clear();
        for (const person of p.participants || []) people.set(person.userId, { username: person.username, index: null });
        setLanguage(p.language || 'javascript');
        renderPeople();
        if (first) logActivity(`joined as ${username}`);
        sendCursorNow();
        break;
      }
      case 'participant-joined':
        people.set(p.userId, { username: p.username, index: null });
        renderPeople();
        logActivity(`${p.username} joined`);
        sendCursorNow();
        break;
      case 'participant-left':
        logActivity(`${nameOf(p.userId)} left`);
        people.delete(p.userId);
        renderPeople();
        break;
      case 'code-ack': onAck(p.version); break;
      case 'code-update': onRemoteOp(p); break;
      case 'cursor-update': {
        const person = people.get(p.userId);
        if (person && p.cursor && typeof p.cursor === 'object' && Number.isFinite(p.cursor.line) && Number.isFinite(p.cursor.column)) {
          person.index = indexOfLineCol(p.cursor);
          renderPeople();
        }
        break;
      }
      case 'language-updated':
        setLanguage(p.language);
        if (p.userId !== userId) logActivity(`${nameOf(p.userId)} switched the language to ${p.language}`);
        break;
      case 'execute-code':
        el.outputMeta.textContent = `${nameOf(p.userId)} is running the code…`;
        logActivity(`${nameOf(p.userId)} ran the code`);
        break;
      case 'execution-result':
        showOutput(p, `Run by ${nameOf(p.userId)}`);
        break;
      case 'error':
        showError(p.message || 'error');
        break;
      default:
        break;
    }
  }

  // ---------- editing (OT client) ----------
  function resetDocument(code, v) {
    const [s, e] = selectionCp();
    text = code; version = v; inflight = null; buffer = null;
    stats.resets += 1;
    el.editor.value = code;
    const len = OT.cpLen(code);
    setSelectionCp(Math.min(s, len), Math.min(e, len));
  }

  function selectionCp() {
    const v = el.editor.value;
    return [OT.toCp(v, el.editor.selectionStart), OT.toCp(v, el.editor.selectionEnd)];
  }
  function setSelectionCp(s, e) {
    const dir = el.editor.selectionDirection;
    el.editor.setSelectionRange(OT.toU16(text, s), OT.toU16(text, e), dir);
  }

  function sendInflight() {
    stats.sent += 1;
    send('code-change', { changes: { baseVersion: version, ops: inflight } });
  }

  // Turns whatever the user changed since the last call into an operation.
  function processLocal() {
    const now = el.editor.value;
    if (now === text) return;
    const op = OT.diff(text, now);
    text = now;
    moveCursors(op);
    if (!joined) return;
    if (!inflight) { inflight = op; sendInflight(); }
    else if (buffer) { buffer = OT.compose(buffer, op); stats.composed += 1; }
    else buffer = op;
  }

  function onAck(v) {
    stats.acks += 1;
    version = v;
    inflight = buffer;
    buffer = null;
    if (inflight) sendInflight();
  }

  function onRemoteOp(p) {
    processLocal();
    try {
      const expected = inflight ? OT.baseLen(inflight) : buffer ? OT.baseLen(buffer) : OT.cpLen(text);
      let op = OT.normalize(p.ops || [], expected);
      stats.updates += 1;
      if (inflight || buffer) stats.transformed += 1;
      if (inflight) [inflight, op] = OT.transform(inflight, op);
      if (buffer) [buffer, op] = OT.transform(buffer, op);
      const [s, e] = selectionCp();
      const { scrollTop, scrollLeft } = el.editor;
      text = OT.apply(text, op);
      version = p.version;
      moveCursors(op);
      el.editor.value = text;
      setSelectionCp(OT.transformIndex(s, op), OT.transformIndex(e, op));
      el.editor.scrollTop = scrollTop; el.editor.scrollLeft = scrollLeft;
      if (!inflight && !buffer && typeof p.code === 'string' && p.code !== text) {
        // Should not happen; converge on the server's text rather than drift.
        resetDocument(p.code, p.version);
      }
    } catch (err) {
      showError(`Could not merge an edit (${err.message}); reloaded the document.`);
      if (typeof p.code === 'string') resetDocument(p.code, p.version);
    }
    scheduleCursor();
  }

  // ---------- cursors ----------
  let cursorTimer = null;
  let lastCursorSent = 0;
  let lastCursorKey = '';
  function caretPosition() {
    const v = el.editor.value;
    const at = el.editor.selectionDirection === 'backward' ? el.editor.selectionStart : el.editor.selectionEnd;
    const before = v.slice(0, at);
    const nl = before.lastIndexOf('\n');
    const line = before.split('\n').length;
    const column = OT.cpLen(before.slice(nl + 1)) + 1;
    return { line, column };
  }
  function sendCursorNow() {
    clearTimeout(cursorTimer);
    cursorTimer = null;
    const cursor = caretPosition();
    el.position.textContent = `Ln ${cursor.line}, Col ${cursor.column}`;
    const key = `${cursor.line}:${cursor.column}`;
    if (!joined) return;
    const self = el.participants.querySelector(`li[data-user-id="${CSS.escape(userId)}"] .cursor`);
    if (self) self.textContent = `Ln ${cursor.line}, Col ${cursor.column}`;
    lastCursorSent = Date.now();
    lastCursorKey = key;
    send('cursor-move', { cursor });
  }
  function scheduleCursor() {
    const cursor = caretPosition();
    el.position.textContent = `Ln ${cursor.line}, Col ${cursor.column}`;
    if (`${cursor.line}:${cursor.column}` === lastCursorKey || cursorTimer) return;
    const wait = Math.max(0, CURSOR_THROTTLE_MS - (Date.now() - lastCursorSent));
    cursorTimer = setTimeout(sendCursorNow, wait);
  }

  function renderPeople() {
    el.participants.textContent = '';
    for (const [id, person] of people) {
      const li = document.createElement('li');
      li.dataset.userId = id;
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = colorOf(id);
      swatch.setAttribute('aria-hidden', 'true');
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = id === userId ? `${person.username} (you)` : person.username;
      const cur = document.createElement('span');
      cur.className = 'cursor';
      const c = id === userId ? caretPosition() : person.index === null ? null : lineColOf(person.index);
      cur.textContent = c && Number.isFinite(c.line) ? `Ln ${c.line}, Col ${c.column}` : '—';
      cur.setAttribute('aria-label', c && Number.isFinite(c.line) ? `cursor at line ${c.line}, column ${c.column}` : 'no cursor yet');
      li.append(swatch, who, cur);
      el.participants.append(li);
    }
    drawCarets();
  }

  // Other participants' carets: kept as code-point indexes into our text, moved through every
  // operation applied here until their next cursor-update, and drawn over the textarea.
  function indexOfLineCol(cursor) {
    const lines = text.split('\n');
    const line = Math.min(Math.max(1, Math.trunc(cursor.line)), lines.length);
    let index = 0;
    for (let i = 0; i < line - 1; i++) index += OT.cpLen(lines[i]) + 1;
    return index + Math.min(Math.max(1, Math.trunc(cursor.column)), OT.cpLen(lines[line - 1]) + 1) - 1;
  }
  function lineColOf(index) {
    const before = text.slice(0, OT.toU16(text, index));
    return { line: before.split('\n').length, column: OT.cpLen(before.slice(before.lastIndexOf('\n') + 1)) + 1 };
  }
  function moveCursors(op) {
    let moved = false;
    for (const [id, person] of people) {
      if (id === userId || person.index === null) continue;
      person.index = OT.transformIndex(person.index, op);
      moved = true;
    }
    if (moved) renderPeople();
  }

  let mirror = null;
  function drawCarets() {
    const box = el.carets;
    box.textContent = '';
    if (!joined || el.workspace.hidden) return;
    if (!mirror) {
      mirror = document.createElement('div');
      mirror.className = 'mirror';
      mirror.setAttribute('aria-hidden', 'true');
      box.parentElement.append(mirror);
    }
    const cs = getComputedStyle(el.editor);
    for (const prop of ['font', 'padding', 'tabSize', 'letterSpacing', 'lineHeight', 'boxSizing']) mirror.style[prop] = cs[prop];
    mirror.style.width = `${el.editor.clientWidth}px`;
    const lineHeight = parseFloat(cs.lineHeight) || 20;
    for (const [id, person] of people) {
      if (id === userId || person.index === null) continue;
      mirror.textContent = text.slice(0, OT.toU16(text, person.index));
      const mark = document.createElement('span');
      mark.textContent = '\u200b';
      mirror.append(mark);
      const x = mark.offsetLeft - el.editor.scrollLeft;
      const y = mark.offsetTop - el.editor.scrollTop;
      const caret = document.createElement('div');
      caret.className = `caret${y < lineHeight ? ' below' : ''}`;
      caret.dataset.userId = id;
      caret.style.background = colorOf(id);
      caret.style.height = `${lineHeight}px`;
      caret.style.transform = `translate(${x}px, ${y}px)`;
      const label = document.createElement('span');
      label.className = 'caret-label';
      label.style.background = colorOf(id);
      label.textContent = person.username;
      caret.append(label);
      box.append(caret);
    }
  }

  // ---------- language ----------
  function setLanguage(lang) {
    if (typeof lang !== 'string' || !lang) return;
    language = lang;
    if (![...el.language.options].some((o) => o.value === lang)) el.language.add(new Option(lang, lang));
    el.language.value = lang;
    el.run.title = lang === 'javascript' ? 'Run in a Web Worker' : 'Only JavaScript runs in the browser';
  }

  // ---------- running code ----------
  function showOutput(result, who) {
    el.output.textContent = '';
    if (result.output) el.output.append(document.createTextNode(result.output));
    if (result.error) {
      const span = document.createElement('span');
      span.className = 'err';
      span.textContent = `${result.output && !result.output.endsWith('\n') ? '\n' : ''}${result.error}`;
      el.output.append(span);
    }
    if (!result.output && !result.error) el.output.textContent = '(no output)';
    const ms = Number.isFinite(result.durationMs) ? ` · ${result.durationMs} ms` : '';
    el.outputMeta.textContent = `${who}${result.language ? ` · ${result.language}` : ''}${ms}`;
  }

  function runInWorker(code) {
    return new Promise((resolve) => {
      const started = performance.now();
      const lines = [];
      let settled = false;
      const w = new Worker('runner.js');
      worker = w;
      const finish = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        w.terminate();
        if (worker === w) worker = null;
        resolve({ output: lines.join('\n'), error: error || null, durationMs: Math.round(performance.now() - started) });
      };
      const timer = setTimeout(() => finish(`Timed out after ${RUN_TIMEOUT_MS / 1000} s: the worker was stopped (infinite loop?)`), RUN_TIMEOUT_MS);
      w.onmessage = (ev) => {
        const m = ev.data;
        if (m.kind === 'line') lines.push(m.stream === 'err' ? `[error] ${m.line}` : m.line);
        else if (m.kind === 'done') finish(m.error);
      };
      w.onerror = (ev) => { ev.preventDefault(); finish(ev.message || 'the worker failed'); };
      w.postMessage({ code });
    });
  }

  async function run() {
    if (!joined || el.run.disabled) return;
    processLocal();
    const code = text;
    el.run.disabled = true;
    el.outputMeta.textContent = 'Running…';
    el.output.textContent = '';
    send('execute-code', { language, code });
    let result;
    if (language === 'javascript') result = await runInWorker(code);
    else result = { output: '', error: `Running ${language} is not supported here: this demo runs only JavaScript, in your browser.`, durationMs: 0 };
    result.language = language;
    showOutput(result, 'Run by you');
    send('execution-result', result);
    el.run.disabled = false;
  }

  // ---------- joining ----------
  function parseSessionId(value) {
    let v = value.trim();
    const hash = v.indexOf('#');
    if (hash >= 0) v = v.slice(hash + 1);
    else if (v.includes('/')) v = v.slice(v.lastIndexOf('/') + 1);
    return /^[A-Za-z0-9_-]{1,64}$/.test(v) ? v : null;
  }

  function start(id) {
    sessionId = id;
    if (location.hash.slice(1) !== id) history.replaceState(null, '', `#${id}`);
    el.join.hidden = true;
    el.workspace.hidden = false;
    el.sessionLabel.hidden = false;
    el.copyLink.hidden = false;
    el.sessionId.textContent = id;
    document.title = `${id.slice(0, 8)} · collab`;
    setStatus('reconnecting', 'connecting…');
    connect();
    el.editor.focus();
  }

  function rememberName() {
    username = el.username.value.trim();
    try { localStorage.setItem('collab.username', username); } catch { /* ignore */ }
    return username.length > 0;
  }

  el.joinForm.addEventListener('submit', (e) => {
    e.preventDefault();
    if (!rememberName()) { el.username.focus(); return; }
    const id = parseSessionId(el.sessionInput.value);
    if (!id) { showError('Enter a session id (letters, digits, - or _), or press “New session”.'); el.sessionInput.focus(); return; }
    start(id);
  });
  el.createBtn.addEventListener('click', async () => {
    if (!rememberName()) { el.username.reportValidity(); el.username.focus(); return; }
    el.createBtn.disabled = true;
    try {
      const res = await fetch('/api/sessions', { method: 'POST', headers: { 'content-type': 'application/json', ...(authToken ? { authorization: `Bearer ${authToken}` } : {}) }, body: JSON.stringify({ language: 'javascript', code: "// Welcome! Edit together, then press Run.\nconsole.log('hello from ' + 'collab');\n" }) });
      const body = await res.json();
      if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
      start(body.sessionId);
    } catch (err) {
      showError(`Could not create a session: ${err.message}`);
    } finally {
      el.createBtn.disabled = false;
    }
  });
  el.copyLink.addEventListener('click', async () => {
    try { await navigator.clipboard.writeText(location.href); el.copyLink.textContent = 'link copied'; }
    catch { el.copyLink.textContent = location.href; }
    setTimeout(() => { el.copyLink.textContent = 'copy invite link'; }, 2500);
  });
  el.editor.addEventListener('input', () => { processLocal(); scheduleCursor(); });
  el.editor.addEventListener('scroll', drawCarets);
  window.addEventListener('resize', drawCarets);
  for (const evt of ['keyup', 'mouseup', 'focus', 'select']) el.editor.addEventListener(evt, scheduleCursor);
  document.addEventListener('selectionchange', () => { if (document.activeElement === el.editor) scheduleCursor(); });
  el.editor.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') { e.preventDefault(); run(); }
  });
  el.language.addEventListener('change', () => send('language-change', { language: el.language.value }));
  el.run.addEventListener('click', run);
  window.addEventListener('hashchange', () => {
    const id = parseSessionId(location.hash);
    if (id && id !== sessionId && sessionId) location.reload();
  });
  window.addEventListener('pagehide', () => send('leave-session', {}));

  try { el.username.value = localStorage.getItem('collab.username') || ''; } catch { /* ignore */ }
  const fromHash = parseSessionId(location.hash);
  if (fromHash) el.sessionInput.value = fromHash;
  (el.username.value ? (fromHash ? $('join-btn') : el.createBtn) : el.username).focus();
})();
