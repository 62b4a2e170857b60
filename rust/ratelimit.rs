//! GCRA rate limiting shared by every worker process of one host.
//!
//! # Why a memory-mapped table of atomics
//!
//! Every request makes one or two decisions (RPM, TPM), and several Granian
//! workers must agree on them. The state is one number per limit, the
//! theoretical arrival time (TAT), so a decision is a compare-and-swap in
//! memory shared by the processes: no lock, no syscall, no page write-back on
//! the hot path (the file lives in the page cache; nothing forces it to disk).
//! A process that dies mid-decision leaves no lock held. The alternative, an
//! LMDB write transaction per decision, serialises all workers on LMDB's
//! single writer lock and pays a commit (an msync or fsync, or with
//! `sync=False` still a meta-page update) per request.
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
//! this table), then `capacity` 16-byte slots, each one 128-bit atomic word:
//! the owner word (a 62-bit tag of the key, the top bits of its SipHash-1-3
//! under the per-table random key, so clients cannot aim collisions at one
//! probe sequence, and a 2-bit state) and the TAT in ns. Two keys with the
//! same tag would share a limit; at 65536 keys that has a probability of
//! about 5e-10. A key lives within `PROBE_WINDOW` slots of its home slot
//! (multiply-shift of the tag), found by linear probing.
//!
//! # Why slots are reclaimed, and how without a lock
//!
//! Keys come and go (rotated, revoked, idle), so a table whose slots were
//! never released would fill up and then refuse every new key of every
//! tenant. A slot whose TAT is in the past carries no information: GCRA
//! reads `max(tat, now)`, so it decides exactly as for a fresh key. Such a
//! slot may be taken by another key, but only once its TAT is
//! `RECLAIM_AFTER_NS` in the past: a decision computed from a `now` read a
//! little earlier (a descheduled worker) must not see a fresh key where the
//! old TAT would still have held it back. `forget` frees a slot at once.
//!
//! Every change of a slot is one 128-bit compare-and-swap of owner and TAT
//! together, so two processes never both take a slot, and a takeover fails
//! if the old owner charged its limit in between (its state is never lost).
//!
//! Deleting from linear probing needs care: a lookup stops at the first
//! never-used slot, so emptying a slot in the middle of a probe sequence
//! would hide the keys behind it. Slots are therefore never emptied; a freed
//! slot becomes a tombstone, which lookups pass over and inserts reuse, and
//! a reclaimed slot changes owner in place.
//!
//! Reuse brings the one hard case: two processes inserting the same new key
//! may pick different free slots (one saw a slot become free after the
//! other passed it), and two slots for one key would each admit the full
//! limit. So an insert is two-phase. A slot is first *claimed* for the key
//! (not yet usable); then the claimer scans the key's probe window: if the
//! key already has a live slot, claims are turned into tombstones and the
//! live slot is used; otherwise every claim but the first in probe order is
//! turned into a tombstone and only then the first is made live. Each of
//! these is a compare-and-swap from the value seen in the scan, and all are
//! sequentially consistent, so of two claims the later claimer's scan sees
//! the earlier one; whichever way the races go, at most one slot of a key is
//! ever live (a claim can become live only while no other claim or live
//! slot of the key was seen, and any claim made after that scan will see it).
//! A claim left by a process that died between the two phases is reclaimed
//! like any stale slot.
//!
//! # Creation
//!
//! The file is built whole under a temporary name and published with
//! `link(2)`, which fails if the path already exists: concurrent creators
//! all end up mapping the one file that won, and nobody ever sees a
//! half-written header. Both are owner-only (0600) from the moment they are
//! created, as is any missing directory above them (0700). A table of
//! another version is refused: it holds only rate-limit state, so the fix
//! is to remove it.
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

use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};
use portable_atomic::AtomicU128;
use siphasher::sip::SipHasher13;

