// fastchat demo client: plain JS, no build step. Wire format: docs/protocols/fastchat.md.
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
  const PING_EVERY_MS = 15000;
  const TYPING_IDLE_MS = 2500;
  const $ = (id) => document.getElementById(id);
  const el = {
    join: $('join'), joinForm: $('join-form'), name: $('name'), app: $('app'), meName: $('me-name'),
    rename: $('rename'), status: $('status'), people: $('people'), nobody: $('nobody'),
    chatTitle: $('chat-title'), peerState: $('peer-state'), messages: $('messages'), pick: $('pick'),
    typing: $('typing'), composer: $('composer'), text: $('text'), send: $('send'), back: $('back'),
    error: $('error'),
  };

  // A UUID v4; crypto.randomUUID needs a secure context (https or localhost), so fall back.
  function uuid4() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  let userId = tokenSubject || localStorage.getItem('fastchat.userId');
  if (!userId) { userId = uuid4(); localStorage.setItem('fastchat.userId', userId); }
  userId = userId.toLowerCase();
  let displayName = localStorage.getItem('fastchat.name') || '';

  let ws = null, attempt = 0, reconnectTimer = null, pingTimer = null, errorTimer = null, identified = false;
  let users = []; // from PRESENCE (full list, then deltas): [{user_id, display_name, online}]
  const chats = new Map(); // partner id -> { chatId, messages: [], unread, typing }
  const sentIndex = new Map(); // message_id -> message object (ours)
  let active = null; // partner id of the open chat
  let typingSent = false, typingTimer = null;

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { el.error.hidden = true; }, 7000);
  }
  function setStatus(state, label) { el.status.dataset.state = state; el.status.textContent = label; }
  function send(type, data = {}) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify({ type, data }));
    return true;
  }
  function nameOf(id) { return users.find((u) => u.user_id === id)?.display_name ?? 'someone'; }
  function isOnline(id) { return !!users.find((u) => u.user_id === id)?.online; }

  // ---- connection ---------------------------------------------------------------------------
  function connect() {
    clearTimeout(reconnectTimer);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    ws = new WebSocket(withToken(`${scheme}://${location.host}/ws`));
    setStatus('connecting', attempt ? 'Reconnecting…' : 'Connecting…');
    ws.addEventListener('open', () => {
      send('HELLO', { user_id: userId, display_name: displayName });
      clearInterval(pingTimer);
      pingTimer = setInterval(() => send('PING'), PING_EVERY_MS);
    });
    ws.addEventListener('message', (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      handle(frame.type, frame.data || {});
    });
    ws.addEventListener('close', () => {
      ws = null; identified = false; typingSent = false;
      clearInterval(pingTimer);
      updateComposer();
      // Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... capped at 15 s.
      const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt += 1;
      setStatus('closed', `Offline, retrying in ${Math.ceil(delay / 1000)} s`);
      reconnectTimer = setTimeout(connect, delay);
    });
  }

  function handle(type, data) {
    switch (type) {
      case 'HELLO_ACK':
        identified = true; attempt = 0;
        setStatus('open', 'Online');
        el.join.hidden = true; el.app.hidden = false; el.rename.hidden = false;
        el.meName.textContent = displayName;
        // Messages that never got their "sent" tick are retried with the same id (idempotent).
        for (const m of sentIndex.values()) if (m.status === 'pending') send('MSG', { to: m.to, content: m.content, message_id: m.message_id });
        updateComposer();
        break;
      case 'PRESENCE': {
        const listed = (data.users || []).map((u) => ({ ...u, user_id: u.user_id.toLowerCase() }));
        if (data.delta) {
          // A delta: only the users that changed, in their current state (upsert by id; a
          // `removed` user was forgotten by the server). The full list comes after each HELLO.
          for (const u of listed) {
            const at = users.findIndex((x) => x.user_id === u.user_id);
            if (u.removed) { if (at !== -1) users.splice(at, 1); } else if (at === -1) users.push(u); else users[at] = u;
          }
        } else {
          users = listed;
        }
        renderPeople(); renderHead();
        break;
      }
      case 'CHAT_OPENED': {
        const chat = chatWith(data.target_user_id);
        chat.chatId = data.chat_id;
        if (data.target_display_name && !users.some((u) => u.user_id === data.target_user_id)) {
          users.push({ user_id: data.target_user_id, display_name: data.target_display_name, online: true });
        }
        if (chat.opening) { chat.opening = false; show(data.target_user_id); }
        chat.reopening = false;
        for (const m of (chat.resend || []).splice(0)) send('MSG', { to: m.to, content: m.content, message_id: m.message_id });
        renderPeople();
        break;
      }
      case 'MSG': {
        const chat = chatWith(data.from);
        const m = { message_id: data.message_id, from: data.from, to: data.to, content: data.content, timestamp: data.timestamp };
        if (!chat.messages.some((x) => x.message_id === m.message_id)) {
          chat.messages.push(m);
          if (active === data.from) appendMessage(m); else chat.unread += 1;
        }
        chat.typing = false;
        send('MSG_ACK', { message_id: data.message_id }); // -> the sender's "delivered" tick
        renderPeople(); renderTyping();
        break;
      }
      case 'MSG_ACK': {
        const m = sentIndex.get(data.message_id);
        if (!m) break;
        if (data.status === 'delivered' || (data.status === 'sent' && m.status !== 'delivered')) m.status = data.status;
        updateTick(m);
        break;
      }
      case 'TYPING': {
        const chat = chatWith(data.user_id);
        chat.typing = !!data.is_typing;
        clearTimeout(chat.typingTimeout);
        if (chat.typing) chat.typingTimeout = setTimeout(() => { chat.typing = false; renderTyping(); }, 8000);
        renderTyping();
        break;
      }
      case 'PONG':
        break;
      case 'ERROR': {
        const id = data.details && data.details.message_id;
        const m = id && sentIndex.get(id);
        if (m && data.code === 'CHAT_NOT_OPENED') {
          // The server forgot the chat (it restarted): open it again, then resend.
          const chat = chatWith(m.to);
          chat.resend = chat.resend || [];
          if (!chat.resend.includes(m)) chat.resend.push(m);
          if (!chat.reopening) { chat.reopening = true; send('OPEN_CHAT', { target_user_id: m.to }); }
          break;
        }
        if (m && m.status !== 'delivered') { m.status = 'failed'; m.error = data.message; updateTick(m); }
        if (!identified && data.code === 'VALIDATION') {
          // The display name was refused: back to the name form.
          el.join.hidden = false; el.app.hidden = true;
        }
        showError(`${data.code}: ${data.message}`);
        break;
      }
      default:
        break;
    }
  }

  // ---- people and chats ---------------------------------------------------------------------
  function chatWith(id) {
    if (!chats.has(id)) chats.set(id, { chatId: null, messages: [], unread: 0, typing: false, opening: false });
    return chats.get(id);
  }

  function renderPeople() {
    const others = users.filter((u) => u.user_id !== userId)
      .sort((a, b) => Number(b.online) - Number(a.online) || a.display_name.localeCompare(b.display_name));
    el.nobody.hidden = others.length > 0;
    el.people.replaceChildren(...others.map((u) => {
      const chat = chats.get(u.user_id);
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.className = `person${u.online ? ' online' : ''}`;
      b.dataset.userId = u.user_id;
      if (active === u.user_id) b.setAttribute('aria-current', 'true');
      const unread = chat?.unread ?? 0;
      b.setAttribute('aria-label', `${u.display_name}, ${u.online ? 'online' : 'offline'}${unread ? `, ${unread} unread` : ''}`);
      b.innerHTML = '<span class="dot" aria-hidden="true"></span><span class="who"></span><span class="state" aria-hidden="true"></span>';
      b.querySelector('.who').textContent = u.display_name;
      b.querySelector('.state').textContent = u.online ? 'online' : 'offline';
      if (unread) {
        const badge = document.createElement('span');
        badge.className = 'badge'; badge.setAttribute('aria-hidden', 'true'); badge.textContent = String(unread);
        b.append(badge);
      }
      b.addEventListener('click', () => open(u.user_id));
      li.append(b);
      return li;
    }));
  }

  function open(id) {
    const chat = chatWith(id);
    if (chat.chatId) { show(id); return; }
    chat.opening = true;
    if (!send('OPEN_CHAT', { target_user_id: id })) showError('Not connected; try again in a moment.');
  }

  function show(id) {
    active = id;
    const chat = chatWith(id);
    chat.unread = 0;
    el.app.classList.add('in-chat');
    el.pick.hidden = true; el.composer.hidden = false;
    el.messages.replaceChildren();
    for (const m of chat.messages) appendMessage(m);
    renderHead(); renderPeople(); renderTyping(); updateComposer();
    el.text.focus();
  }

  function renderHead() {
    if (!active) return;
    el.chatTitle.textContent = nameOf(active);
    el.peerState.textContent = isOnline(active) ? 'online' : 'offline';
  }

  function renderTyping() {
    const chat = active && chats.get(active);
    el.typing.textContent = chat && chat.typing ? `${nameOf(active)} is typing…` : '';
  }

  function appendMessage(m) {
    const mine = m.from === userId;
    const li = document.createElement('li');
    li.className = `msg${mine ? ' mine' : ''}`;
    li.dataset.messageId = m.message_id;
    li.innerHTML = '<p class="text"></p><div class="meta"><time></time></div>';
    li.querySelector('.text').textContent = m.content;
    const when = new Date(m.timestamp || Date.now());
    const t = li.querySelector('time');
    t.dateTime = when.toISOString();
    t.textContent = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (mine) {
      const tick = document.createElement('span');
      tick.className = 'tick';
      li.querySelector('.meta').append(tick);
    }
    el.messages.append(li);
    if (mine) updateTick(m);
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  const TICKS = { pending: ['🕓', 'sending'], sent: ['✓', 'sent'], delivered: ['✓✓', 'delivered'], failed: ['!', 'not sent'] };
  function updateTick(m) {
    const li = el.messages.querySelector(`li[data-message-id="${CSS.escape(m.message_id)}"]`);
    const tick = li && li.querySelector('.tick');
    if (!tick) return;
    const [mark, label] = TICKS[m.status] || TICKS.pending;
    tick.dataset.status = m.status;
    tick.textContent = mark;
    tick.title = m.error ? `${label}: ${m.error}` : label;
    tick.setAttribute('aria-label', tick.title);
  }

  // ---- composing ----------------------------------------------------------------------------
  function updateComposer() {
    el.send.disabled = !identified || !active || el.text.value.trim() === '';
  }

  function stopTyping() {
    clearTimeout(typingTimer);
    if (typingSent) { typingSent = false; send('TYPING', { is_typing: false }); }
  }

  el.text.addEventListener('input', () => {
    updateComposer();
    if (!identified || !active) return;
    // One TYPING true per burst and one false after a pause: the server allows 10 a minute.
    if (!typingSent && el.text.value.trim() !== '') { typingSent = true; send('TYPING', { is_typing: true }); }
    clearTimeout(typingTimer);
    typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  });
  el.text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); el.composer.requestSubmit(); }
  });
  el.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    const content = el.text.value;
    if (!active || content.trim() === '') return;
    const m = { message_id: uuid4(), from: userId, to: active, content, timestamp: new Date().toISOString(), status: 'pending' };
    sentIndex.set(m.message_id, m);
    chatWith(active).messages.push(m);
    appendMessage(m);
    stopTyping();
    send('MSG', { to: m.to, content: m.content, message_id: m.message_id });
    el.text.value = '';
    updateComposer();
  });

  el.back.addEventListener('click', () => {
    active = null;
    el.app.classList.remove('in-chat');
    el.composer.hidden = true; el.pick.hidden = false;
    el.chatTitle.textContent = 'No chat open'; el.peerState.textContent = '';
    el.messages.replaceChildren();
    renderPeople(); renderTyping();
  });

  // ---- name ---------------------------------------------------------------------------------
  el.joinForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const name = el.name.value.trim();
    if ([...name].length < 3 || [...name].length > 50) return showError('A display name has 3–50 characters.');
    displayName = name;
    localStorage.setItem('fastchat.name', name);
    if (ws && ws.readyState === WebSocket.OPEN) send('HELLO', { user_id: userId, display_name: name });
    else if (!ws) connect();
  });
  el.rename.addEventListener('click', () => {
    el.name.value = displayName;
    el.join.hidden = false; el.app.hidden = true;
    el.name.focus();
  });

  el.name.value = displayName;
  if (displayName) connect(); else el.name.focus();
})();
