//! # Named mutexes on Redis: fair, leased, fenced
//!
//! A step with `mutex = NAME` runs only while its attempt holds the mutex's lease in Redis.
//! The dispatcher queues the attempt, acquires the lease for it (waiters are served in
//! arrival order), renews it until an agent claims the job, and hands it over with the claim;
//! the agent renews it while the step runs and releases it when the step ends. Every
//! operation is one Lua script that gets all its keys, so it is atomic in Redis.
//!
//! Keys, per mutex, under the namespace:
//!
//! | key | holds |
//! | --- | --- |
//! | `<ns>.mutex.<name>.holder` | `waiter|token`, with the lease as its expiry (`PX`) |
//! | `<ns>.mutex.<name>.queue` | waiters in arrival order (ZSET, score = ticket) |
//! | `<ns>.mutex.<name>.alive` | each waiter's deadline from Redis's clock (ZSET) |
//! | `<ns>.mutex.<name>.seq`, `.fence` | ticket and grant counters |
//! | `<ns>.mutex-epoch` | the current epoch (from a PostgreSQL sequence) |
//! | `<ns>.mutex-quiet` | present for one lease after a new epoch: only holders re-claim |
//!
//! A waiter is `<step run id>:<attempt>`. A grant's **fencing token** is
//! `epoch * 2^32 + counter`: it grows with every grant, and after Redis restarts empty (it
//! keeps nothing on disk) the new epoch makes every later token exceed every earlier one.
//! While the epoch is missing every script answers `NOEPOCH`; the dispatcher then sets a new
//! epoch, with a quiet period of one lease during which nobody acquires and the holders that
//! were running re-claim under a new token. A waiter that stops calling `acquire` is evicted
//! after [`WAITER_ALIVE`], so a dead dispatcher's waiters cannot block the queue.
//!
//! Releases publish the mutex's name on `<ns>.mutex-released`, so waiters retry at once; they
//! also retry on a timer, because pub/sub loses messages sent while a subscriber reconnects.

use crate::redis_link::RedisLink;
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// How long a waiter stays queued without calling `acquire` again.
pub const WAITER_ALIVE: Duration = Duration::from_secs(15);

/// Mutex names: letters, digits, `.`, `-`, `_`, at most 100.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// The waiter id of an attempt.
pub fn waiter(step_run: impl std::fmt::Display, attempt: u32) -> String {
    format!("{step_run}:{attempt}")
}

/// All the keys of one mutex.
#[derive(Clone, Debug)]
pub struct MutexKeys {
    pub name: String,
    holder: String,
    queue: String,
    alive: String,
    seq: String,
    fence: String,
    epoch: String,
    quiet: String,
    channel: String,
}

impl MutexKeys {
    pub fn new(namespace: &str, name: &str) -> Self {
        let base = format!("{namespace}.mutex.{name}");
        Self {
            name: name.to_owned(),
            holder: format!("{base}.holder"),
            queue: format!("{base}.queue"),
            alive: format!("{base}.alive"),
            seq: format!("{base}.seq"),
            fence: format!("{base}.fence"),
            epoch: epoch_key(namespace),
            quiet: quiet_key(namespace),
            channel: released_channel(namespace),
        }
    }
}

pub fn epoch_key(namespace: &str) -> String {
    format!("{namespace}.mutex-epoch")
}
pub fn quiet_key(namespace: &str) -> String {
    format!("{namespace}.mutex-quiet")
}
/// Pub/sub channel carrying the names of released mutexes.
pub fn released_channel(namespace: &str) -> String {
    format!("{namespace}.mutex-released")
}

/// The answer to `acquire`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Held, with this fencing token (also when the caller held it already).
    Granted(u64),
    /// Someone else holds it (`holder` is their waiter id, empty if free but not our turn);
    /// `position` is our place in the queue, 0 first.
    Waiting { holder: String, position: u64 },
    /// Redis lost its data: a new epoch must be set first.
    NoEpoch,
    /// Just after a new epoch: only previous holders may re-claim for now.
    Quiet,
}