const MAGIC: u64 = u64::from_le_bytes(*b"CHPGCRA1");
/// 2: reclaimable slots (owner word = tag and state). Version 1 tables are refused.
const VERSION: u32 = 2;
const HEADER_LEN: usize = 64;
const SLOT_LEN: usize = 16;
pub const DEFAULT_CAPACITY: u64 = 65_536;
/// 2^26 slots is a 1 GiB file; more is a mistake.
pub const MAX_CAPACITY: u64 = 1 << 26;
/// Longest period: about 31 years, so every sum below fits in a `u64`.
pub const MAX_PERIOD_NS: u64 = 1_000_000_000 * 1_000_000_000;
/// Largest limit (about 1.1e12 units per period).
pub const MAX_LIMIT: u64 = 1 << 40;
/// A key lives at most this many slots past its home slot (the whole table
/// when it is smaller). It bounds the work of a lookup that finds nothing in
/// a table with no never-used slot left; "full" means this window of the
/// key holds only live limits, which with a uniform hash happens only when
/// the table is nearly full.
pub const PROBE_WINDOW: u64 = 256;
/// A slot whose TAT is this long past may be taken by another key. Far more
/// than any pause between reading the clock and deciding; short enough that
/// an idle key's slot is free again soon after its limit has refilled.
pub const RECLAIM_AFTER_NS: u64 = 10 * 1_000_000_000;

// Slot states: the low two bits of the owner word, the key's tag above them.
/// Never used since the table was made: ends every probe sequence.
const EMPTY: u64 = 0;
/// Freed (forgotten, or a losing claim): reusable, but a probe goes on past it.
const TOMBSTONE: u64 = 1;
/// Taken for a key by an insert that has not yet settled.
const CLAIMED: u64 = 2;
/// The key's limit.
const LIVE: u64 = 3;
const STATE_BITS: u32 = 2;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;
#[derive(Debug)]
pub enum RateLimitError {
    /// A bad argument (limit, period, cost, now): a `ValueError` in Python.
    Argument(&'static str),
    Io { path: PathBuf, what: &'static str, err: std::io::Error },
    /// The file is not a table of this version, or its capacity differs.
    Invalid { path: PathBuf, why: String },
    /// Every slot the key may use holds a live limit: a 503, not a 500.
    Full { capacity: u64 },
    /// This machine cannot share the table safely between processes.
    Unsupported(&'static str),
}

impl std::fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateLimitError::Argument(m) => write!(f, "{m}"),
            RateLimitError::Io { path, what, err } => write!(f, "cannot {what} rate-limit table {}: {err}", path.display()),
            RateLimitError::Invalid { path, why } => write!(f, "{} is not a usable rate-limit table: {why}", path.display()),
            RateLimitError::Full { capacity } => write!(
                f,
                "rate-limit table is full: every slot this key may use ({capacity} in the table) holds a live limit"
            ),
            RateLimitError::Unsupported(m) => write!(f, "{m}"),
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
        let due = tat.max(now).saturating_add(self.increment(cost));
        Some(due.saturating_sub(self.tau_ns).saturating_sub(now))
    }

    /// Units that could be spent at `now`.
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let free = now.saturating_add(self.tau_ns).saturating_sub(tat);
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
                let new_tat = tat.max(now).saturating_add(self.increment(cost));
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
    if !(0.0..1e10).contains(&now) {
        return Err(RateLimitError::Argument("now must be seconds since the epoch, as time.time() gives"));
    }
    Ok((now * 1e9).round() as u64)
}


/// One slot as read or written in a single atomic step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    owner: u64,
    tat: u64,
}

const FREED: Slot = Slot { owner: TOMBSTONE, tat: 0 };

impl Slot {
    fn pack(self) -> u128 {
        self.owner as u128 | (self.tat as u128) << 64
    }

    fn unpack(word: u128) -> Slot {
        Slot { owner: word as u64, tat: (word >> 64) as u64 }
    }

    fn state(self) -> u64 {
        self.owner & STATE_MASK
    }

    /// A claim or a live limit whose TAT is long enough past to be taken.
    fn stale(self, now: u64) -> bool {
        self.state() >= CLAIMED && self.tat.saturating_add(RECLAIM_AFTER_NS) <= now
    }
}

fn owner(tag: u64, state: u64) -> u64 {
    tag << STATE_BITS | state
}

/// What settling a key's claims will do, from one scan: use the live slot
/// (freeing every claim), or make the first claim live.
struct Settle {
    live: Option<(u64, u64)>,
    claims: Vec<(u64, Slot)>,
}

/// What one pass over a key's probe window saw.
struct Scan {
    /// The key's live slot: index and TAT.
    live: Option<(u64, u64)>,
    /// Some insert of this key has claimed a slot and not settled.
    claimed: bool,
    /// The first slot an insert may take, as it was seen.
    reusable: Option<(u64, Slot)>,
}

