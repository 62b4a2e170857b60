//! Weights in transparent huge pages: the operators' constant initializers copied out of where the session keeps
//! them (ONNX Runtime maps the model's external data file, 4 KiB pages) into anonymous memory advised
//! `MADV_HUGEPAGE`, and the session's mapping of those pages dropped (`release`).
//!
//! Why. A decode step streams every weight once: SmolLM2-135M's ~100 MB is ~24,000 pages of 4 KiB, each a TLB
//! miss and, under a hypervisor, a two-level page walk; in 2 MiB pages it is ~50. Measured on this project's
//! 2-core KVM box (`bench/ab_builds.py --huge-pages-a off`, the two sessions alternating in one process): a
//! SmolLM2 batch-1 step 6.95 -> 5.90 ms, at batch 8 16.37 -> 15.06 ms, Gemma 3 270M's batch 1 9.75 -> 8.87 ms.
//!
//! What it costs. Resident memory stays one copy (the session's pages go back to the page cache, which is not
//! resident memory, and from there to whoever needs it); worker processes no longer share one physical copy of
//! the file's pages, each holds its own, so `huge_pages = false` (`set_enabled`) keeps the file mapping where
//! many workers on one host matter more than decode speed. Where the kernel never gives huge pages
//! (`/sys/kernel/mm/transparent_hugepage/enabled` is `never`, or not Linux) nothing is copied.
//!
//! Layout. Copies are packed one after another (64-byte aligned) into chunks of 64 MiB of address space, so
//! that weights of a few hundred KiB still share 2 MiB pages; only the pages written become resident. A kernel
//! holds the chunks its copies live in (`collect` around its construction), and a chunk is unmapped when the
//! last kernel holding it is destroyed. A second kernel reading the same initializer (a tied embedding and LM
//! head) gets the first one's copy, after checking that the bytes are equal. Inputs a kernel reads a few rows at
//! a time (`Kernel::SPARSE_INPUTS`: an embedding's gathers, the rows an LM head rescores) are not copied: mapped,
//! only the pages of rows read become resident (Gemma 3's low plane is 84 MB, of which a step reads ~64 rows).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use memmap2::{Advice, MmapMut};

/// Address space per chunk (only the pages written to become resident).
const CHUNK: usize = 64 << 20;
/// A transparent huge page (x86-64, aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;
/// Initializers smaller than this stay where the session keeps them (norm weights and the like).
const MIN_BYTES: usize = 64 << 10;
/// Alignment of each copy within its chunk (a cache line).
const ALIGN: usize = 64;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether kernels created from now on copy their weights into huge pages (where the kernel gives them).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether copies are made: asked for, and the kernel's transparent huge pages are not switched off.
pub fn active() -> bool {
    ENABLED.load(Ordering::Relaxed) && available()
}

/// The kernel's THP mode allows huge pages for memory advised `MADV_HUGEPAGE` (`always` or `madvise`).
fn available() -> bool {
    static MODE: OnceLock<bool> = OnceLock::new();
    *MODE.get_or_init(|| {
        cfg!(target_os = "linux")
            && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .is_ok_and(|mode| !mode.contains("[never]"))
    })
}

/// A region of anonymous memory advised `MADV_HUGEPAGE`, its usable part starting on a huge-page boundary.
pub(super) struct Chunk {
    map: MmapMut,
    start: usize,
    len: usize,
}

impl Chunk {
    fn new(len: usize) -> Option<Chunk> {
        // One huge page more than asked, so the usable part can start on a boundary wherever the map lands.
        let map = MmapMut::map_anon(len + HUGE).ok()?;
        let _ = map.advise(Advice::HugePage); // a hint: without it the copy still works, in small pages
        let start = map.as_ptr().align_offset(HUGE).min(HUGE);
        Some(Chunk { map, start, len })
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: start <= HUGE and the map holds len + HUGE bytes.
        unsafe { self.map.as_ptr().cast_mut().add(self.start) }
    }
}

struct Arena {
    /// The chunk being filled, and how far.
    open: Weak<Chunk>,
    used: usize,
    /// Copies made, by the source's (address, length): the chunk and the offset in it.
    copies: Vec<((usize, usize), Weak<Chunk>, usize)>,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena { open: Weak::new(), used: 0, copies: Vec::new() });

thread_local! {
    /// The chunks the kernel under construction on this thread copied into (`collect`).
    static HELD: RefCell<Option<Vec<Arc<Chunk>>>> = const { RefCell::new(None) };
    /// Its inputs read a few rows at a time, which stay where they are.
    static SPARSE: core::cell::Cell<&'static [usize]> = const { core::cell::Cell::new(&[]) };
}

/// Runs `build` (a kernel's construction) and returns its result with the chunks its copies live in, which the
/// kernel must hold for as long as it uses them. Inputs in `sparse` are never copied.
pub(super) fn collect<R>(sparse: &'static [usize], build: impl FnOnce() -> R) -> (R, Vec<Arc<Chunk>>) {
    let outer = HELD.with(|h| h.borrow_mut().replace(Vec::new()));
    let outer_sparse = SPARSE.replace(sparse);
    let result = build();
    SPARSE.set(outer_sparse);
    let held = HELD.with(|h| std::mem::replace(&mut *h.borrow_mut(), outer)).unwrap_or_default();
    (result, held)
}

