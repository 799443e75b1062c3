//! glibc's allocator returns a freed block of 128 KiB or more to the kernel at once (raising that
//! bound only as far as the largest block freed so far), so a training step, which allocates and
//! frees the same activation-sized buffers layer after layer, paid a page fault for every 4 KiB
//! page of every buffer again each time. Keeping freed memory in the process for reuse instead
//! cut a step's page faults and elementwise time by large factors, and peak resident memory
//! stayed the same: what is kept was in use at the peak anyway.
//!
//! Those settings bind only glibc's main heap. Every other thread (a row group's, FSDP's
//! prefetcher) allocates from an arena of its own, made of 64 MiB mappings that are unmapped as
//! soon as they empty, and a block too large for one (a full fine-tuning group's head gradient)
//! is mapped and unmapped alone, so full fine-tuning still faulted in fresh pages every step.
//! One arena for all threads removed most of those faults and made the step measurably faster
//! (figures in bench/RESULTS.md).

/// Asks glibc to serve every thread from its one main heap, blocks up to 1 GiB included, and
/// never to shrink it; call first in `main`. A C library without these settings (or one that
/// refuses them) keeps its defaults, which are only slower.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const KEEP_UP_TO: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator settings; it is called before other threads
        // exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP_UP_TO);
            libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_UP_TO);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
