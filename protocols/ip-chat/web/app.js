// ip-chat demo client: plain JS, no build step. Wire format: docs/protocols/ip-chat.md.
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
  const MAX_CHARS = 500; // the server counts Unicode code points, so do we: [...text].length
  const EMOJI = ['👍', '❤️', '😂', '🎉', '😮'];
  const $ = (id) => document.getElementById(id);
  const list = $('messages'), empty = $('empty'), status = $('status'), errorBox = $('error');
  const form = $('composer'), author = $('author'), text = $('text'), counter = $('counter'), send = $('send');
  const chat = list.parentElement;

  const messages = new Map(); // id -> message
  const pendingTexts = []; // texts we sent, to learn our own author_id from the echo
  const pendingReactions = []; // "message_id emoji" we toggled, same purpose
  let myId = localStorage.getItem('ipchat.authorId');
  let ws = null, retry = 0, reconnectTimer = null, errorTimer = null;

  author.value = localStorage.getItem('ipchat.name') || '';
  author.addEventListener('input', () => localStorage.setItem('ipchat.name', author.value));

  function setStatus(state, label) {
    status.dataset.state = state;
    status.textContent = label;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { errorBox.hidden = true; }, 8000);
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    ws = new WebSocket(withToken(`${scheme}://${location.host}/ws`));
    setStatus('connecting', retry ? 'Reconnecting…' : 'Connecting…');
    ws.addEventListener('open', () => {
      retry = 0;
      // The server replays the whole history on every connect: start from a clean list.
      messages.clear();
      list.replaceChildren();
      setStatus('open', 'Connected');
      updateComposer();
    });
    ws.addEventListener('message', (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      handle(frame);
    });
    ws.addEventListener('close', () => {
      ws = null;
      updateComposer();
      const delay = Math.min(10000, 500 * 2 ** retry) * (0.5 + Math.random() / 2);
      retry += 1;
      setStatus('closed', `Disconnected, retrying in ${Math.ceil(delay / 1000)} s`);
      reconnectTimer = setTimeout(connect, delay);
    });
  }

  function handle({ type, data }) {
    if (!data) return;
    if (type === 'message') {
      const i = pendingTexts.indexOf(data.text);
      if (i !== -1) { pendingTexts.splice(i, 1); learnMyId(data.author_id); }
      upsert(data);
    } else if (type === 'reaction_updated') {
      const i = pendingReactions.indexOf(`${data.message_id} ${data.emoji}`);
      if (i !== -1) { pendingReactions.splice(i, 1); learnMyId(data.user_id); }
      if (data.message) upsert(data.message);
    } else if (type === 'error') {
      showError(data.error || 'Something went wrong');
      // A refused send will never echo; forget the oldest pending one.
      if (/message|Rate limit/.test(data.error || '')) pendingTexts.shift();
    }
  }

  function learnMyId(id) {
    if (!id || id === myId) return;
    myId = id;
    localStorage.setItem('ipchat.authorId', id);
    for (const m of messages.values()) render(m);
  }

  function upsert(m) {
    const isNew = !messages.has(m.id);
    messages.set(m.id, m);
    const nearBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 80;
    render(m);
    empty.hidden = messages.size > 0;
    if (isNew && nearBottom) chat.scrollTop = chat.scrollHeight;
  }

  function render(m) {
    let li = list.querySelector(`li[data-id="${CSS.escape(m.id)}"]`);
    if (!li) {
      li = document.createElement('li');
      li.className = 'msg';
      li.dataset.id = m.id;
      li.innerHTML = '<div class="meta"><span class="author"></span><time></time></div><p class="text"></p><div class="reactions" role="group"></div>';
      list.append(li);
    }
    li.classList.toggle('mine', !!myId && m.author_id === myId);
    li.querySelector('.author').textContent = m.author_name;
    const when = new Date(m.created_at * 1000);
    const time = li.querySelector('time');
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    li.querySelector('.text').textContent = m.text;
    const box = li.querySelector('.reactions');
    box.setAttribute('aria-label', `Reactions to ${m.author_name}'s message`);
    const shown = [...EMOJI, ...Object.keys(m.reactions || {}).filter((e) => !EMOJI.includes(e))];
    box.replaceChildren(...shown.map((emoji) => reactionButton(m, emoji)));
  }

  function reactionButton(m, emoji) {
    const users = (m.reactions && m.reactions[emoji]) || [];
    const mine = !!myId && users.includes(myId);
    const b = document.createElement('button');
    b.type = 'button';
    b.dataset.emoji = emoji;
    b.className = users.length ? '' : 'zero';
    b.setAttribute('aria-pressed', String(mine));
    b.setAttribute('aria-label', `${emoji} ${users.length} reaction${users.length === 1 ? '' : 's'}${mine ? ', including yours' : ''}`);
    b.innerHTML = '<span aria-hidden="true"></span><span class="n" aria-hidden="true"></span>';
    b.firstChild.textContent = emoji;
    b.lastChild.textContent = users.length ? String(users.length) : '';
    b.addEventListener('click', () => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return showError('Not connected; try again in a moment.');
      pendingReactions.push(`${m.id} ${emoji}`);
      ws.send(JSON.stringify({ type: 'add_reaction', data: { message_id: m.id, emoji } }));
    });
    return b;
  }

  function charCount() { return [...text.value].length; }

  function updateComposer() {
    const n = charCount();
    const over = n > MAX_CHARS;
    counter.textContent = `${n} / ${MAX_CHARS}`;
    counter.classList.toggle('over', over);
    counter.setAttribute('aria-live', over ? 'polite' : 'off');
    if (over) counter.textContent += ' (too long)';
    send.disabled = over || text.value.trim() === '' || !ws || ws.readyState !== WebSocket.OPEN;
  }

  text.addEventListener('input', updateComposer);
  text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const value = text.value;
    if (value.trim() === '') return;
    if ([...value].length > MAX_CHARS) return showError(`Message too long (max ${MAX_CHARS} characters).`);
    if (!ws || ws.readyState !== WebSocket.OPEN) return showError('Not connected; try again in a moment.');
    pendingTexts.push(value);
    ws.send(JSON.stringify({ type: 'send_message', data: { text: value, author_name: author.value.trim() || null } }));
    text.value = '';
    updateComposer();
    text.focus();
  });

  updateComposer();
  connect();
})();
