//! GCRA rate limiting shared by every worker process of one host.
//!
//! # Why a memory-mapped table of atomics
//!
//! Every request makes one or two decisions (RPM, TPM), and several Granian
//! workers must agree on them. The state is one number per limit, the
//! theoretical arrival time (TAT), so a decision is a compare-and-swap on a
//! `u64` in memory shared by the processes: no lock, no syscall, no page
//! write-back on the hot path (the file lives in the page cache; nothing
//! forces it to disk). A process that dies mid-decision leaves no lock held.
//! The alternative, an LMDB write transaction per decision, serialises all
//! workers on LMDB's single writer lock and pays a commit (an msync or fsync,
//! or with `sync=False` still a meta-page update) per request.
//!
//! Measured by `bench/bench_ratelimit.py` in one run (median per admitted
//! decision, Python call included, 1000 keys in turn, 2-core VM): this table 0.33 us; an LMDB write transaction with
//! `sync=False, metasync=False` doing the same GCRA step 5.5 us (17x); the
//! `limits` package's moving window on MemoryStorage, which is not even
//! shared between processes, 3.1 us (9x).
//!
//! # Layout
//!
//! A 64-byte header (magic, version, slot size, capacity, the SipHash key of
//! this table), then `capacity` slots of `{key_hash: u64, tat_ns: u64}`. A key
//! is hashed with SipHash-1-3 under a per-table random key (so clients
//! cannot aim collisions at one probe chain), and found by linear probing; a
//! slot is claimed by a CAS of its `key_hash` from 0 and never released (a
//! slot whose TAT is in the past is the same as a fresh one, so reset only
//! clears the TAT). Two keys with the same 64-bit hash would share a limit;
//! at 65536 keys that has a probability of about 1e-10.
//!
//! # Creation
//!
//! The file is built whole under a temporary name and published with
//! `link(2)`, which fails if the path already exists: concurrent creators
//! all end up mapping the one file that won, and nobody ever sees a
//! half-written header.
//!
//! # The algorithm
//!
//! Emission interval `T = ceil(period / limit)`, burst tolerance
//! `tau = limit * T` (about `period`): a fresh key may spend `limit` at once,
//! then one unit every `T`. A request of cost `c` at `now` is allowed iff
//! `max(tat, now) + c*T - now <= tau`, and then `tat = max(tat, now) + c*T`.
//! Hence over any interval `[a, b]` of decision times, at most
//! `limit + (b - a) / T` units are admitted, whatever the interleaving of the
//! processes. `c > limit` is never allowed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

const MAGIC: u64 = u64::from_le_bytes(*b"CHPGCRA1");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const SLOT_LEN: usize = 16;
pub const DEFAULT_CAPACITY: u64 = 65_536;
/// 2^26 slots is a 1 GiB file; more is a mistake.
pub const MAX_CAPACITY: u64 = 1 << 26;
/// Longest period: about 31 years, so every sum below fits in a `u64`.
pub const MAX_PERIOD_NS: u64 = 1_000_000_000 * 1_000_000_000;
/// Largest limit (about 1.1e12 units per period).
pub const MAX_LIMIT: u64 = 1 << 40;

#[derive(Debug)]
pub enum RateLimitError {
    /// A bad argument (limit, period, cost, now): a `ValueError` in Python.
    Argument(&'static str),
    Io { path: PathBuf, what: &'static str, err: std::io::Error },
    /// The file is not a table of this version, or its capacity differs.
    Invalid { path: PathBuf, why: String },
    Full { capacity: u64 },
}

impl std::fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateLimitError::Argument(m) => write!(f, "{m}"),
            RateLimitError::Io { path, what, err } => write!(f, "cannot {what} rate-limit table {}: {err}", path.display()),
            RateLimitError::Invalid { path, why } => write!(f, "{} is not a usable rate-limit table: {why}", path.display()),
            RateLimitError::Full { capacity } => {
                write!(f, "rate-limit table is full ({capacity} keys); raise its capacity (a new file)")
            }
        }
    }
}