/// A copy of `src` (the kernel's input `index`) in huge-page memory, valid while the kernel being built (`collect`)
/// lives; None where copies are off, unavailable, outside `collect`, the input is sparse, `src` is small, or the
/// memory could not be mapped (the caller then reads `src` where it is).
///
/// # Safety
/// `src` is readable for its length, and nothing writes it during the call.
pub(super) unsafe fn copy(src: &[u8], index: usize) -> Option<*const u8> {
    if src.len() < MIN_BYTES || !active() || HELD.with(|h| h.borrow().is_none()) || SPARSE.get().contains(&index) {
        return None;
    }
    let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    let key = (src.as_ptr() as usize, src.len());
    let made = arena.copies.iter().find(|(k, _, _)| *k == key).and_then(|(_, c, o)| Some((c.upgrade()?, *o)));
    if let Some((chunk, offset)) = made {
        let at = chunk.base().add(offset);
        if core::slice::from_raw_parts(at, src.len()) == src {
            drop(arena);
            release(src); // the comparison read the session's pages back in
            return Some(hold(chunk, at));
        }
    }
    let size = src.len().next_multiple_of(ALIGN);
    let chunk = match arena.open.upgrade().filter(|c| arena.used + size <= c.len) {
        Some(c) => c,
        None => {
            let c = Arc::new(Chunk::new(size.max(CHUNK).next_multiple_of(HUGE))?);
            arena.open = Arc::downgrade(&c);
            arena.used = 0;
            c
        }
    };
    let offset = arena.used;
    arena.used += size;
    let at = chunk.base().add(offset);
    core::ptr::copy_nonoverlapping(src.as_ptr(), at, src.len());
    arena.copies.retain(|(k, c, _)| c.strong_count() > 0 && *k != key);
    arena.copies.push((key, Arc::downgrade(&chunk), offset));
    drop(arena);
    release(src);
    Some(hold(chunk, at))
}

/// `at`, in `chunk`, for the kernel under construction, which now holds the chunk.
fn hold(chunk: Arc<Chunk>, at: *mut u8) -> *const u8 {
    HELD.with(|h| h.borrow_mut().as_mut().map(|v| v.push(chunk)));
    at.cast_const()
}

/// Drops this process's mapping of the whole pages inside `src` (`MADV_DONTNEED`) where every one of them is a
/// page of a file (ONNX Runtime maps external data privately, page by page from the file until written): the
/// pages leave resident memory for the page cache, and a later read faults the same bytes back in. A range with
/// any anonymous page (an initializer in the session's heap, or a page of the mapping that was written), which
/// DONTNEED would lose, is left alone, both copies then resident. (`MADV_PAGEOUT` would be safe everywhere but
/// skips the page cache's large folios, which a tensor's range only partly covers: it released a third of
/// Gemma 3's weights.)
fn release(src: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let (first, past) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
        let (start, end) = (first.next_multiple_of(PAGE), past / PAGE * PAGE);
        if end > start && file_pages(start / PAGE, end / PAGE) {
            // SAFETY: whole pages that are all the file's own (checked above): dropped, they read back the same.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// Whether pages first..last of this process are all present and file-backed (or shared), per /proc/self/pagemap:
/// one 64-bit entry per page, bit 63 present, bit 61 a file page or shared memory, bit 62 swapped.
#[cfg(target_os = "linux")]
fn file_pages(first: usize, last: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut entries = vec![0u8; (last - first) * 8];
    if pagemap.read_exact_at(&mut entries, first as u64 * 8).is_err() {
        return false;
    }
    entries.chunks_exact(8).all(|e| {
        let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
        e >> 63 == 1 && (e >> 61) & 1 == 1 && (e >> 62) & 1 == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn copies_hold_the_bytes_and_live_with_their_kernel() {
        if !available() {
            return;
        }
        let (a, b) = (bytes(MIN_BYTES * 3 + 5, 1), bytes(MIN_BYTES, 2));
        let ((pa, pb), held) = collect(&[], || unsafe { (copy(&a, 1).unwrap(), copy(&b, 2).unwrap()) });
        assert_ne!(pa, a.as_ptr());
        unsafe {
            assert_eq!(core::slice::from_raw_parts(pa, a.len()), &a[..]);
            assert_eq!(core::slice::from_raw_parts(pb, b.len()), &b[..]);
        }
        assert_eq!(pa as usize % ALIGN, 0);
        assert_eq!(pb as usize % ALIGN, 0);
        assert!(!held.is_empty());
        // The same source again, for another kernel: the same copy.
        let (again, held2) = collect(&[], || unsafe { copy(&a, 1).unwrap() });
        assert_eq!(again, pa);
        drop((held, held2));
        // Every holder gone: the chunk is unmapped and a copy of the same source is made afresh.
        let (fresh, _held) = collect(&[], || unsafe { copy(&a, 1).unwrap() });
        unsafe { assert_eq!(core::slice::from_raw_parts(fresh, a.len()), &a[..]) };
    }

    #[test]
    fn a_changed_source_is_copied_again() {
        if !available() {
            return;
        }
        let mut a = bytes(MIN_BYTES, 3);
        let (first, held) = collect(&[], || unsafe { copy(&a, 1).unwrap() });
        a[100] ^= 0xff;
        let (second, held2) = collect(&[], || unsafe { copy(&a, 1).unwrap() });
        assert_ne!(first, second);
        unsafe { assert_eq!(core::slice::from_raw_parts(second, a.len()), &a[..]) };
        drop((held, held2));
    }

    #[test]
    fn small_sources_and_calls_outside_a_kernel_are_left_alone() {
        let small = bytes(MIN_BYTES - 1, 4);
        let (none, held) = collect(&[], || unsafe { copy(&small, 1) });
        assert!(none.is_none() && held.is_empty());
        let big = bytes(MIN_BYTES, 5);
        assert!(unsafe { copy(&big, 1) }.is_none(), "outside collect nothing holds a copy");
        let (sparse, held) = collect(&[2], || unsafe { (copy(&big, 2), copy(&big, 1).is_some() || !available()) });
        assert!(sparse.0.is_none() && sparse.1, "a sparse input stays where it is; the others are copied");
        drop(held);
    }
}