/// The answer to `renew`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renew {
    Held,
    /// The lease is not the caller's (expired, or taken over).
    Lost,
    NoEpoch,
}

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('GET', KEYS[6])
if not epoch then return {'NOEPOCH'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local waiter = ARGV[1]
local h = redis.call('GET', KEYS[1])
local hw = nil
if h then
  local sep = string.find(h, '|', 1, true)
  hw = string.sub(h, 1, sep - 1)
  if hw == waiter then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {'OK', string.sub(h, sep + 1)}
  end
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), waiter)
if not redis.call('ZSCORE', KEYS[2], waiter) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), waiter)
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, d in ipairs(dead) do
  redis.call('ZREM', KEYS[2], d)
  redis.call('ZREM', KEYS[3], d)
end
local rank = redis.call('ZRANK', KEYS[2], waiter)
if hw then return {'WAIT', hw, tostring(rank)} end
if redis.call('EXISTS', KEYS[7]) == 1 then return {'QUIET'} end
if ARGV[4] == '0' then return {'WAIT', '', tostring(rank)} end
if rank ~= 0 then return {'WAIT', '', tostring(rank)} end
local f = redis.call('INCR', KEYS[5])
local token = string.format('%.0f', tonumber(epoch) * 4294967296 + f)
redis.call('SET', KEYS[1], waiter .. '|' .. token, 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], waiter)
redis.call('ZREM', KEYS[3], waiter)
return {'OK', token}
"#,
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('GET', KEYS[2]) then return 'NOEPOCH' end
if redis.call('GET', KEYS[1]) == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 'HELD'
end
return 'LOST'
"#,
    )
});

static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('GET', KEYS[3])
if not epoch then return {'NOEPOCH'} end
local h = redis.call('GET', KEYS[1])
if h then
  local sep = string.find(h, '|', 1, true)
  if string.sub(h, 1, sep - 1) == ARGV[1] then return {'OK', string.sub(h, sep + 1)} end
  return {'LOST'}
end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'LOST'} end
local f = redis.call('INCR', KEYS[2])
local token = string.format('%.0f', tonumber(epoch) * 4294967296 + f)
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[3])
return {'OK', token}
"#,
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local h = redis.call('GET', KEYS[1])
if h and h == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return 0
"#,
    )
});

static SET_EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
  return 1
end
return 0
"#,
    )
});

fn parse_token(s: &str) -> redis::RedisResult<u64> {
    s.parse().map_err(|_| {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "fencing token is not a number",
            s.to_owned(),
        ))
    })
}

fn unexpected(what: &str, got: &[String]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected answer from a mutex script",
        format!("{what}: {got:?}"),
    ))
}

/// Queue for the mutex (or refresh our place) and take it if it is our turn.
pub async fn acquire(
    redis: &RedisLink,
    keys: &MutexKeys,
    waiter: &str,
    lease: Duration,
) -> redis::RedisResult<Acquire> {
    queue_or_acquire(redis, keys, waiter, lease, true).await
}

/// Queue for the mutex (or refresh our place); with `may_grant = false` never take it, even
/// if it is free and our turn (the caller knows the previous holder has not ended yet).
pub async fn queue_or_acquire(
    redis: &RedisLink,
    keys: &MutexKeys,
    waiter: &str,
    lease: Duration,
    may_grant: bool,
) -> redis::RedisResult<Acquire> {
    let mut conn = redis.connection().await?;
    let r: Vec<String> = ACQUIRE
        .key(&keys.holder)
        .key(&keys.queue)
        .key(&keys.alive)
        .key(&keys.seq)
        .key(&keys.fence)
        .key(&keys.epoch)
        .key(&keys.quiet)
        .arg(waiter)
        .arg(lease.as_millis() as u64)
        .arg(WAITER_ALIVE.as_millis() as u64)
        .arg(if may_grant { "1" } else { "0" })
        .invoke_async(&mut conn)
        .await?;
    match r.first().map(String::as_str) {
        Some("OK") if r.len() == 2 => Ok(Acquire::Granted(parse_token(&r[1])?)),
        Some("WAIT") if r.len() == 3 => Ok(Acquire::Waiting {
            holder: r[1].clone(),
            position: r[2].parse().unwrap_or(0),
        }),
        Some("NOEPOCH") => Ok(Acquire::NoEpoch),
        Some("QUIET") => Ok(Acquire::Quiet),
        _ => Err(unexpected("acquire", &r)),
    }
}