pub struct RateLimiter {
    map: MmapRaw,
    capacity: u64,
    window: u64,
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

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

impl RateLimiter {
    /// Opens the table at `path`, creating it (race-free) if it is missing.
    pub fn open(path: &Path, capacity: u64) -> Result<RateLimiter, RateLimitError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RateLimitError::Argument("capacity must be between 1 and 2**26"));
        }
        // The fallback for CPUs without a 128-bit compare-and-swap is a lock
        // inside this process: useless between processes.
        if !AtomicU128::is_lock_free() {
            return Err(RateLimitError::Unsupported("this CPU has no 128-bit compare-and-swap"));
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
        let (k0, k1, tag) = (le_u64(&seed, 0), le_u64(&seed, 8), le_u64(&seed, 16));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Only the directories this creates get the mode; existing ones are left as they are.
            DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(path, "create the directory of"))?;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.{tag:016x}.tmp", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(path, "create"))?;
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
        if le_u64(&header, 0) != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let version = le_u32(&header, 8);
        let slot_len = le_u32(&header, 12);
        if version != VERSION || slot_len as usize != SLOT_LEN {
            return Err(invalid(format!(
                "format version {version}, this build reads {VERSION}; it holds only rate-limit state, so remove it"
            )));
        }
        let file_capacity = le_u64(&header, 16);
        if file_capacity != capacity {
            return Err(invalid(format!(
                "it holds {file_capacity} keys, {capacity} were asked for; remove it to resize"
            )));
        }
        if len != file_len(capacity) {
            return Err(invalid(format!("{len} bytes, expected {}", file_len(capacity))));
        }
        let window = capacity.min(PROBE_WINDOW);
        Ok(RateLimiter { map, capacity, window, sip: (le_u64(&header, 24), le_u64(&header, 32)), path: path.to_path_buf() })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key's 62-bit tag.
    fn tag(&self, key: &str) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.sip.0, self.sip.1);
        h.write(key.as_bytes());
        h.finish() >> STATE_BITS
    }

    fn home(&self, tag: u64) -> u64 {
        // Multiply-shift maps the tag onto 0..capacity without a division.
        ((tag as u128 * self.capacity as u128) >> (64 - STATE_BITS)) as u64
    }

    /// The slot `distance` steps along the probe sequence that starts at `home`.
    fn index(&self, home: u64, distance: u64) -> u64 {
        let i = home + distance;
        if i >= self.capacity {
            i - self.capacity
        } else {
            i
        }
    }

    fn cell(&self, index: u64) -> &AtomicU128 {
        debug_assert!(index < self.capacity);
        // SAFETY: in bounds (checked at open), 16-byte aligned (page-aligned
        // map + 64-byte header), and only ever accessed through atomics.
        unsafe { AtomicU128::from_ptr(self.map.as_mut_ptr().add(HEADER_LEN + index as usize * SLOT_LEN) as *mut u128) }
    }

    fn load(&self, index: u64) -> Slot {
        Slot::unpack(self.cell(index).load(SeqCst))
    }

    /// Replaces `old` by `new` if the slot still holds `old`, owner and TAT alike.
    fn swap(&self, index: u64, old: Slot, new: Slot) -> Result<(), Slot> {
        self.cell(index).compare_exchange(old.pack(), new.pack(), SeqCst, SeqCst).map(|_| ()).map_err(Slot::unpack)
    }

    /// One pass over the key's probe window, up to its first never-used slot.
    fn scan(&self, tag: u64, now: u64) -> Scan {
        let (live, claimed) = (owner(tag, LIVE), owner(tag, CLAIMED));
        let home = self.home(tag);
        let mut scan = Scan { live: None, claimed: false, reusable: None };
        for distance in 0..self.window {
            let i = self.index(home, distance);
            let slot = self.load(i);
            if slot.owner == live {
                scan.live = Some((i, slot.tat));
                break;
            }
            if slot.owner == claimed {
                scan.claimed = true;
            } else if scan.reusable.is_none() && (slot.owner == EMPTY || slot.owner == TOMBSTONE || slot.stale(now)) {
                scan.reusable = Some((i, slot));
            }
            if slot.owner == EMPTY {
                break;
            }
        }
        scan
    }

    /// The key's live slot (index and TAT), if it has one.
    fn lookup(&self, key: &str) -> Option<(u64, u64)> {
        // At `now` 0 nothing is stale, which a lookup does not need anyway.
        self.scan(self.tag(key), 0).live
    }

    /// The key's live slot, inserting the key (two-phase, see the module doc)
    /// if it has none.
    fn live_or_insert(&self, tag: u64, now: u64) -> Result<(u64, u64), RateLimitError> {
        loop {
            if let Some(found) = self.insert_after(tag, now, self.scan(tag, now))? {
                return Ok(found);
            }
        }
    }

    /// One try of `live_or_insert` from what `scan` saw; `None`: scan again.
    fn insert_after(&self, tag: u64, now: u64, scan: Scan) -> Result<Option<(u64, u64)>, RateLimitError> {
        if !scan.claimed {
            // (A claim seen before the live slot is left for `settle` to free.)
            if let Some(found) = scan.live {
                return Ok(Some(found));
            }
            let Some((i, seen)) = scan.reusable else {
                return Err(RateLimitError::Full { capacity: self.capacity });
            };
            if self.swap(i, seen, Slot { owner: owner(tag, CLAIMED), tat: now }).is_err() {
                return Ok(None);
            }
        }
        Ok(self.settle(tag))
    }

    /// Turns the claims of `tag` into one live slot; `None` when a race
    /// changed what the scan saw (the caller scans again).
    fn settle(&self, tag: u64) -> Option<(u64, u64)> {
        self.settle_as_planned(tag, self.plan_settle(tag))
    }

    /// The first half of `settle`: one scan of the key's window.
    fn plan_settle(&self, tag: u64) -> Settle {
        let (live, claimed) = (owner(tag, LIVE), owner(tag, CLAIMED));
        let home = self.home(tag);
        let mut plan = Settle { live: None, claims: Vec::new() };
        for distance in 0..self.window {
            let i = self.index(home, distance);
            let slot = self.load(i);
            // Past a live slot too: every claim of a key that has one is freed.
            if slot.owner == live {
                plan.live = Some((i, slot.tat));
            } else if slot.owner == claimed {
                plan.claims.push((i, slot));
            } else if slot.owner == EMPTY {
                break;
            }
        }
        plan
    }

    /// The second half: every step is a compare-and-swap from what the scan
    /// saw, and any failure sends the caller back to scanning.
    fn settle_as_planned(&self, tag: u64, plan: Settle) -> Option<(u64, u64)> {
        if let Some(found) = plan.live {
            for &(i, slot) in &plan.claims {
                let _ = self.swap(i, slot, FREED);
            }
            return Some(found);
        }
        let (&(first, slot), later) = plan.claims.split_first()?;
        // Later claims go first: once one of them is gone it can never
        // become live, so the first claim is the only one that can.
        for &(i, other) in later {
            self.swap(i, other, FREED).ok()?;
        }
        // A fresh key: its TAT is the claim's time, which `max(tat, now)` ignores.
        self.swap(first, slot, Slot { owner: owner(tag, LIVE), tat: slot.tat }).ok()?;
        Some((first, slot.tat))
    }

    /// Runs `step` on the key's TAT until its answer is stored: `step` gives
    /// the new TAT (`None`: unchanged) and the result to return. Without
    /// `insert`, a key with no slot is left alone and `None` comes back.
    fn update<R>(
        &self,
        key: &str,
        now: u64,
        insert: bool,
        mut step: impl FnMut(u64) -> (Option<u64>, R),
    ) -> Result<Option<R>, RateLimitError> {
        let tag = self.tag(key);
        let live = owner(tag, LIVE);
        loop {
            let found = if insert { Some(self.live_or_insert(tag, now)?) } else { self.scan(tag, now).live };
            let Some((i, mut tat)) = found else { return Ok(None) };
            loop {
                let (new_tat, result) = step(tat);
                let Some(new_tat) = new_tat.filter(|&t| t != tat) else { return Ok(Some(result)) };
                match self.swap(i, Slot { owner: live, tat }, Slot { owner: live, tat: new_tat }) {
                    Ok(()) => return Ok(Some(result)),
                    Err(seen) if seen.owner == live => tat = seen.tat,
                    // Forgotten or reclaimed meanwhile: find the key again.
                    Err(_) => break,
                }
            }
        }
    }

    fn tat_of(&self, key: &str) -> u64 {
        self.lookup(key).map_or(0, |(_, tat)| tat)
    }

    fn charge(&self, key: &str, limit: &Limit, cost: u64, now: u64) -> Result<Decision, RateLimitError> {
        self.update(key, now, true, |tat| limit.step(tat, now, cost))?
            .ok_or(RateLimitError::Full { capacity: self.capacity })
    }

    /// Spends `cost` units of `key` if they fit.
    pub fn acquire(&self, key: &str, limit: &Limit, cost: u64, now: u64) -> Result<Decision, RateLimitError> {
        if cost > limit.limit {
            // Never allowed: answer without taking a slot.
            return Ok(limit.decision(false, self.tat_of(key), now, None));
        }
        self.charge(key, limit, cost, now)
    }

    /// What a request of one unit would get, changing nothing.
    pub fn peek(&self, key: &str, limit: &Limit, now: u64) -> Result<Decision, RateLimitError> {
        let tat = self.tat_of(key);
        let wait = limit.wait_ns(tat, now, 1);
        Ok(limit.decision(wait == Some(0), tat, now, wait))
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units without refusal.
    pub fn adjust(&self, key: &str, limit: &Limit, delta: i64, now: u64) -> Result<(), RateLimitError> {
        if delta == 0 || limit.limit == 0 {
            return Ok(());
        }
        self.update(key, now, delta > 0, |tat| (Some(limit.adjusted(tat, now, delta)), ()))?;
        Ok(())
    }

    /// All-or-nothing over several limits. Each limit is charged in order; on
    /// the first refusal the charges already made are refunded, and every
    /// decision of the group comes back with `allowed == false`,
    /// `retry_after` being the wait for that limit alone (0 if it had room).
    /// Between charge and refund a concurrent request may see the transient
    /// charge and be refused: an error on the safe side, never an over-admission.
    pub fn acquire_all(&self, requests: &[(&str, Limit, u64)], now: u64) -> Result<Vec<Decision>, RateLimitError> {
        // Take every slot first, so a full table charges nothing.
        for (key, _, _) in requests {
            self.update(key, now, true, |_| (None, ()))?;
        }
        let mut decisions = Vec::with_capacity(requests.len());
        for (i, (key, limit, cost)) in requests.iter().enumerate() {
            let d = self.charge(key, limit, *cost, now)?;
            if !d.allowed {
                for (key, limit, cost) in &requests[..i] {
                    self.adjust(key, limit, 0i64.saturating_sub_unsigned(*cost), now)?;
                }
                return Ok(requests
                    .iter()
                    .map(|(key, limit, cost)| {
                        let tat = self.tat_of(key);
                        limit.decision(false, tat, now, limit.wait_ns(tat, now, *cost))
                    })
                    .collect());
            }
            decisions.push(d);
        }
        Ok(decisions)
    }

    /// Frees the key's slot at once (a revoked or deleted key): its spending
    /// is forgotten and the slot can serve another key. Whether it had one.
    pub fn forget(&self, key: &str) -> bool {
        let live = owner(self.tag(key), LIVE);
        while let Some((i, tat)) = self.lookup(key) {
            if self.swap(i, Slot { owner: live, tat }, FREED).is_ok() {
                return true;
            }
        }
        false
    }

    /// Slots in use (live or being inserted) and slots of those that are
    /// stale at `now`: for tests and an operator's look, O(capacity).
    pub fn occupancy(&self, now: u64) -> (u64, u64) {
        (0..self.capacity).map(|i| self.load(i)).filter(|s| s.state() >= CLAIMED).fold((0, 0), |(used, stale), s| {
            (used + 1, stale + u64::from(s.stale(now)))
        })
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
        assert!(rl.forget("k"));
        assert!(!rl.forget("k"));
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
        assert_eq!(rl.occupancy(NOW), (4, 0));
    }

    #[test]
    fn stale_slots_are_taken_only_after_the_margin() {
        let rl = RateLimiter::open(&tmp("stale"), 4).unwrap();
        let lim = Limit::new(3, 1.0).unwrap();
        for k in ["a", "b", "c", "d"] {
            assert!(rl.acquire(k, &lim, 3, NOW).unwrap().allowed);
        }
        // Every TAT is NOW + 1 s: past at NOW + 1 s, but not yet reclaimable.
        let tat = NOW + S + 2; // T = ceil(1e9 / 3) ns
        assert!(matches!(rl.acquire("e", &lim, 1, tat + RECLAIM_AFTER_NS - 1), Err(RateLimitError::Full { .. })));
        assert_eq!(rl.occupancy(tat + RECLAIM_AFTER_NS), (4, 4));
        let later = tat + RECLAIM_AFTER_NS;
        for k in ["e", "f", "g", "h"] {
            assert!(rl.acquire(k, &lim, 3, later).unwrap().allowed, "{k}");
        }
        assert!(matches!(rl.acquire("a", &lim, 1, later), Err(RateLimitError::Full { .. })));
        assert_eq!(rl.occupancy(later), (4, 0));
        // A key that was reclaimed starts afresh, as its old TAT allowed anyway.
        let much_later = later + 2 * RECLAIM_AFTER_NS;
        assert_eq!(rl.acquire("a", &lim, 1, much_later).unwrap().remaining, 2);
    }

    #[test]
    fn forget_frees_the_slot_at_once() {
        let rl = RateLimiter::open(&tmp("forget"), 2).unwrap();
        let lim = Limit::new(5, 60.0).unwrap();
        assert!(rl.acquire("a", &lim, 5, NOW).unwrap().allowed);
        assert!(rl.acquire("b", &lim, 5, NOW).unwrap().allowed);
        assert!(matches!(rl.acquire("c", &lim, 1, NOW), Err(RateLimitError::Full { .. })));
        assert!(rl.forget("a"));
        assert_eq!(rl.acquire("c", &lim, 1, NOW).unwrap().remaining, 4);
        // "b" is untouched, "a" is fresh (and has no slot until it spends).
        assert!(!rl.acquire("b", &lim, 1, NOW).unwrap().allowed);
        assert_eq!(rl.peek("a", &lim, NOW).unwrap().remaining, 5);
        assert!(!rl.forget("a"));
        // Tombstones do not hide the keys behind them.
        assert!(rl.forget("c"));
        assert!(!rl.acquire("b", &lim, 1, NOW).unwrap().allowed);
        assert!(rl.acquire("a", &lim, 5, NOW).unwrap().allowed);
        assert!(!rl.acquire("a", &lim, 1, NOW).unwrap().allowed);
    }

    #[test]
    fn refunds_never_take_a_slot_and_charges_do() {
        let rl = RateLimiter::open(&tmp("claims"), 1).unwrap();
        let lim = Limit::new(5, 60.0).unwrap();
        rl.adjust("a", &lim, -3, NOW).unwrap();
        assert_eq!(rl.occupancy(NOW), (0, 0));
        assert_eq!(rl.acquire("a", &lim, 6, NOW).unwrap().retry_after_ns, None);
        assert_eq!(rl.occupancy(NOW), (0, 0));
        rl.adjust("a", &lim, 3, NOW).unwrap();
        assert_eq!(rl.occupancy(NOW), (1, 0));
        assert!(matches!(rl.acquire_all(&[("a", lim, 1), ("b", lim, 1)], NOW), Err(RateLimitError::Full { .. })));
        assert_eq!(rl.peek("a", &lim, NOW).unwrap().remaining, 2, "a full table charges nothing");
    }

    #[test]
    fn an_older_table_is_refused_with_the_fix_in_the_message() {
        let path = tmp("v1");
        let mut header = header_bytes(4, 1, 2);
        header[8..12].copy_from_slice(&1u32.to_le_bytes());
        let mut bytes = header.to_vec();
        bytes.resize(file_len(4) as usize, 0);
        std::fs::write(&path, bytes).unwrap();
        let err = RateLimiter::open(&path, 4).err().unwrap().to_string();
        assert!(err.contains("version 1") && err.contains("remove it"), "{err}");
    }

    #[test]
    fn files_and_directories_are_owner_only_from_creation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp("modes").with_file_name("new").join("deeper");
        let path = dir.join("table");
        RateLimiter::open(&path, 4).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(dir.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn the_tag_never_collides_with_the_state_words() {
        let rl = RateLimiter::open(&tmp("tags"), 8).unwrap();
        for i in 0..10_000 {
            let tag = rl.tag(&format!("k{i}"));
            assert!(tag < 1 << 62);
            assert!(rl.home(tag) < 8);
            assert!(owner(tag, LIVE) != EMPTY && owner(tag, LIVE) != TOMBSTONE);
        }
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

    /// Two keys whose home slot is 0 in a table of `capacity`.
    fn keys_homed_at_zero(rl: &RateLimiter) -> (String, String) {
        let mut homed = (0..).map(|i| format!("k{i}")).filter(|k| rl.home(rl.tag(k)) == 0);
        (homed.next().unwrap(), homed.next().unwrap())
    }

    fn live_slots(rl: &RateLimiter, key: &str) -> usize {
        let live = owner(rl.tag(key), LIVE);
        (0..rl.capacity).filter(|&i| rl.load(i).owner == live).count()
    }

    /// Insert A picks slot 1; slot 0 is freed behind it; insert B of the same
    /// key picks slot 0 and completes; then A goes on from its scan.
    #[test]
    fn a_slot_freed_behind_an_insert_does_not_make_a_second_live_slot() {
        let rl = RateLimiter::open(&tmp("behind"), 4).unwrap();
        let lim = Limit::new(5, 60.0).unwrap();
        let (other, key) = keys_homed_at_zero(&rl);
        let tag = rl.tag(&key);
        assert!(rl.acquire(&other, &lim, 1, NOW).unwrap().allowed);
        let scan_a = rl.scan(tag, NOW);
        assert_eq!(scan_a.reusable.unwrap().0, 1);
        assert!(rl.forget(&other));
        let scan_b = rl.scan(tag, NOW);
        assert_eq!(scan_b.reusable.unwrap().0, 0);
        assert_eq!(rl.insert_after(tag, NOW, scan_b).unwrap(), Some((0, NOW)));
        assert_eq!(rl.insert_after(tag, NOW, scan_a).unwrap(), Some((0, NOW)));
        assert_eq!(live_slots(&rl, &key), 1);
        assert_eq!(rl.occupancy(NOW), (1, 0));
        assert_eq!(rl.acquire(&key, &lim, 5, NOW).unwrap().remaining, 0);
        assert!(!rl.acquire(&key, &lim, 1, NOW).unwrap().allowed);
    }

    /// Both inserts claim before either settles: the first claim in probe
    /// order becomes live, whoever settles.
    #[test]
    fn two_claims_of_one_key_settle_into_one_live_slot() {
        let rl = RateLimiter::open(&tmp("claims2"), 4).unwrap();
        let (_, key) = keys_homed_at_zero(&rl);
        let tag = rl.tag(&key);
        let claim = Slot { owner: owner(tag, CLAIMED), tat: NOW };
        rl.swap(1, rl.load(1), claim).unwrap();
        rl.swap(0, rl.load(0), claim).unwrap();
        assert_eq!(rl.settle(tag), Some((0, NOW)));
        assert_eq!(rl.settle(tag), Some((0, NOW)));
        assert_eq!(rl.occupancy(NOW), (1, 0));
    }

    /// Insert A plans to make its claim at slot 1 live before insert B claims
    /// slot 0; B then plans to free A's claim and make its own live; A's step
    /// lands first. B's must then fail, not make a second live slot.
    #[test]
    fn a_claim_made_live_under_a_planned_settle_wins() {
        let rl = RateLimiter::open(&tmp("settle"), 4).unwrap();
        let (other, key) = keys_homed_at_zero(&rl);
        let tag = rl.tag(&key);
        let lim = Limit::new(5, 60.0).unwrap();
        assert!(rl.acquire(&other, &lim, 1, NOW).unwrap().allowed);
        let claim = Slot { owner: owner(tag, CLAIMED), tat: NOW };
        rl.swap(1, rl.load(1), claim).unwrap();
        let plan_a = rl.plan_settle(tag);
        assert!(rl.forget(&other));
        rl.swap(0, rl.load(0), claim).unwrap();
        let plan_b = rl.plan_settle(tag);
        assert_eq!(plan_b.claims.len(), 2);
        assert_eq!(rl.settle_as_planned(tag, plan_a), Some((1, NOW)));
        assert_eq!(rl.settle_as_planned(tag, plan_b), None);
        // B scans again: the live slot wins and B's claim is freed.
        assert_eq!(rl.live_or_insert(tag, NOW).unwrap(), (1, NOW));
        assert_eq!(live_slots(&rl, &key), 1);
        assert_eq!(rl.occupancy(NOW), (1, 0));
    }

    /// A claim whose inserter died is taken like any stale slot.
    #[test]
    fn an_abandoned_claim_is_reclaimed() {
        let rl = RateLimiter::open(&tmp("abandoned"), 1).unwrap();
        let lim = Limit::new(5, 60.0).unwrap();
        rl.swap(0, rl.load(0), Slot { owner: owner(rl.tag("dead"), CLAIMED), tat: NOW }).unwrap();
        assert!(matches!(rl.acquire("b", &lim, 1, NOW + RECLAIM_AFTER_NS - 1), Err(RateLimitError::Full { .. })));
        assert!(rl.acquire("b", &lim, 1, NOW + RECLAIM_AFTER_NS).unwrap().allowed);
        assert_eq!(live_slots(&rl, "b"), 1);
    }

    /// Threads insert the same fresh keys at the same instant into a small
    /// table whose slots must be reclaimed round after round, while another
    /// thread forgets the keys of the round before and the clocks of the
    /// threads differ by a few ns across the moment the old slots go stale:
    /// slots become free behind a scanner, the race that two-phase inserts
    /// exist for. A key with two live slots would admit twice its limit.
    #[test]
    fn concurrent_inserts_of_one_key_never_make_two_slots() {
        let rl = RateLimiter::open(&tmp("churn"), 8).unwrap();
        let lim = Limit::new(50, 1.0).unwrap();
        let (rounds, keys) = (2000u64, 4u64);
        // A round's keys spend their 50 at about `base`, so their TATs are
        // about `base + 1 s`, stale from about the next round's base on.
        let base = |r: u64| NOW + r * (S + RECLAIM_AFTER_NS);
        let barrier = std::sync::Barrier::new(5);
        let admitted: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
            let (rl, barrier) = (&rl, &barrier);
            s.spawn(move || {
                for r in 0..rounds {
                    barrier.wait();
                    for k in 0..keys {
                        rl.forget(&format!("r{}-k{k}", r.wrapping_sub(1)));
                    }
                }
            });
            let hs: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        (0..rounds)
                            .map(|r| {
                                let now = base(r) + t - 2;
                                barrier.wait();
                                // No unwrap: a panic here would leave the others at the barrier.
                                let (mut got, mut errors) = (0, 0);
                                for i in 0..120u64 {
                                    let key = format!("r{r}-k{}", (i + t * 7) % keys);
                                    match rl.acquire(&key, &lim, 1, now) {
                                        Ok(d) => got += u64::from(d.allowed),
                                        Err(_) => errors += 1,
                                    }
                                }
                                (got, errors)
                            })
                            .collect()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in 0..rounds as usize {
            let (got, errors) = admitted.iter().fold((0, 0), |(g, e), a| (g + a[r].0, e + a[r].1));
            // A few ns between the threads' clocks can cost a key one unit
            // (GCRA errs on the safe side when `now` goes back), never add one.
            assert!(got <= keys * 50 && got >= keys * 49 && errors == 0, "round {r}: {got} admitted, {errors} errors");
        }
        assert!(rl.occupancy(base(rounds)).0 <= 8);
    }

    #[test]
    fn bad_arguments() {
        assert!(Limit::new(-1, 1.0).is_err());
        assert!(Limit::new(1, 0.0).is_err());
        assert!(Limit::new(1, f64::NAN).is_err());
        assert!(Limit::new(1, f64::INFINITY).is_err());
        assert!(seconds_to_ns(-1.0).is_err());
        // Saturated TATs refuse instead of wrapping around.
        let lim = Limit::new(10, 1.0).unwrap();
        let tat = lim.adjusted(u64::MAX - 5, NOW, i64::MAX);
        assert_eq!(tat, u64::MAX);
        assert!(!lim.step(tat, NOW, 1).1.allowed);
        assert_eq!(lim.remaining(tat, u64::MAX), 0);
        assert!(RateLimiter::open(&tmp("cap"), 0).is_err());
    }
}
