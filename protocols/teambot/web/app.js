// teambot-sim dashboard: polls GET /scorecard every second. Fields: docs/protocols/teambot.md.
'use strict';
(() => {
  const POLL_MS = 1000;
  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? '–' : Number(n).toLocaleString('en'));
  let lastOk = 0, failures = 0;

  $('cmd').textContent = `switchboard teambot --url ws://${location.host}/global`;

  function set(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function teamState(t, finished) {
    if (t.left_via) return ['left', `left (${t.left_via})`];
    if (!t.joined) return ['pending', 'not joined'];
    // After goodbye the bot closes its sockets: show what the final check saw instead.
    if (finished) return t.reported_connected ? ['connected', 'connected at the end'] : ['disconnected', 'disconnected at the end'];
    return t.connected ? ['connected', 'connected'] : ['disconnected', 'reconnecting'];
  }

  function render(s) {
    const phase = $('phase');
    phase.dataset.phase = s.phase;
    set('phase', s.phase);
    const verdict = $('verdict');
    const v = s.finished ? (s.perfect ? 'perfect' : 'failed') : 'pending';
    verdict.dataset.verdict = v;
    set('verdict', v === 'perfect' ? 'Perfect scorecard ✓'
      : v === 'failed' ? `Not perfect: ${s.mismatch_count} mismatch${s.mismatch_count === 1 ? '' : 'es'}`
      : s.phase === 'waiting' ? 'Waiting for the bot' : 'Scenario running…');
    $('hint').hidden = s.phase !== 'waiting';

    const teams = s.teams || [];
    const joined = teams.filter((t) => t.joined).length;
    const connected = teams.filter((t) => t.connected).length;
    const left = teams.filter((t) => t.left_via).length;
    set('teams-count', `${joined} / ${teams.length}`);
    set('teams-detail', s.finished ? `${left} left · finished` : `${connected} connected · ${left} left`);
    set('messages-count', fmt(s.totals.messages));
    set('messages-detail', `${fmt(s.totals.props)} with props · ${fmt(s.totals.team_reconnects)} team reconnects`);
    const hc = s.healthchecks;
    set('hc-count', `${fmt(hc.answered)} / ${fmt(hc.sent)}`);
    set('hc-detail', `${hc.lost} lost · ${hc.unanswered} unanswered · final ${hc.final_answered ? 'answered' : 'pending'}`);
    set('global-count', fmt(s.global.connections));
    set('global-detail', `connections · ${s.global.reconnects} reconnects · ${s.global.server_drops} dropped`);
    const c = s.chaos;
    set('chaos-count', fmt(c.team_drops + c.global_drops + c.refused_connects + c.refused_upgrades));
    set('chaos-detail', `${c.team_drops} team drops · ${c.global_drops} global · ${c.refused_connects} refused connects · ${c.refused_upgrades} refused upgrades · ${c.delayed_connects} delayed`);
    set('mismatch-count', fmt(s.mismatch_count));
    set('seed', `seed ${s.seed}`);

    const body = $('teams').tBodies[0];
    $('no-teams').hidden = teams.length > 0;
    const rows = teams.map((t) => {
      const tr = document.createElement('tr');
      tr.dataset.team = String(t.id);
      const [state, label] = teamState(t, s.finished);
      const cells = [
        ['th', String(t.id)],
        ['td', label, state],
        ['td', `${fmt(t.expected_messages)} / ${fmt(t.reported_messages)}`, null, s.finished && t.reported_messages !== t.expected_messages],
        ['td', `${fmt(t.expected_props)} / ${fmt(t.reported_props)}`, null, s.finished && t.reported_props !== t.expected_props],
        ['td', fmt(t.connections)],
        ['td', fmt(t.server_drops)],
        ['td', fmt(t.client_closes)],
      ];
      cells.forEach(([tag, text, st, bad], i) => {
        const cell = document.createElement(tag);
        if (tag === 'th') cell.scope = 'row';
        if (i >= 2) cell.className = 'num';
        if (bad) cell.classList.add('bad');
        if (st) {
          const span = document.createElement('span');
          span.className = 'state';
          span.dataset.state = st;
          span.textContent = text;
          cell.append(span);
        } else cell.textContent = text;
        tr.append(cell);
      });
      return tr;
    });
    body.replaceChildren(...rows);

    $('mismatch-panel').hidden = !s.mismatches || s.mismatches.length === 0;
    $('mismatches').replaceChildren(...(s.mismatches || []).map((m) => {
      const li = document.createElement('li');
      const where = [m.final_check ? 'final check' : m.healthcheck ? `healthcheck ${m.healthcheck}` : null,
        m.team !== null && m.team !== undefined ? `team ${m.team}` : null].filter(Boolean).join(', ');
      li.textContent = `${where ? `${where}: ` : ''}${m.problem} (expected ${JSON.stringify(m.expected)}, reported ${JSON.stringify(m.reported)})`;
      return li;
    }));
  }

  async function poll() {
    try {
      const res = await fetch('scorecard', { cache: 'no-store', signal: AbortSignal.timeout(5000) });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      render(await res.json());
      lastOk = Date.now(); failures = 0;
      const conn = $('conn');
      conn.classList.remove('down');
      set('conn', `Updated ${new Date(lastOk).toLocaleTimeString()} · refreshes every second`);
    } catch (err) {
      failures += 1;
      const conn = $('conn');
      conn.classList.add('down');
      set('conn', `Cannot reach the simulator (${err.message}); retrying…`);
    } finally {
      setTimeout(poll, failures ? Math.min(POLL_MS * 2 ** failures, 10000) : POLL_MS);
    }
  }
  poll();
})();
