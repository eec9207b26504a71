//! Gives the unused part of a parked thread's stack back to the kernel: what glibc does
//! for a thread that exits, done for one that stays.
//!
//! Why a thread stays instead of exiting: an exited thread's stack is kept whole in
//! glibc's stack cache for reuse, and the exit itself runs glibc's per-thread clean-up
//! (resolver and RPC state), whose code an idle daemon otherwise never maps
//! (BENCHMARKS.md, idle memory). A thread that parks between jobs and releases its
//! deep pages costs less than one that comes and goes.

use std::ffi::c_void;
use std::io;

/// Pages deeper than this below the caller's frame are released. The margin covers the
/// red zone (128 bytes) and the one frame called after the bearing is taken
/// (`madvise`'s wrapper), with room to spare.
const KEPT_BELOW_FRAME: usize = 8 * 1024;

/// Releases the pages of the calling thread's stack that lie deeper than
/// `KEPT_BELOW_FRAME` below the caller: they read as zero when touched again, which
/// is all an unused stack page may hold. Returns how many bytes were released (0 when
/// the stack is not that deep). Meant for a worker thread between jobs, called from
/// its shallowest frame; never for the process's main thread, whose stack glibc
/// describes by reading `/proc/self/maps`.
pub fn release_unused_stack() -> io::Result<usize> {
    let lowest = lowest_stack_address()?;
    let marker = 0u8;
    let frame = std::hint::black_box(std::ptr::addr_of!(marker)) as usize;
    let page = page_size();
    let end = frame.saturating_sub(KEPT_BELOW_FRAME) & !(page - 1);
    if end <= lowest {
        return Ok(0);
    }
    // SAFETY: [lowest, end) is this thread's own stack (glibc's description of it, the
    // guard page excluded) and lies below every live frame of it: the stack grows down,
    // and `end` is KEPT_BELOW_FRAME below a local of this very frame, deeper than the
    // one call made from here can reach. No other thread uses this stack. Both ends
    // are page-aligned (glibc maps stacks page by page; `end` is rounded down).
    // MADV_DONTNEED on private anonymous memory only drops the pages' contents.
    let result = unsafe { libc::madvise(lowest as *mut c_void, end - lowest, libc::MADV_DONTNEED) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end - lowest)
}

/// The lowest usable address of the calling thread's stack, above its guard page.
fn lowest_stack_address() -> io::Result<usize> {
    let mut attributes = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np fills in the attribute object it is given, and it is
    // read only after it returned 0; pthread_self is always valid for the caller.
    let error = unsafe { libc::pthread_getattr_np(libc::pthread_self(), attributes.as_mut_ptr()) };
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    let mut stack_address: *mut c_void = std::ptr::null_mut();
    let mut stack_size: libc::size_t = 0;
    // SAFETY: the attribute object was initialised by pthread_getattr_np above; it is
    // destroyed exactly once, after its last use.
    let error = unsafe {
        let error =
            libc::pthread_attr_getstack(attributes.as_ptr(), &mut stack_address, &mut stack_size);
        libc::pthread_attr_destroy(attributes.as_mut_ptr());
        error
    };
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(stack_address as usize)
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `depth` KiB of stack and returns the address of its deepest local.
    #[inline(never)]
    fn deep(depth: usize) -> usize {
        let mut block = [0u8; 1024];
        std::hint::black_box(&mut block);
        if depth == 0 {
            return std::ptr::addr_of!(block) as usize;
        }
        std::hint::black_box(deep(depth - 1))
    }

    fn resident(address: usize) -> bool {
        let page = page_size();
        let start = address & !(page - 1);
        let mut residency = 0u8;
        // SAFETY: mincore reads the residency of one mapped page of this thread's
        // stack into the one byte it is given.
        let result = unsafe { libc::mincore(start as *mut c_void, page, &mut residency) };
        assert_eq!(result, 0, "mincore: {}", io::Error::last_os_error());
        residency & 1 == 1
    }

    #[test]
    fn the_pages_of_a_deep_call_that_returned_are_released_and_usable_again() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let deepest = deep(256);
                assert!(resident(deepest), "the deep call's page was never touched");
                let released = release_unused_stack().unwrap();
                assert!(released >= 200 * 1024, "released only {released} bytes");
                assert!(!resident(deepest), "the deep call's page is still resident");
                // The released pages serve the next deep call as zero-filled pages.
                assert_eq!(deep(256), deepest);
                assert!(resident(deepest));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[inline(never)]
    fn release_from_a_callee() -> usize {
        let _ = deep(8);
        release_unused_stack().unwrap()
    }

    #[test]
    fn what_the_callers_frames_hold_is_kept() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let mut held = [0u64; 2048];
                for (index, value) in held.iter_mut().enumerate() {
                    *value = index as u64 * 7919;
                }
                std::hint::black_box(&mut held);
                let _ = deep(256);
                assert!(release_from_a_callee() > 0);
                let held = std::hint::black_box(held);
                assert!(held
                    .iter()
                    .enumerate()
                    .all(|(index, value)| *value == index as u64 * 7919));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
