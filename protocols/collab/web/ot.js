// Operational transformation for collab, a port of switchboard_collab::ot (ot.js text operations).
// An operation is an array of components: n > 0 retains n characters, a string inserts it,
// n < 0 deletes -n characters. Lengths and positions count Unicode code points, not UTF-16 units.
'use strict';
(function (root) {
  const cpLen = (s) => { let n = 0; for (const _ of s) n += 1; return n; };
  const isRetain = (c) => typeof c === 'number' && c > 0;
  const isDelete = (c) => typeof c === 'number' && c < 0;
  const isInsert = (c) => typeof c === 'string';

  // Appends a component, merging with the previous one and keeping inserts before deletes.
  function push(op, c) {
    if (c === 0 || c === '') return op;
    const last = op[op.length - 1];
    if (isRetain(c)) {
      if (isRetain(last)) op[op.length - 1] = last + c; else op.push(c);
    } else if (isDelete(c)) {
      if (isDelete(last)) op[op.length - 1] = last + c; else op.push(c);
    } else if (isInsert(c)) {
      const at = isDelete(last) ? op.length - 1 : op.length;
      if (at > 0 && isInsert(op[at - 1])) op[at - 1] += c;
      else op.splice(at, 0, c);
    }
    return op;
  }

  function baseLen(op) {
    let n = 0;
    for (const c of op) if (typeof c === 'number') n += Math.abs(c);
    return n;
  }
  function targetLen(op) {
    let n = 0;
    for (const c of op) n += isRetain(c) ? c : isInsert(c) ? cpLen(c) : 0;
    return n;
  }
  const isNoop = (op) => op.every(isRetain);

  // The minimal operation turning `a` into `b` (common prefix and suffix retained).
  function diff(a, b) {
    const x = Array.from(a); const y = Array.from(b);
    let p = 0;
    while (p < x.length && p < y.length && x[p] === y[p]) p += 1;
    let s = 0;
    while (s < x.length - p && s < y.length - p && x[x.length - 1 - s] === y[y.length - 1 - s]) s += 1;
    const op = [];
    push(op, p);
    push(op, -(x.length - p - s));
    push(op, y.slice(p, y.length - s).join(''));
    push(op, s);
    return op;
  }

  // Pads an operation that covers less than the document with a trailing retain.
  function normalize(op, docLen) {
    const out = [];
    for (const c of op) push(out, c);
    const base = baseLen(out);
    if (base < docLen) push(out, docLen - base);
    return out;
  }

  function apply(text, op) {
    const chars = Array.from(text);
    if (baseLen(op) !== chars.length) throw new Error(`operation spans ${baseLen(op)} characters, document has ${chars.length}`);
    let i = 0; let out = '';
    for (const c of op) {
      if (isRetain(c)) { out += chars.slice(i, i + c).join(''); i += c; }
      else if (isInsert(c)) out += c;
      else i += -c;
    }
    return out;
  }

  // Iterates components, letting the caller take part of the current one.
  function cursor(op) {
    let i = 0; let cur = op[0];
    return {
      peek: () => cur,
      take(n) { // consume n of the current retain/delete/insert (n <= its length)
        const c = cur;
        if (isInsert(c)) {
          const chars = Array.from(c);
          const head = chars.slice(0, n).join('');
          const tail = chars.slice(n).join('');
          if (tail) cur = tail; else { i += 1; cur = op[i]; }
          return head;
        }
        const len = Math.abs(c);
        if (len > n) cur = c > 0 ? len - n : -(len - n); else { i += 1; cur = op[i]; }
        return c > 0 ? n : -n;
      },
      next() { const c = cur; i += 1; cur = op[i]; return c; },
    };
  }
  const len = (c) => (isInsert(c) ? cpLen(c) : Math.abs(c));

  // The single operation with the effect of `a` then `b`.
  function compose(a, b) {
    if (targetLen(a) !== baseLen(b)) throw new Error('compose: length mismatch');
    const out = []; const x = cursor(a); const y = cursor(b);
    for (;;) {
      const p = x.peek(); const q = y.peek();
      if (p === undefined && q === undefined) break;
      if (isDelete(p)) { push(out, x.next()); continue; }
      if (isInsert(q)) { push(out, y.next()); continue; }
      if (p === undefined || q === undefined) throw new Error('compose: length mismatch');
      const m = Math.min(len(p), len(q));
      if (isRetain(p) && isRetain(q)) { push(out, m); x.take(m); y.take(m); }
      else if (isRetain(p) && isDelete(q)) { push(out, -m); x.take(m); y.take(m); }
      else if (isInsert(p) && isRetain(q)) { push(out, x.take(m)); y.take(m); }
      else if (isInsert(p) && isDelete(q)) { x.take(m); y.take(m); }
    }
    return out;
  }

  // transform(a, b) -> [a', b'] with apply(apply(s, a), b') == apply(apply(s, b), a').
  // On a tie (both insert at one position) a's insert goes first, as on the server.
  function transform(a, b) {
    if (baseLen(a) !== baseLen(b)) throw new Error('transform: length mismatch');
    const ap = []; const bp = []; const x = cursor(a); const y = cursor(b);
    for (;;) {
      const p = x.peek(); const q = y.peek();
      if (p === undefined && q === undefined) break;
      if (isInsert(p)) { const t = x.next(); push(ap, t); push(bp, cpLen(t)); continue; }
      if (isInsert(q)) { const t = y.next(); push(ap, cpLen(t)); push(bp, t); continue; }
      if (p === undefined || q === undefined) throw new Error('transform: length mismatch');
      const m = Math.min(len(p), len(q));
      if (isRetain(p) && isRetain(q)) { push(ap, m); push(bp, m); }
      else if (isDelete(p) && isRetain(q)) push(ap, -m);
      else if (isRetain(p) && isDelete(q)) push(bp, -m);
      // delete/delete: both already removed the same characters
      x.take(m); y.take(m);
    }
    return [ap, bp];
  }

  // Where a code-point position ends up after `op` (inserts exactly at the position stay after it).
  function transformIndex(pos, op) {
    let i = 0; let out = pos;
    for (const c of op) {
      if (i > pos) break;
      if (isRetain(c)) i += c;
      else if (isInsert(c)) { if (i < pos) out += cpLen(c); }
      else { const n = -c; out -= Math.min(n, Math.max(0, pos - i)); i += n; }
    }
    return out;
  }

  // UTF-16 index <-> code-point index in `text`.
  function toCp(text, u16) { return cpLen(text.slice(0, u16)); }
  function toU16(text, cp) {
    let i = 0; let n = 0;
    while (n < cp && i < text.length) { const code = text.charCodeAt(i); i += code >= 0xd800 && code <= 0xdbff ? 2 : 1; n += 1; }
    return i;
  }

  root.CollabOT = { push, baseLen, targetLen, isNoop, diff, normalize, apply, compose, transform, transformIndex, toCp, toU16, cpLen };
})(typeof window !== 'undefined' ? window : globalThis);