/// Extend a held lease; never re-creates one that is gone.
pub async fn renew(
    redis: &RedisLink,
    keys: &MutexKeys,
    waiter: &str,
    token: u64,
    lease: Duration,
) -> redis::RedisResult<Renew> {
    let mut conn = redis.connection().await?;
    let r: String = RENEW
        .key(&keys.holder)
        .key(&keys.epoch)
        .arg(waiter)
        .arg(token.to_string())
        .arg(lease.as_millis() as u64)
        .invoke_async(&mut conn)
        .await?;
    match r.as_str() {
        "HELD" => Ok(Renew::Held),
        "LOST" => Ok(Renew::Lost),
        "NOEPOCH" => Ok(Renew::NoEpoch),
        other => Err(unexpected("renew", &[other.to_owned()])),
    }
}

/// After Redis came back empty, during the quiet period: take the mutex back under a new,
/// higher token. [`Reclaim::Lost`] when it cannot be (someone else has it, or the quiet
/// period is over); [`Reclaim::NoEpoch`] while no new epoch is set yet.
pub async fn reclaim(
    redis: &RedisLink,
    keys: &MutexKeys,
    waiter: &str,
    lease: Duration,
) -> redis::RedisResult<Reclaim> {
    let mut conn = redis.connection().await?;
    let r: Vec<String> = RECLAIM
        .key(&keys.holder)
        .key(&keys.fence)
        .key(&keys.epoch)
        .key(&keys.quiet)
        .arg(waiter)
        .arg("")
        .arg(lease.as_millis() as u64)
        .invoke_async(&mut conn)
        .await?;
    match r.first().map(String::as_str) {
        Some("OK") if r.len() == 2 => Ok(Reclaim::Held(parse_token(&r[1])?)),
        Some("LOST") => Ok(Reclaim::Lost),
        Some("NOEPOCH") => Ok(Reclaim::NoEpoch),
        _ => Err(unexpected("reclaim", &r)),
    }
}

/// The answer to `reclaim`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reclaim {
    Held(u64),
    Lost,
    NoEpoch,
}

/// Give the mutex up (if `token` is the caller's grant) and leave its queue. Returns whether
/// a lease was released. `token = None` only leaves the queue (a waiter giving up).
pub async fn release(
    redis: &RedisLink,
    keys: &MutexKeys,
    waiter: &str,
    token: Option<u64>,
) -> redis::RedisResult<bool> {
    let mut conn = redis.connection().await?;
    let r: i64 = RELEASE
        .key(&keys.holder)
        .key(&keys.queue)
        .key(&keys.alive)
        .arg(waiter)
        .arg(token.map(|t| t.to_string()).unwrap_or_else(|| "-".into()))
        .arg(&keys.channel)
        .arg(&keys.name)
        .invoke_async(&mut conn)
        .await?;
    Ok(r == 1)
}

/// Whether the namespace has an epoch (Redis has not lost its data since it was set).
pub async fn has_epoch(redis: &RedisLink, namespace: &str) -> redis::RedisResult<bool> {
    let mut conn = redis.connection().await?;
    redis::cmd("EXISTS")
        .arg(epoch_key(namespace))
        .query_async(&mut conn)
        .await
}

/// Set a new epoch unless one exists, with a quiet period of `quiet` (zero: none).
pub async fn set_epoch(
    redis: &RedisLink,
    namespace: &str,
    epoch: u64,
    quiet: Duration,
) -> redis::RedisResult<bool> {
    let mut conn = redis.connection().await?;
    let r: i64 = SET_EPOCH
        .key(epoch_key(namespace))
        .key(quiet_key(namespace))
        .arg(epoch)
        .arg(quiet.as_millis() as u64)
        .invoke_async(&mut conn)
        .await?;
    Ok(r == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        assert!(is_valid_name("prod-db.main_1"));
        assert!(!is_valid_name("has space"));
        assert!(!is_valid_name(""));
        let k = MutexKeys::new("ns", "prod-db");
        assert_eq!(k.holder, "ns.mutex.prod-db.holder");
        assert_eq!(k.epoch, "ns.mutex-epoch");
        assert_eq!(waiter("abc", 2), "abc:2");
    }
}