impl std::error::Error for RateLimitError {}

/// A limit: `limit` units per `period`, in the integer form the algorithm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub limit: u64,
    /// Emission interval T, ns.
    pub interval_ns: u64,
    /// Burst tolerance tau = limit * T, ns.
    pub tau_ns: u64,
}

impl Limit {
    pub fn new(limit: i64, period_s: f64) -> Result<Limit, RateLimitError> {
        if limit < 0 || limit as u64 > MAX_LIMIT {
            return Err(RateLimitError::Argument("limit must be between 0 and 2**40"));
        }
        if !(period_s.is_finite() && period_s > 0.0) {
            return Err(RateLimitError::Argument("period must be a positive number of seconds"));
        }
        let period_ns = (period_s * 1e9).round();
        if period_ns < 1.0 || period_ns > MAX_PERIOD_NS as f64 {
            return Err(RateLimitError::Argument("period must be between 1 ns and 1e9 s"));
        }
        Ok(Limit::from_ns(limit as u64, period_ns as u64))
    }

    pub fn from_ns(limit: u64, period_ns: u64) -> Limit {
        if limit == 0 {
            // Nothing is ever allowed; T only scales `remaining`, which is 0.
            return Limit { limit: 0, interval_ns: period_ns.max(1), tau_ns: 0 };
        }
        let interval_ns = period_ns.div_ceil(limit);
        Limit { limit, interval_ns, tau_ns: interval_ns * limit }
    }

    fn increment(&self, cost: u64) -> u64 {
        cost.saturating_mul(self.interval_ns)
    }

    /// ns from `now` until `cost` units fit (0: now), `None`: never.
    pub fn wait_ns(&self, tat: u64, now: u64, cost: u64) -> Option<u64> {
        if cost > self.limit {
            return None;
        }
        let due = tat.max(now) + self.increment(cost);
        Some(due.saturating_sub(self.tau_ns).saturating_sub(now))
    }

    /// Units that could be spent at `now`.
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let free = (now + self.tau_ns).saturating_sub(tat);
        (free / self.interval_ns).min(self.limit)
    }

    pub fn decision(&self, allowed: bool, tat: u64, now: u64, retry_after_ns: Option<u64>) -> Decision {
        Decision {
            allowed,
            limit: self.limit,
            remaining: self.remaining(tat, now),
            reset_after_ns: tat.saturating_sub(now),
            retry_after_ns,
        }
    }

    /// The pure GCRA step: the new TAT if `cost` is admitted, and the decision.
    pub fn step(&self, tat: u64, now: u64, cost: u64) -> (Option<u64>, Decision) {
        match self.wait_ns(tat, now, cost) {
            Some(0) => {
                let new_tat = tat.max(now) + self.increment(cost);
                (Some(new_tat), self.decision(true, new_tat, now, Some(0)))
            }
            wait => (None, self.decision(false, tat, now, wait)),
        }
    }

    /// The TAT after charging (`delta > 0`) or refunding (`delta < 0`) units
    /// with no refusal; a refund never moves the TAT below `now`.
    pub fn adjusted(&self, tat: u64, now: u64, delta: i64) -> u64 {
        if self.limit == 0 || delta == 0 {
            return tat;
        }
        let amount = self.increment(delta.unsigned_abs()).min(MAX_PERIOD_NS.saturating_mul(4));
        if delta > 0 {
            tat.max(now).saturating_add(amount)
        } else if tat <= now {
            tat
        } else {
            tat.saturating_sub(amount).max(now)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// ns until the key is fully replenished.
    pub reset_after_ns: u64,
    /// ns until this request would be allowed; 0 when allowed, `None`: never.
    pub retry_after_ns: Option<u64>,
}

/// Wall-clock time, CLOCK_REALTIME (vDSO, no syscall), ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Seconds since the epoch (as Python's `time.time()`) to ns.
pub fn seconds_to_ns(now: f64) -> Result<u64, RateLimitError> {
    if !(now.is_finite() && now >= 0.0 && now < 1e10) {
        return Err(RateLimitError::Argument("now must be seconds since the epoch, as time.time() gives"));
    }
    Ok((now * 1e9).round() as u64)
}

#[repr(C)]
struct Slot {
    key: AtomicU64,
    tat: AtomicU64,
}

pub struct RateLimiter {
    map: MmapRaw,
    capacity: u64,
    sip: (u64, u64),
    path: PathBuf,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> RateLimitError + 'a {
    move |err| RateLimitError::Io { path: path.to_path_buf(), what, err }
}

fn header_bytes(capacity: u64, k0: u64, k1: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SLOT_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&capacity.to_le_bytes());
    h[24..32].copy_from_slice(&k0.to_le_bytes());
    h[32..40].copy_from_slice(&k1.to_le_bytes());
    h
}

