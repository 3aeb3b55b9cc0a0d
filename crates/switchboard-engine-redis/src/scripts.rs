//! The Lua scripts that make each operation atomic. Each touches the keys of one topic, room or
//! key only (one `{hash tag}`, one Redis Cluster slot), except [`PUT`], [`ADD`] and
//! [`UNINDEX_GONE`], which also touch the key index. Numbers that are stored go through
//! `string.format('%d')`: Lua's own number-to-text would write large ones in exponent form.

use std::sync::LazyLock;

use redis::Script;

/// Append to a log. KEYS: meta hash, stream. ARGV: body, keep, publish, expect_top ('' for
/// none), max_entries, max_bytes, ttl_ms (0: none), refuse (1) or trim (0), channel, size.
/// Returns {status, top, epoch}: status 1 done, 0 conflict, -1 full. Every `redis.call` costs
/// about a microsecond of Redis's one thread, so the common path makes as few as it can.
pub(crate) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local meta, stream = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'top', 'epoch', 'bytes', 'ttl')
local top, epoch = tonumber(m[1] or '0'), m[2]
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= top then
  return {0, top, epoch or '0'}
end
local bytes = tonumber(m[3] or '0')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch)
  bytes = 0
end
local keep = ARGV[2] == '1'
local size = tonumber(ARGV[10])
local delta = 0
if keep then
  local maxn, maxb = tonumber(ARGV[5]), tonumber(ARGV[6])
  local n = redis.call('XLEN', stream)
  if ARGV[8] == '1' then
    if n >= maxn or bytes + size > maxb then return {-1, top, epoch} end
  else
    while n > 0 and (n >= maxn or bytes + delta + size > maxb) do
      local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
      delta = delta - tonumber(old[1][2][2])
      redis.call('XDEL', stream, old[1][1])
      n = n - 1
    end
  end
  delta = delta + size
end
top = top + 1
if keep then
  redis.call('XADD', stream, string.format('%d', top) .. '-1', 's', ARGV[10], 'b', ARGV[1])
  redis.call('HSET', meta, 'top', string.format('%d', top), 'bytes', string.format('%d', bytes + delta))
  if ARGV[7] ~= '0' then
    redis.call('HSET', meta, 'ttl', '1')
    redis.call('PEXPIRE', meta, ARGV[7])
    redis.call('PEXPIRE', stream, ARGV[7])
  elseif m[4] then
    redis.call('HDEL', meta, 'ttl')
    redis.call('PERSIST', meta)
    redis.call('PERSIST', stream)
  end
else
  redis.call('HSET', meta, 'top', string.format('%d', top))
end
if ARGV[3] == '1' then
  redis.call('PUBLISH', ARGV[9], 'L' .. string.format('%d', top) .. ' ' .. epoch .. ' ' .. ARGV[1])
end
return {1, top, epoch}
",
    )
});

/// Read a log. KEYS: meta hash, stream. ARGV: mode ('latest' or 'after'), offset, epoch, count.
/// Returns {1, top, epoch, rows} (rows oldest first for 'after', newest first for 'latest') or
/// {0, top, epoch} when the position cannot be continued.
pub(crate) static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local meta, stream = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'top', 'epoch')
local top, epoch = tonumber(m[1] or '0'), m[2] or '0'
if ARGV[1] == 'latest' then
  return {1, top, epoch, redis.call('XREVRANGE', stream, '+', '-', 'COUNT', ARGV[4])}
end
local after = tonumber(ARGV[2])
if after > 0 then
  if epoch ~= ARGV[3] or after > top then return {0, top, epoch} end
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local trimmed = top
  if #first > 0 then trimmed = tonumber(string.match(first[1][1], '^(%d+)')) - 1 end
  if after < trimmed then return {0, top, epoch} end
end
return {1, top, epoch, redis.call('XRANGE', stream, '(' .. ARGV[2] .. '-1', '+', 'COUNT', ARGV[4])}
",
    )
});

/// Remove one entry. KEYS: meta hash, stream. ARGV: offset. Returns 1 if it was there.
pub(crate) static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local id = ARGV[1] .. '-1'
local rows = redis.call('XRANGE', KEYS[2], id, id)
if #rows == 0 then return 0 end
redis.call('XDEL', KEYS[2], id)
redis.call('HINCRBY', KEYS[1], 'bytes', -tonumber(rows[1][2][2]))
return 1
",
    )
});

