//! SQLite's memory through Rust's global allocator.
//!
//! SQLite calls the C library's `malloc` unless it is given other routines
//! (`SQLITE_CONFIG_MALLOC`). The message writer's SQLite allocates and frees
//! for every row (records, cursors, a balance's scratch space of a few pages),
//! and with glibc's allocator those calls were a sixth of the writer thread's
//! samples (`_int_malloc`, `malloc_consolidate` when a balance's large request
//! met the small chunks freed before it). Routed here, SQLite allocates from
//! whatever the binary made its global allocator (`confab` uses mimalloc),
//! like the rest of the process.
//!
//! Each block carries its size in a header of [`HEADER`] bytes before the
//! pointer SQLite gets, because SQLite asks for the size of a block
//! (`xSize`) and Rust's allocator must be given it to free one.
//!
//! SQLite takes its allocator only before it is initialised, for the whole
//! process: [`install`] runs with the page cache's, before the first
//! connection.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc, dealloc, realloc};
use std::ffi::{c_int, c_void};
use std::ptr;

use libsqlite3_sys as ffi;

/// Bytes before each block: its size, keeping the block 16-byte aligned
/// (what the C library's `malloc` gives; SQLite needs 8).
const HEADER: usize = 16;

/// Alignment of every block.
const ALIGN: usize = 16;

/// Makes SQLite allocate through Rust's global allocator; false when SQLite
/// was initialised before (it then keeps the C library's). Not thread-safe
/// (`sqlite3_config` is not): called once, before any connection.
pub(super) fn install() -> bool {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_malloc),
        xFree: Some(sqlite_free),
        xRealloc: Some(sqlite_realloc),
        xSize: Some(sqlite_size),
        xRoundup: Some(sqlite_roundup),
        xInit: Some(sqlite_init),
        xShutdown: Some(sqlite_shutdown),
        pAppData: ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to a methods struct, which
    // SQLite copies; it refuses once initialised. The caller runs before any
    // connection, so no other thread is in SQLite.
    unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) == ffi::SQLITE_OK }
}

/// The layout of a block of `size` bytes for SQLite, header included; `None`
/// for a size no allocation can have.
fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()
}

/// The start of the allocation behind `block`, and the size SQLite asked for.
///
/// # Safety
///
/// `block` came from [`sqlite_malloc`] or [`sqlite_realloc`] and was not freed.
unsafe fn header(block: *mut c_void) -> (*mut u8, usize) {
    // SAFETY: every block is HEADER bytes into an allocation whose first
    // bytes hold its size (written by `finish`).
    unsafe {
        let base = block.cast::<u8>().sub(HEADER);
        (base, base.cast::<usize>().read())
    }
}

/// Writes `size` into the header at `base` and returns the block after it;
/// null when the allocation failed.
///
/// # Safety
///
/// `base` is null or an allocation of at least `HEADER + size` bytes, aligned
/// to [`ALIGN`].
unsafe fn finish(base: *mut u8, size: usize) -> *mut c_void {
    if base.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: the allocation starts with HEADER bytes of our own, aligned for
    // a usize.
    unsafe {
        base.cast::<usize>().write(size);
        base.add(HEADER).cast()
    }
}

/// The size SQLite asks for, as a `usize`; SQLite never asks for a negative
/// one, and a zero-sized block still gets a header.
fn requested(size: c_int) -> usize {
    usize::try_from(size).unwrap_or(0)
}

unsafe extern "C" fn sqlite_malloc(size: c_int) -> *mut c_void {
    let size = requested(size);
    let Some(layout) = layout(size) else {
        return ptr::null_mut();
    };
    // SAFETY: the layout is never zero-sized (it holds the header); `finish`
    // gets an allocation of that layout or null.
    unsafe { finish(alloc(layout), size) }
}

unsafe extern "C" fn sqlite_free(block: *mut c_void) {
    if block.is_null() {
        return;
    }
    // SAFETY: SQLite frees only blocks it got from us, once.
    let (base, size) = unsafe { header(block) };
    if let Some(layout) = layout(size) {
        // SAFETY: `base` was allocated with this layout.
        unsafe { dealloc(base, layout) };
    }
}

unsafe extern "C" fn sqlite_realloc(block: *mut c_void, size: c_int) -> *mut c_void {
    if block.is_null() {
        // SAFETY: as `sqlite_malloc` (SQLite does not call this with null).
        return unsafe { sqlite_malloc(size) };
    }
    let size = requested(size);
    // SAFETY: SQLite resizes only live blocks it got from us.
    let (base, old) = unsafe { header(block) };
    let (Some(old_layout), Some(new_layout)) = (layout(old), layout(size)) else {
        return ptr::null_mut();
    };
    // SAFETY: `base` was allocated with `old_layout`; the new size is nonzero
    // and a valid layout's. On failure the old block stays SQLite's.
    unsafe { finish(realloc(base, old_layout, new_layout.size()), size) }
}

unsafe extern "C" fn sqlite_size(block: *mut c_void) -> c_int {
    if block.is_null() {
        return 0;
    }
    // SAFETY: SQLite asks the size of live blocks it got from us.
    let (_, size) = unsafe { header(block) };
    c_int::try_from(size).unwrap_or(c_int::MAX)
}

/// SQLite rounds its requests with this; blocks are exactly the size asked
/// for, rounded to 8 as SQLite expects of every allocator.
unsafe extern "C" fn sqlite_roundup(size: c_int) -> c_int {
    size.checked_add(7).map_or(size, |size| size & !7)
}

unsafe extern "C" fn sqlite_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn sqlite_shutdown(_: *mut c_void) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_size_and_contents_through_realloc() {
        // SAFETY: each block is used within its size and freed once.
        unsafe {
            let block = sqlite_malloc(10);
            assert!(!block.is_null());
            assert_eq!(block.addr() % 8, 0);
            assert_eq!(sqlite_size(block), 10);
            ptr::copy_nonoverlapping(b"0123456789".as_ptr(), block.cast::<u8>(), 10);
            let grown = sqlite_realloc(block, 5000);
            assert_eq!(sqlite_size(grown), 5000);
            let mut kept = [0u8; 10];
            ptr::copy_nonoverlapping(grown.cast::<u8>(), kept.as_mut_ptr(), 10);
            assert_eq!(&kept, b"0123456789");
            let shrunk = sqlite_realloc(grown, 3);
            assert_eq!(sqlite_size(shrunk), 3);
            sqlite_free(shrunk);
            sqlite_free(ptr::null_mut());
            assert_eq!(sqlite_size(ptr::null_mut()), 0);
            let empty = sqlite_malloc(0);
            assert_eq!(sqlite_size(empty), 0);
            sqlite_free(empty);
        }
    }

    #[test]
    fn roundup_is_a_multiple_of_eight_and_never_smaller() {
        for size in [0, 1, 7, 8, 9, 1000, c_int::MAX - 7] {
            // SAFETY: a pure function.
            let rounded = unsafe { sqlite_roundup(size) };
            assert!(rounded >= size && rounded % 8 == 0, "{size} -> {rounded}");
        }
        // SAFETY: as above.
        assert_eq!(unsafe { sqlite_roundup(c_int::MAX) }, c_int::MAX);
    }
}