fn file_len(capacity: u64) -> u64 {
    HEADER_LEN as u64 + capacity * SLOT_LEN as u64
}

impl RateLimiter {
    /// Opens the table at `path`, creating it (race-free) if it is missing.
    pub fn open(path: &Path, capacity: u64) -> Result<RateLimiter, RateLimitError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RateLimitError::Argument("capacity must be between 1 and 2**26"));
        }
        for _ in 0..8 {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => return RateLimiter::map(file, path, capacity),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => RateLimiter::create(path, capacity)?,
                Err(e) => return Err(io_err(path, "open")(e)),
            }
        }
        // Only if someone keeps deleting the file as we create it.
        Err(RateLimitError::Invalid { path: path.to_path_buf(), why: "it vanished while being created".into() })
    }

    fn create(path: &Path, capacity: u64) -> Result<(), RateLimitError> {
        let mut seed = [0u8; 24];
        getrandom::fill(&mut seed).map_err(|e| RateLimitError::Io {
            path: path.to_path_buf(),
            what: "seed",
            err: std::io::Error::other(e.to_string()),
        })?;
        let k0 = u64::from_le_bytes(seed[0..8].try_into().unwrap());
        let k1 = u64::from_le_bytes(seed[8..16].try_into().unwrap());
        let tag = u64::from_le_bytes(seed[16..24].try_into().unwrap());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.{tag:016x}.tmp", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err(path, "create"))?;
            f.set_len(file_len(capacity)).map_err(io_err(path, "size"))?;
            f.write_all(&header_bytes(capacity, k0, k1)).map_err(io_err(path, "write"))?;
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                // Another process published its table first: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(io_err(path, "publish")(e)),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn map(file: File, path: &Path, capacity: u64) -> Result<RateLimiter, RateLimitError> {
        let invalid = |why: String| RateLimitError::Invalid { path: path.to_path_buf(), why };
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        if len < HEADER_LEN as u64 {
            return Err(invalid(format!("{len} bytes is shorter than the header")));
        }
        let map = MmapOptions::new().map_raw(&file).map_err(io_err(path, "map"))?;
        // SAFETY: the mapping is at least HEADER_LEN bytes and page-aligned.
        let header: [u8; HEADER_LEN] = unsafe { std::ptr::read(map.as_ptr() as *const [u8; HEADER_LEN]) };
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let slot_len = u32::from_le_bytes(header[12..16].try_into().unwrap());
        if version != VERSION || slot_len as usize != SLOT_LEN {
            return Err(invalid(format!("version {version}, this build reads {VERSION}")));
        }
        let file_capacity = word(16);
        if file_capacity != capacity {
            return Err(invalid(format!(
                "it holds {file_capacity} keys, {capacity} were asked for; remove it to resize"
            )));
        }
        if len != file_len(capacity) {
            return Err(invalid(format!("{len} bytes, expected {}", file_len(capacity))));
        }
        Ok(RateLimiter { map, capacity, sip: (word(24), word(32)), path: path.to_path_buf() })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn hash(&self, key: &str) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.sip.0, self.sip.1);
        h.write(key.as_bytes());
        h.finish().max(1) // 0 marks a free slot
    }

    fn slot_at(&self, index: u64) -> &Slot {
        debug_assert!(index < self.capacity);
        // SAFETY: in bounds (checked at open), 16-byte aligned (page-aligned
        // map + 64-byte header), and only ever accessed through atomics.
        unsafe { &*(self.map.as_ptr().add(HEADER_LEN + index as usize * SLOT_LEN) as *const Slot) }
    }

    /// The key's slot; with `claim`, takes a free one if the key has none.
    fn find(&self, h: u64, claim: bool) -> Result<Option<&Slot>, RateLimitError> {
        // Multiply-shift maps the hash onto 0..capacity without a division.
        let mut i = ((h as u128 * self.capacity as u128) >> 64) as u64;
        for _ in 0..self.capacity {
            let slot = self.slot_at(i);
            match slot.key.load(Ordering::Acquire) {
                k if k == h => return Ok(Some(slot)),
                0 if !claim => return Ok(None),
                0 => match slot.key.compare_exchange(0, h, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(Some(slot)),
                    Err(k) if k == h => return Ok(Some(slot)),
                    Err(_) => {}
                },
                _ => {}
            }
            i += 1;
            if i == self.capacity {
                i = 0;
            }
        }
        if claim {
            Err(RateLimitError::Full { capacity: self.capacity })
        } else {
            Ok(None)
        }
    }

    fn tat_of(&self, key: &str) -> Result<u64, RateLimitError> {
        Ok(self.find(self.hash(key), false)?.map_or(0, |s| s.tat.load(Ordering::Acquire)))
    }

    fn acquire_slot(slot: &Slot, limit: &Limit, cost: u64, now: u64) -> Decision {
        let mut tat = slot.tat.load(Ordering::Acquire);
        loop {
            match limit.step(tat, now, cost) {
                (Some(new_tat), decision) if new_tat != tat => {
                    match slot.tat.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => return decision,
                        Err(seen) => tat = seen,
                    }
                }
                (_, decision) => return decision,
            }
        }
    }

    fn adjust_slot(slot: &Slot, limit: &Limit, delta: i64, now: u64) {
        let mut tat = slot.tat.load(Ordering::Acquire);
        loop {
            let new_tat = limit.adjusted(tat, now, delta);
            if new_tat == tat {
                return;
            }
            match slot.tat.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => tat = seen,
            }
        }
    }

    /// Spends `cost` units of `key` if they fit.
    pub fn acquire(&self, key: &str, limit: &Limit, cost: u64, now: u64) -> Result<Decision, RateLimitError> {
        if cost > limit.limit {
            // Never allowed: answer without claiming a slot.
            return Ok(limit.decision(false, self.tat_of(key)?, now, None));
        }
        let slot = self.find(self.hash(key), true)?.expect("claimed");
        Ok(RateLimiter::acquire_slot(slot, limit, cost, now))
    }

    /// What a request of one unit would get, changing nothing.
    pub fn peek(&self, key: &str, limit: &Limit, now: u64) -> Result<Decision, RateLimitError> {
        let tat = self.tat_of(key)?;
        let wait = limit.wait_ns(tat, now, 1);
        Ok(limit.decision(wait == Some(0), tat, now, wait))
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units without refusal.
    pub fn adjust(&self, key: &str, limit: &Limit, delta: i64, now: u64) -> Result<(), RateLimitError> {
        if delta == 0 || limit.limit == 0 {
            return Ok(());
        }
        if let Some(slot) = self.find(self.hash(key), delta > 0)? {
            RateLimiter::adjust_slot(slot, limit, delta, now);
        }
        Ok(())
    }

    /// All-or-nothing over several limits. Each limit is charged in order; on
    /// the first refusal the charges already made are refunded, and every
    /// decision of the group comes back with `allowed == false`,
    /// `retry_after` being the wait for that limit alone (0 if it had room).
    /// Between charge and refund a concurrent request may see the transient
    /// charge and be refused: an error on the safe side, never an over-admission.
    pub fn acquire_all(&self, requests: &[(&str, Limit, u64)], now: u64) -> Result<Vec<Decision>, RateLimitError> {
        // Claim every slot first, so a full table charges nothing.
        let mut slots = Vec::with_capacity(requests.len());
        for (key, _, _) in requests {
            slots.push(self.find(self.hash(key), true)?.expect("claimed"));
        }
        let mut decisions = Vec::with_capacity(requests.len());
        for (i, ((_, limit, cost), slot)) in requests.iter().zip(&slots).enumerate() {
            let d = RateLimiter::acquire_slot(slot, limit, *cost, now);
            if !d.allowed {
                for ((_, limit, cost), slot) in requests[..i].iter().zip(&slots) {
                    RateLimiter::adjust_slot(slot, limit, -(*cost as i64), now);
                }
                return Ok(requests
                    .iter()
                    .zip(&slots)
                    .map(|((_, limit, cost), slot)| {
                        let tat = slot.tat.load(Ordering::Acquire);
                        limit.decision(false, tat, now, limit.wait_ns(tat, now, *cost))
                    })
                    .collect());
            }
            decisions.push(d);
        }
        Ok(decisions)
    }

    /// Forgets the key's spending: it is fresh again.
    pub fn reset(&self, key: &str) -> Result<(), RateLimitError> {
        if let Some(slot) = self.find(self.hash(key), false)? {
            slot.tat.store(0, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 1_700_000_000 * S;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cheapest-rl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("table")
    }

    #[test]
    fn fresh_key_bursts_limit_then_one_per_interval() {
        let rl = RateLimiter::open(&tmp("burst"), 64).unwrap();
        let lim = Limit::new(10, 60.0).unwrap();
        assert_eq!(lim.interval_ns, 6 * S);
        for i in 0..10 {
            let d = rl.acquire("k", &lim, 1, NOW).unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i);
            assert_eq!(d.retry_after_ns, Some(0));
        }
        let d = rl.acquire("k", &lim, 1, NOW).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after_ns, Some(6 * S));
        assert_eq!(d.reset_after_ns, 60 * S);
        assert!(!rl.acquire("k", &lim, 1, NOW + 6 * S - 1).unwrap().allowed);
        assert!(rl.acquire("k", &lim, 1, NOW + 6 * S).unwrap().allowed);
        assert!(!rl.acquire("k", &lim, 1, NOW + 6 * S).unwrap().allowed);
        // Another key is independent.
        assert!(rl.acquire("other", &lim, 10, NOW).unwrap().allowed);
    }

    #[test]
    fn cost_above_limit_and_zero_limit_never_pass() {
        let rl = RateLimiter::open(&tmp("never"), 8).unwrap();
        let lim = Limit::new(5, 1.0).unwrap();
        let d = rl.acquire("k", &lim, 6, NOW).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, None);
        assert_eq!(d.remaining, 5);
        let zero = Limit::new(0, 1.0).unwrap();
        let d = rl.acquire("k", &zero, 1, NOW).unwrap();
        assert_eq!((d.allowed, d.remaining, d.retry_after_ns), (false, 0, None));
        assert!(rl.acquire("k", &lim, 5, NOW).unwrap().allowed);
    }

    #[test]
    fn non_divisible_period_keeps_the_full_burst() {
        let lim = Limit::new(7, 60.0).unwrap();
        let mut tat = 0;
        for _ in 0..7 {
            let (t, d) = lim.step(tat, NOW, 1);
            assert!(d.allowed);
            tat = t.unwrap();
        }
        assert!(!lim.step(tat, NOW, 1).1.allowed);
    }

    #[test]
    fn adjust_refunds_to_now_at_most_and_charges_without_refusal() {
        let rl = RateLimiter::open(&tmp("adjust"), 8).unwrap();
        let lim = Limit::new(100, 100.0).unwrap();
        assert!(rl.acquire("k", &lim, 100, NOW).unwrap().allowed);
        rl.adjust("k", &lim, -30, NOW).unwrap();
        assert_eq!(rl.peek("k", &lim, NOW).unwrap().remaining, 30);
        rl.adjust("k", &lim, -1000, NOW).unwrap();
        assert_eq!(rl.peek("k", &lim, NOW).unwrap().remaining, 100);
        rl.adjust("k", &lim, 150, NOW).unwrap();
        let d = rl.peek("k", &lim, NOW).unwrap();
        assert_eq!((d.allowed, d.remaining, d.retry_after_ns), (false, 0, Some(51 * S)));
        assert_eq!(d.reset_after_ns, 150 * S);
        rl.reset("k").unwrap();
        assert_eq!(rl.peek("k", &lim, NOW).unwrap().remaining, 100);
    }

    #[test]
    fn acquire_all_charges_nothing_when_one_refuses() {
        let rl = RateLimiter::open(&tmp("all"), 8).unwrap();
        let rpm = Limit::new(10, 60.0).unwrap();
        let tpm = Limit::new(1000, 60.0).unwrap();
        let ds = rl.acquire_all(&[("rpm", rpm, 1), ("tpm", tpm, 900)], NOW).unwrap();
        assert!(ds.iter().all(|d| d.allowed));
        let ds = rl.acquire_all(&[("rpm", rpm, 1), ("tpm", tpm, 200)], NOW).unwrap();
        assert!(ds.iter().all(|d| !d.allowed));
        assert_eq!(ds[0].retry_after_ns, Some(0));
        assert_eq!(ds[0].remaining, 9);
        assert_eq!(ds[1].remaining, 100);
        assert_eq!(ds[1].retry_after_ns, Some(6 * S));
        assert_eq!(rl.peek("rpm", &rpm, NOW).unwrap().remaining, 9);
    }

    #[test]
    fn full_table_is_an_error_and_reopen_sees_state() {
        let path = tmp("full");
        let rl = RateLimiter::open(&path, 4).unwrap();
        let lim = Limit::new(3, 1.0).unwrap();
        for k in ["a", "b", "c", "d"] {
            rl.acquire(k, &lim, 3, NOW).unwrap();
        }
        assert!(matches!(rl.acquire("e", &lim, 1, NOW), Err(RateLimitError::Full { capacity: 4 })));
        // Peeking at an unknown key of a full table is not an error.
        assert_eq!(rl.peek("e", &lim, NOW).unwrap().remaining, 3);
        let again = RateLimiter::open(&path, 4).unwrap();
        assert!(!again.acquire("a", &lim, 1, NOW).unwrap().allowed);
        assert!(matches!(RateLimiter::open(&path, 8), Err(RateLimitError::Invalid { .. })));
    }

    #[test]
    fn threads_never_over_admit() {
        let rl = std::sync::Arc::new(RateLimiter::open(&tmp("threads"), 16).unwrap());
        let lim = Limit::new(1000, 1.0).unwrap();
        let admitted: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let rl = rl.clone();
                    s.spawn(move || (0..2000).filter(|_| rl.acquire("k", &lim, 1, NOW).unwrap().allowed).count() as u64)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn bad_arguments() {
        assert!(Limit::new(-1, 1.0).is_err());
        assert!(Limit::new(1, 0.0).is_err());
        assert!(Limit::new(1, f64::NAN).is_err());
        assert!(Limit::new(1, f64::INFINITY).is_err());
        assert!(seconds_to_ns(-1.0).is_err());
        assert!(RateLimiter::open(&tmp("cap"), 0).is_err());
    }
}
