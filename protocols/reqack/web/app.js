// reqack demo client: requests with responses, acknowledged and de-duplicated events,
// delivered/read receipts, edit/delete, history, typing, presence and automatic reconnect.
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
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $('status'), redelivered: $('redelivered'), me: $('me'), switchUser: $('switch-user'),
    login: $('login'), loginForm: $('login-form'), userId: $('user-id'), app: $('app'),
    newChatForm: $('new-chat-form'), newChat: $('new-chat'), convs: $('conversations'),
    noConvs: $('no-convs'), chatTitle: $('chat-title'), chatMeta: $('chat-meta'), back: $('back'),
    messages: $('messages'), typing: $('typing'), composer: $('composer'), text: $('text'),
    send: $('send'), editing: $('editing'), cancelEdit: $('cancel-edit'), error: $('error'),
  };
  const RECEIPTS = { sent: 0, delivered: 1, read: 2 };

  let me = null;          // my user id
  if (tokenSubject) el.userId.value = tokenSubject;
  let ws = null;
  let connected = false;
  let everConnected = false;
  let attempt = 0;        // reconnect attempts since the last successful open
  let retryTimer = null;
  let reqSeq = 0;
  const outstanding = new Map();   // request id -> {frame, resolve, reject}
  const seenEvents = new Set();    // event ids already processed (at-least-once -> exactly-once)
  let redelivered = 0;             // events that arrived again since the last reconnect
  let reconnects = 0;
  const convs = new Map();         // peer id -> {messages: Map(messageId -> msg), historyLoaded, unread}
  const online = new Set();
  const readSent = new Set();      // message ids we already sent `read` for
  const earlyReceipts = new Map(); // receipts that arrived before the response to our `new`
  let current = null;              // open conversation (peer id)
  let editingId = null;
  let typingTimer = null;
  let lastTypingSent = 0;

  // ---------- connection ----------
  function setStatus(kind, text) {
    el.status.className = `status status-${kind}`;
    el.status.textContent = text;
  }

  function connect() {
    clearTimeout(retryTimer);
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws?userId=${encodeURIComponent(me)}`;
    const socket = new WebSocket(withToken(url));
    ws = socket;
    socket.onopen = () => {
      if (ws !== socket) return;
      connected = true;
      if (everConnected) {
        reconnects += 1;
        redelivered = 0;
        showRedelivered();
      }
      everConnected = true;
      attempt = 0;
      online.clear();
      setStatus('online', 'connected');
      // Requests that never got a response are sent again with the same id: the server answers
      // a retry from its idempotency cache and runs nothing twice.
      for (const { frame } of outstanding.values()) socket.send(frame);
      if (current) loadHistory(current);
      renderConvs();
    };
    socket.onmessage = (ev) => {
      if (ws !== socket) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      onFrame(frame);
    };
    socket.onclose = () => {
      if (ws !== socket) return;
      connected = false;
      ws = null;
      online.clear();
      renderConvs();
      renderMeta();
      if (!me) { setStatus('offline', 'offline'); return; }
      // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 10 s.
      const delay = Math.min(10000, 500 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
      attempt += 1;
      setStatus('reconnecting', `reconnecting… (attempt ${attempt})`);
      retryTimer = setTimeout(connect, delay);
    };
  }

  function disconnect() {
    clearTimeout(retryTimer);
    const socket = ws;
    ws = null;
    connected = false;
    if (socket) socket.close(1000);
    setStatus('offline', 'offline');
  }

  function send(obj) {
    if (ws && connected) ws.send(JSON.stringify(obj));
  }

  function request(payloadType, payload) {
    reqSeq += 1;
    const id = `${me}-${Date.now().toString(36)}-${reqSeq}`;
    const frame = JSON.stringify({ type: 'request', timestamp: Date.now(), id, payloadType, payload });
    return new Promise((resolve, reject) => {
      outstanding.set(id, { frame, resolve, reject });
      if (ws && connected) ws.send(frame);
    });
  }

  function showError(message) {
    el.error.textContent = message;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(() => { el.error.textContent = ''; }, 6000);
  }

  function showRedelivered() {
    if (!reconnects) { el.redelivered.hidden = true; return; }
    el.redelivered.hidden = false;
    el.redelivered.textContent = `reconnected · redelivered ${redelivered} event${redelivered === 1 ? '' : 's'}`;
  }

  // ---------- frames ----------
  function onFrame(frame) {
    if (frame.type === 'response') {
      const pending = outstanding.get(frame.id);
      if (!pending) return;
      outstanding.delete(frame.id);
      const err = frame.payload && frame.payload.error;
      if (err) pending.reject(new Error(`${err.code}: ${err.message}`));
      else pending.resolve(frame.payload);
    } else if (frame.type === 'event') {
      // Ack every event, duplicates included (the first ack may have been lost).
      send({ type: 'ack', id: String(frame.id) });
      if (seenEvents.has(frame.id)) {
        redelivered += 1;
        showRedelivered();
        return;
      }
      seenEvents.add(frame.id);
      onEvent(frame.eventType, frame.payload || {}, frame.timestamp);
    } else if (frame.type === 'error') {
      const p = frame.payload || {};
      showError(`${p.code || 'ERROR'}: ${p.message || ''}`);
    }
  }

  function onEvent(type, p, timestamp) {
    switch (type) {
      case 'new': {
        const conv = conversation(p.from);
        upsert(p.from, { messageId: p.messageId, from: p.from, to: me, text: p.message,
          timestamp: p.timestamp || timestamp, receipt: 'sent', edited: false });
        request('dlvrd', { messageId: p.messageId }).catch(ignoreGone);
        if (p.from === current && document.visibilityState !== 'hidden') markRead(p.messageId);
        else { conv.unread += 1; renderConvs(); }
        clearTyping(p.from);
        break;
      }
      case 'edit': {
        const msg = find(p.chatId, p.messageId);
        if (msg) { msg.text = p.message; msg.edited = true; renderMessages(); }
        break;
      }
      case 'delete': {
        const msg = find(p.chatId, p.messageId);
        if (msg) { msg.deleted = true; renderMessages(); }
        break;
      }
      case 'dlvrd':
      case 'read': {
        const receipt = type === 'read' ? 'read' : 'delivered';
        const msg = find(p.chatId, p.messageId);
        if (msg) { advance(msg, receipt); renderMessages(); }
        else earlyReceipts.set(p.messageId, receipt); // the response to `new` is still on its way
        break;
      }
      case 'typing':
        showTyping(p.chatId);
        break;
      case 'online':
        if (p.userId !== me) { online.add(p.userId); renderConvs(); renderMeta(); }
        break;
      case 'offline':
        online.delete(p.userId); renderConvs(); renderMeta();
        break;
      case 'call': {
        conversation(p.from);
        upsert(p.from, { messageId: p.messageId, from: p.from, to: me, call: true,
          text: `${p.callType} call (${p.status || p.direction})`, timestamp: p.timestamp, receipt: 'sent' });
        break;
      }
      default:
        break; // newCall / closeCall: acked, not shown by this demo
    }
  }

  function ignoreGone(error) {
    if (!/NOT_FOUND/.test(error.message)) showError(error.message);
  }

  // ---------- model ----------
  function conversation(peer) {
    let conv = convs.get(peer);
    if (!conv) {
      conv = { messages: new Map(), historyLoaded: false, unread: 0 };
      convs.set(peer, conv);
      saveContacts();
      renderConvs();
    }
    return conv;
  }

  function find(peer, messageId) {
    const conv = convs.get(peer);
    return conv ? conv.messages.get(messageId) : undefined;
  }

  function advance(msg, receipt) {
    if (RECEIPTS[receipt] > RECEIPTS[msg.receipt || 'sent']) msg.receipt = receipt;
  }

  function upsert(peer, msg) {
    const conv = conversation(peer);
    const old = conv.messages.get(msg.messageId);
    if (old) {
      advance(old, msg.receipt);
      Object.assign(old, { text: msg.text, edited: msg.edited || old.edited });
    } else {
      conv.messages.set(msg.messageId, msg);
    }
    if (peer === current) renderMessages();
  }

  function markRead(messageId) {
    if (readSent.has(messageId)) return;
    readSent.add(messageId);
    request('read', { messageId }).catch((e) => { readSent.delete(messageId); ignoreGone(e); });
  }

  function markConversationRead(peer) {
    const conv = convs.get(peer);
    if (!conv) return;
    for (const msg of conv.messages.values()) {
      if (msg.from === peer && !msg.deleted && msg.receipt !== 'read' && typeof msg.messageId === 'number') {
        markRead(msg.messageId);
      }
    }
    conv.unread = 0;
    renderConvs();
  }

  async function loadHistory(peer) {
    try {
      const res = await request('history', { chatId: peer, limit: 100 });
      const conv = conversation(peer);
      for (const item of res.messages || []) {
        const text = item.kind === 'call' ? `${item.callType} call (${item.status || item.direction})` : item.message;
        const existing = conv.messages.get(item.messageId);
        if (existing) {
          advance(existing, item.receipt);
          if (!existing.deleted) { existing.text = text; existing.edited = !!item.edited; }
        } else {
          conv.messages.set(item.messageId, { messageId: item.messageId, from: item.from, to: item.to,
            text, timestamp: item.timestamp, receipt: item.receipt, edited: !!item.edited, call: item.kind === 'call' });
        }
      }
      conv.historyLoaded = true;
      if (peer === current) { renderMessages(); markConversationRead(peer); }
    } catch (e) {
      showError(e.message);
    }
  }

  function contactsKey() { return `reqack.contacts.${me}`; }
  function saveContacts() {
    try { localStorage.setItem(contactsKey(), JSON.stringify([...convs.keys()])); } catch { /* private mode */ }
  }
  function loadContacts() {
    try {
      for (const peer of JSON.parse(localStorage.getItem(contactsKey()) || '[]')) {
        if (typeof peer === 'string' && !convs.has(peer)) convs.set(peer, { messages: new Map(), historyLoaded: false, unread: 0 });
      }
    } catch { /* ignore */ }
  }

  // ---------- typing ----------
  function showTyping(peer) {
    conversation(peer);
    if (peer !== current) return;
    el.typing.textContent = `${peer} is typing…`;
    clearTimeout(typingTimer);
    typingTimer = setTimeout(() => { el.typing.textContent = ''; }, 3000);
  }
  function clearTyping(peer) {
    if (peer === current) { clearTimeout(typingTimer); el.typing.textContent = ''; }
  }

  // ---------- rendering ----------
  function renderConvs() {
    el.convs.textContent = '';
    el.noConvs.hidden = convs.size > 0;
    for (const [peer, conv] of convs) {
      const li = document.createElement('li');
      const btn = document.createElement('button');
      btn.type = 'button';
      btn.dataset.peer = peer;
      if (peer === current) btn.setAttribute('aria-current', 'true');
      const dot = document.createElement('span');
      dot.className = `dot${online.has(peer) ? ' on' : ''}`;
      dot.setAttribute('aria-hidden', 'true');
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = peer;
      btn.append(dot, name);
      let label = `${peer}, ${online.has(peer) ? 'online' : 'offline'}`;
      if (conv.unread > 0) {
        const badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = String(conv.unread);
        btn.append(badge);
        label += `, ${conv.unread} unread`;
      }
      btn.setAttribute('aria-label', label);
      btn.addEventListener('click', () => openConversation(peer));
      li.append(btn);
      el.convs.append(li);
    }
  }

  function renderMeta() {
    if (!current) { el.chatMeta.textContent = ''; return; }
    el.chatMeta.textContent = online.has(current) ? 'online' : 'offline';
  }

  function tickFor(msg) {
    if (typeof msg.messageId !== 'number') return ['…', 'sending', ''];
    if (msg.receipt === 'read') return ['✓✓', 'read', 'read'];
    if (msg.receipt === 'delivered') return ['✓✓', 'delivered', 'delivered'];
    return ['✓', 'sent', 'sent'];
  }

  // Updates the list in place (keyed by message id) so that the live region announces only
  // new messages, not the whole conversation again on every change.
  const rendered = new Map(); // key -> {li, sig}
  function renderMessages() {
    const list = el.messages;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const conv = current && convs.get(current);
    if (list.dataset.peer !== (current || '')) { list.textContent = ''; rendered.clear(); }
    const placeholder = list.querySelector('.empty');
    if (placeholder) placeholder.remove();
    if (!conv) return;
    const msgs = [...conv.messages.values()].sort((a, b) => order(a) - order(b));
    if (msgs.length === 0) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = conv.historyLoaded ? 'No messages yet. Say hi!' : 'Loading…';
      list.append(li);
    }
    const keep = new Set();
    msgs.forEach((msg, i) => {
      const key = msg.key || (msg.key = `m${Math.random().toString(36).slice(2)}`);
      keep.add(key);
      const sig = JSON.stringify([msg.messageId, msg.text, msg.edited, msg.deleted, msg.receipt]);
      let entry = rendered.get(key);
      if (!entry) { entry = { li: document.createElement('li'), sig: '' }; rendered.set(key, entry); }
      if (entry.sig !== sig) { fillMessage(entry.li, msg); entry.sig = sig; }
      if (list.children[i] !== entry.li) list.insertBefore(entry.li, list.children[i] || null);
    });
    for (const [key, entry] of rendered) if (!keep.has(key)) { entry.li.remove(); rendered.delete(key); }
    if (atBottom || list.dataset.peer !== current) list.scrollTop = list.scrollHeight;
    list.dataset.peer = current || '';
  }

  function fillMessage(li, msg) {
    const mine = msg.from === me;
    li.textContent = '';
    li.className = `msg${mine ? ' mine' : ''}${msg.deleted ? ' deleted' : ''}`;
    if (typeof msg.messageId === 'number') li.dataset.messageId = String(msg.messageId);
    const text = document.createElement('div');
    text.className = 'text';
    text.textContent = msg.deleted ? (mine ? 'You deleted this message' : 'This message was deleted') : msg.text;
    const info = document.createElement('div');
    info.className = 'info';
    const time = document.createElement('time');
    const date = new Date(msg.timestamp || Date.now());
    time.dateTime = date.toISOString();
    time.textContent = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    info.append(time);
    if (msg.edited && !msg.deleted) {
      const e = document.createElement('span');
      e.className = 'edited';
      e.textContent = 'edited';
      info.append(e);
    }
    if (mine && !msg.deleted) {
      if (!msg.call && typeof msg.messageId === 'number') {
        const actions = document.createElement('span');
        actions.className = 'actions';
        const edit = document.createElement('button');
        edit.type = 'button'; edit.className = 'link edit'; edit.textContent = 'edit';
        edit.setAttribute('aria-label', `Edit message: ${msg.text}`);
        edit.addEventListener('click', () => startEdit(msg));
        const del = document.createElement('button');
        del.type = 'button'; del.className = 'link delete'; del.textContent = 'delete';
        del.setAttribute('aria-label', `Delete message: ${msg.text}`);
        del.addEventListener('click', () => deleteMessage(msg));
        actions.append(edit, del);
        info.append(actions);
      }
      const [symbol, label, cls] = tickFor(msg);
      const tick = document.createElement('span');
      tick.className = `tick ${cls}`;
      tick.dataset.receipt = label;
      tick.title = label;
      tick.setAttribute('aria-label', label);
      tick.textContent = symbol;
      info.append(tick);
    }
    li.append(text, info);
  }

  function order(msg) { return typeof msg.messageId === 'number' ? msg.messageId : Number.MAX_SAFE_INTEGER - 1e6 + msg.seq; }

  // ---------- actions ----------
  function openConversation(peer) {
    peer = peer.trim();
    if (!peer) return;
    current = peer;
    cancelEdit();
    conversation(peer);
    el.chatTitle.textContent = peer;
    el.composer.hidden = false;
    el.app.classList.add('in-chat');
    el.typing.textContent = '';
    renderConvs();
    renderMeta();
    renderMessages();
    markConversationRead(peer);
    loadHistory(peer);
    el.text.focus();
  }

  let localSeq = 0;
  async function sendMessage(text) {
    const peer = current;
    localSeq += 1;
    const clientMessageId = `${me}-c${Date.now().toString(36)}-${localSeq}`;
    const key = `local:${clientMessageId}`;
    const msg = { messageId: key, key, seq: localSeq, from: me, to: peer, text, timestamp: Date.now(), receipt: 'sent' };
    conversation(peer).messages.set(key, msg);
    renderMessages();
    try {
      const res = await request('new', { chatId: peer, message: text, clientMessageId });
      const conv = conversation(peer);
      conv.messages.delete(key);
      // A receipt may already have arrived for this id (events and responses race).
      const existing = conv.messages.get(res.messageId);
      msg.messageId = res.messageId;
      if (existing) advance(msg, existing.receipt);
      if (earlyReceipts.has(res.messageId)) { advance(msg, earlyReceipts.get(res.messageId)); earlyReceipts.delete(res.messageId); }
      conv.messages.set(res.messageId, msg);
      if (peer === current) renderMessages();
    } catch (e) {
      conversation(peer).messages.delete(key);
      renderMessages();
      showError(e.message);
    }
  }

  function startEdit(msg) {
    editingId = msg.messageId;
    el.editing.hidden = false;
    el.send.textContent = 'Save';
    el.text.value = msg.text;
    el.text.focus();
  }
  function cancelEdit() {
    editingId = null;
    el.editing.hidden = true;
    el.send.textContent = 'Send';
    el.text.value = '';
  }

  async function saveEdit(messageId, text) {
    const msg = find(current, messageId);
    try {
      await request('edit', { messageId, message: text });
      if (msg) { msg.text = text; msg.edited = true; renderMessages(); }
    } catch (e) { showError(e.message); }
  }

  async function deleteMessage(msg) {
    try {
      await request('delete', { messageId: msg.messageId });
      msg.deleted = true;
      if (editingId === msg.messageId) cancelEdit();
      renderMessages();
    } catch (e) { showError(e.message); }
  }

  // ---------- wiring ----------
  function login(userId) {
    me = userId;
    try { localStorage.setItem('reqack.userId', me); } catch { /* ignore */ }
    el.login.hidden = true;
    el.app.hidden = false;
    el.me.hidden = false;
    el.me.textContent = `signed in as ${me}`;
    el.switchUser.hidden = false;
    document.title = `${me} · reqack messenger`;
    loadContacts();
    renderConvs();
    setStatus('reconnecting', 'connecting…');
    connect();
    el.newChat.focus();
  }

  el.loginForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const id = el.userId.value.trim();
    if (id) login(id);
  });
  el.switchUser.addEventListener('click', () => {
    disconnect();
    me = null; current = null;
    convs.clear(); online.clear(); seenEvents.clear(); readSent.clear(); outstanding.clear();
    reconnects = 0; everConnected = false; showRedelivered();
    el.app.hidden = true; el.login.hidden = false; el.me.hidden = true; el.switchUser.hidden = true;
    el.composer.hidden = true; el.chatTitle.textContent = 'Pick a conversation';
    el.userId.focus();
  });
  el.newChatForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const peer = el.newChat.value.trim();
    if (!peer) return;
    el.newChat.value = '';
    openConversation(peer);
  });
  el.back.addEventListener('click', () => {
    el.app.classList.remove('in-chat');
    current = null;
    renderConvs();
  });
  el.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = el.text.value;
    if (!text.trim() || !current) return;
    if (editingId !== null) saveEdit(editingId, text);
    else sendMessage(text);
    cancelEdit();
    el.text.focus();
  });
  el.cancelEdit.addEventListener('click', () => { cancelEdit(); el.text.focus(); });
  el.text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); el.composer.requestSubmit(); }
    else if (e.key === 'Escape' && editingId !== null) cancelEdit();
  });
  el.text.addEventListener('input', () => {
    if (!current || editingId !== null) return;
    const now = Date.now();
    if (now - lastTypingSent > 2000) {
      lastTypingSent = now;
      send({ type: 'event', eventType: 'typing', payload: { chatId: current } });
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && current) markConversationRead(current);
  });
  window.addEventListener('online', () => { if (me && !ws) { attempt = 0; connect(); } });

  let saved = null;
  try { saved = localStorage.getItem('reqack.userId'); } catch { /* ignore */ }
  if (saved) el.userId.value = saved;
  el.userId.focus();
})();