/// Write keyed state. KEYS: the key's hash, the key index. ARGV: value, expect ('any',
/// 'absent', 'version'), version, ttl_ms (0: none), the key's name. Returns {1, version} or
/// {0, current version (0: absent), value}.
///
/// The key is indexed first, in the same step as it is written, so no janitor pass can fall
/// between the two and leave a stored key unindexed. Like every write before this script did,
/// it indexes the key even when the write is refused: the entry is then the janitor's to drop
/// if the key does not exist.
pub(crate) static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[5])
local cur = redis.call('HMGET', KEYS[1], 'v', 'd')
local v = tonumber(cur[1] or '0')
if (ARGV[2] == 'absent' and cur[1]) or (ARGV[2] == 'version' and v ~= tonumber(ARGV[3])) then
  return {0, v, cur[2]}
end
v = v + 1
redis.call('HSET', KEYS[1], 'v', string.format('%d', v), 'd', ARGV[1])
if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) else redis.call('PERSIST', KEYS[1]) end
return {1, v}
",
    )
});

/// Delete keyed state and return it. KEYS: the key's hash. ARGV: expect, version. Returns
/// {version, value} or nil.
pub(crate) static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'd')
if not cur[1] or ARGV[1] == 'absent' then return nil end
if ARGV[1] == 'version' and tonumber(cur[1]) ~= tonumber(ARGV[2]) then return nil end
redis.call('DEL', KEYS[1])
return {tonumber(cur[1]), cur[2]}
",
    )
});

/// Add to a counter. KEYS: the key's hash, the key index. ARGV: delta, min, max, the key's
/// name. Returns {1, new}, {0, current} or {-1, 0} when the key holds something else than a
/// number. Indexes the key in the same step, like [`PUT`].
pub(crate) static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[4])
local cur = redis.call('HMGET', KEYS[1], 'v', 'd')
local n = 0
if cur[1] then
  n = tonumber(cur[2])
  if not n or not string.match(cur[2], '^-?%d+$') then return {-1, 0} end
end
local nxt = n + tonumber(ARGV[1])
if nxt < tonumber(ARGV[2]) or nxt > tonumber(ARGV[3]) then return {0, n} end
if nxt == 0 then
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
redis.call('HSET', KEYS[1], 'v', string.format('%d', tonumber(cur[1] or '0') + 1), 'd', string.format('%d', nxt))
redis.call('PERSIST', KEYS[1])
return {1, nxt}
",
    )
});

/// Drops key-index entries whose keys do not exist, each checked at the moment it is dropped
/// (a key written since the caller looked keeps its entry). KEYS: the index, then the
/// candidates' hashes. ARGV: the candidates' names, in the same order. Returns how many were
/// dropped.
pub(crate) static UNINDEX_GONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local dropped = 0
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    dropped = dropped + redis.call('ZREM', KEYS[1], name)
  end
end
return dropped
",
    )
});

/// Sliding-window rate limit. KEYS: the window's sorted set. ARGV: limit, window_ms, a unique
/// member. Returns {1, 0} (counted) or {0, retry_after_ms}.
pub(crate) static RATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - w))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry = w
  if #oldest > 0 then retry = tonumber(oldest[2]) + w - now end
  if retry < 0 then retry = 0 end
  return {0, retry}
end
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, 0}
",
    )
});

/// A connection joins a presence room. KEYS: members (sorted by first join), connection counts,
/// join sequence, this node's connections in the room. ARGV: member, connection id. Returns 1
/// if it is the member's first connection.
pub(crate) static PRESENCE_JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SADD', KEYS[4], ARGV[2] .. ' ' .. ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 then
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), ARGV[1])
  return 1
end
return 0
",
    )
});

/// A connection leaves a presence room. KEYS and ARGV as for a join. Returns 1 if it was the
/// member's last connection.
pub(crate) static PRESENCE_LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SREM', KEYS[4], ARGV[2] .. ' ' .. ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) end
  return 1
end
return 0
",
    )
});

/// Removes a lost node's connections from a room. KEYS as for a join (the lost node's set).
/// Returns the members whose last connection it held.
pub(crate) static PRESENCE_REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local gone = {}
for _, entry in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local member = string.match(entry, '^%d+ (.*)$')
  if member and redis.call('HINCRBY', KEYS[2], member, -1) <= 0 then
    redis.call('HDEL', KEYS[2], member)
    redis.call('ZREM', KEYS[1], member)
    table.insert(gone, member)
  end
end
redis.call('DEL', KEYS[4])
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) end
return gone
",
    )
});

/// A node's heartbeat. KEYS: the nodes' sorted set. ARGV: node, stale_ms. Returns {whether the
/// node was registered before, nodes whose last heartbeat is older than stale_ms}.
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1]) == 0
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - tonumber(ARGV[2])))
if known then return {1, stale} end
return {0, stale}
",
    )
});
