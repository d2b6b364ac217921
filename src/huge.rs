//! Huge pages for the family slabs.
//!
//! With ten million families a redemption's record is a random access into
//! gigabytes of slab; with 4 KiB pages nearly every one also misses the TLB,
//! and in a virtual machine the page walk itself costs several memory
//! accesses. Backing the slabs with 2 MiB pages makes a rotation at 10M
//! families markedly faster (BENCHMARKS.md, "Huge pages", has the figures).
//!
//! The slab asks for them with `MADV_COLLAPSE` (Linux 6.1+) on each 2 MiB
//! of slab it has filled, rather than `MADV_HUGEPAGE` on its whole buffer:
//! the latter makes the kernel fault in a whole 2 MiB page at the slab's
//! growing end, which costs memory per family. A collapse is synchronous
//! and slow (milliseconds per 2 MiB; BENCHMARKS.md, "Huge pages"), and the
//! kernel may reclaim or compact memory to find a huge page. So an insert
//! into the slab only
//! returns what to collapse ([`Collapse`]), and its caller runs it after
//! releasing the shard's lock: 2 MiB once per 2 MiB of slab filled (about
//! 14,000 families), and the whole filled slab again after the slab is
//! reallocated elsewhere. If another insert moves the slab in between,
//! the collapse lands on the old buffer (see the SAFETY note): rare, as a
//! slab moves once per doubling, and never a change to live data.
//! Elsewhere, or when the kernel cannot collapse, the slab keeps 4 KiB
//! pages: correct, only slower.

/// Huge-page size on x86-64 (and most aarch64 kernels).
pub(crate) const HUGE: usize = 2 << 20;

/// Tracks how much of one `Vec`'s buffer has been collapsed.
#[derive(Debug, Default)]
pub(crate) struct Collapsed {
    /// The buffer's address when last seen; 0 for none.
    buffer: usize,
    /// Absolute address up to which the buffer has been collapsed.
    done: usize,
}

impl Collapsed {
    /// The whole 2 MiB pages of `v`'s initialised part not yet asked for
    /// (all of them after the buffer moved), marked asked for: the caller
    /// runs the returned collapse once it has released its lock.
    pub(crate) fn update<T>(&mut self, v: &[T]) -> Option<Collapse> {
        let start = v.as_ptr() as usize;
        if start != self.buffer {
            self.buffer = start;
            self.done = start.next_multiple_of(HUGE);
        }
        let filled = start + size_of_val(v);
        let hi = filled / HUGE * HUGE;
        if hi <= self.done {
            return None;
        }
        let (lo, len) = (self.done, hi - self.done);
        self.done = hi;
        Some(Collapse { lo, len })
    }
}

/// Whole 2 MiB pages of one slab buffer to move onto huge pages, found
/// under the shard's lock and run after it is released.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a collapse does nothing until it is run"]
pub(crate) struct Collapse {
    lo: usize,
    len: usize,
}

impl Collapse {
    /// Bytes it asks for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Ask the kernel now. Call it holding no lock: it can take
    /// milliseconds.
    pub(crate) fn run(self) {
        #[cfg(test)]
        tests::RUN.with(|n| n.set(n.get() + 1));
        madvise_collapse(self.lo, self.len);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn madvise_collapse(addr: usize, len: usize) {
    // SAFETY: `[addr, addr + len)` lay inside the initialised part of one
    // slab buffer (rounded inwards to 2 MiB boundaries) when the collapse
    // was noted. Since the lock was released, another insert may have
    // moved the slab and the range been freed or reused; MADV_COLLAPSE
    // only changes which physical pages back whatever is mapped there,
    // never its contents, and fails on an unmapped range. No memory is
    // read or written through the address. (If the allocator kept the
    // freed range mapped but gave its pages back, the collapse fills them
    // in with zeroes: up to `len` bytes resident that the allocator will
    // reuse, never a change to live data.) A failure (an old kernel, no
    // free huge page, a range given back) leaves 4 KiB pages, which is
    // correct, only slower, so it is ignored.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_COLLAPSE);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn madvise_collapse(_addr: usize, _len: usize) {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Collapses run on this thread.
        pub(crate) static RUN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn asked(c: Option<Collapse>) -> usize {
        c.map_or(0, |c| c.len())
    }

    /// Only whole 2 MiB pages of the filled part are asked for, each once,
    /// and all again after the buffer moves.
    #[test]
    fn whole_filled_pages_are_collapsed_once() {
        let mut c = Collapsed::default();
        let mut v: Vec<u8> = Vec::with_capacity(8 * HUGE);
        v.resize(HUGE / 2, 1);
        assert_eq!(asked(c.update(&v)), 0, "no whole page filled");
        v.resize(5 * HUGE, 1);
        let first = asked(c.update(&v));
        assert!((3 * HUGE..=5 * HUGE).contains(&first), "{first}");
        assert_eq!(first % HUGE, 0);
        assert_eq!(asked(c.update(&v)), 0, "nothing new");
        v.resize(6 * HUGE, 1);
        assert_eq!(asked(c.update(&v)), HUGE);
        let moved = v.clone();
        assert!(
            asked(c.update(&moved)) >= 5 * HUGE,
            "a new buffer is collapsed anew"
        );
    }

    /// The kernel does back a collapsed buffer with huge pages (where it
    /// can collapse at all: Linux 6.1+ with THP not `never`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn collapsed_buffers_get_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("THP unavailable on this kernel: nothing to check");
            return;
        }
        let v = vec![1u8; 16 * HUGE];
        let collapse = Collapsed::default().update(&v).expect("15 whole pages");
        assert!(collapse.len() >= 15 * HUGE);
        collapse.run();
        let (start, end) = (v.as_ptr() as usize, v.as_ptr() as usize + v.len());
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        // Summed over the mappings the buffer spans.
        let mut huge_kb = 0;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = a < end && start < b;
            } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
                huge_kb += kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<usize>()
                    .expect("kB");
            }
        }
        assert!(huge_kb >= 15 * 2048, "{huge_kb} kB in huge pages");
    }
}
