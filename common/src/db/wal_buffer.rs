//! A VFS over SQLite's own that writes each transaction's WAL frames in one
//! `pwrite` instead of two per page.
//!
//! SQLite appends a frame to the WAL as two writes, its 24-byte header and then
//! the page (`walWriteOneFrame`), so a commit of 40 pages is 80 `pwrite` calls.
//! Under one-to-one load those calls were 11 % of the server's CPU, mostly each
//! call's own cost rather than the bytes, and they run in the message writer's
//! commit, the one serial stage of the send path. With this VFS (one-to-one,
//! 200 pairs, alternating servers): `pwrite` calls in 4 s at 13,000 msg/s
//! 141,000 / 269,000 → 24,000 / 26,000; the writer's commit time 53 / 50 → 47 /
//! 46 µs a message at 22,000 offered, delivered 18,274 / 19,342 → 19,960 /
//! 20,395 a second. No crate wraps the default VFS this way (those that exist
//! implement a VFS from scratch: file I/O, locking and shared memory anew).
//!
//! This VFS opens every file through the
//! default one (`unix`: its locking, its shared memory, its syncs) and only
//! changes writes to WAL files: a write that continues the previous one is
//! appended to a buffer, and the buffer goes to the file in one write
//!
//! - once it holds the whole of a frame that ends a transaction (a commit
//!   frame: a non-zero database size in its header), so a commit is in the file
//!   before SQLite publishes it to readers, whatever `synchronous` says;
//! - before any other call on the file (sync, read, size, truncate, file
//!   control, close), so SQLite never sees the file behind what it wrote;
//! - when a write does not continue the buffer, or the buffer is full.
//!
//! Other files (the database, its shared memory, temporary files) pass straight
//! through. The buffer belongs to one open file, which SQLite uses under its
//! connection's lock: no locking of its own.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use libsqlite3_sys as ffi;

/// The name the VFS is registered under, for `SqliteConnectOptions::vfs`.
const NAME: &CStr = c"confab-wal-buffer";

/// Bytes of WAL the buffer holds at most before it writes them: the most the
/// unix VFS writes in one call (`seekAndWriteFd` masks the length to 17 bits,
/// and reports a longer write as short: SQLITE_FULL). 31 frames of 4 KiB pages.
const BUFFER_LIMIT: usize = 0x1ffff;

/// A WAL file starts with a 32-byte header; each frame is a 24-byte header and
/// a page (`wal.c`).
const WAL_HEADER: i64 = 32;
const FRAME_HEADER: usize = 24;

/// Returns the name of the buffering VFS, registering it on first use, or
/// `None` (SQLite's default VFS) when there is no default VFS to wrap.
pub(crate) fn name() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initializes SQLite if needed and returns the
        // default VFS, which lives as long as the process (it is never
        // unregistered here). The new VFS is leaked: registered VFSes must
        // outlive every connection.
        unsafe {
            let inner = ffi::sqlite3_vfs_find(ptr::null());
            if inner.is_null() {
                return false;
            }
            let mut vfs = *inner;
            vfs.szOsFile = match c_int::try_from(INNER_OFFSET) {
                Ok(offset) => offset.saturating_add((*inner).szOsFile),
                Err(_) => return false,
            };
            vfs.pNext = ptr::null_mut();
            vfs.zName = NAME.as_ptr();
            vfs.xOpen = Some(open);
            // Every other entry is the default VFS's own, with its app data;
            // only xOpen needs to tell the two apart, through INNER.
            INNER.store(inner, Ordering::Release);
            let vfs = Box::leak(Box::new(vfs));
            ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK
        }
    });
    registered.then(|| NAME.to_str().unwrap_or_default())
}

/// The VFS wrapped: the default one at registration.
static INNER: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// The file SQLite allocates (`szOsFile` bytes): this header, then the wrapped
/// VFS's own file at [`INNER_OFFSET`].
#[repr(C)]
struct File {
    /// SQLite's view: points at [`METHODS`].
    base: ffi::sqlite3_file,
    /// Present on WAL files only.
    wal: Option<Box<WalBuffer>>,
}

/// Where the wrapped file starts: after [`File`], at a multiple of 8 as SQLite
/// aligns the whole (its files hold nothing wider than 8 bytes).
const INNER_OFFSET: usize = std::mem::size_of::<File>().next_multiple_of(8);

/// The writes of a WAL file not yet handed to the wrapped file.
#[derive(Debug, Default)]
struct WalBuffer {
    /// File offset of `bytes[0]`.
    start: i64,
    bytes: Vec<u8>,
    /// The database's page size, from the WAL header.
    page_size: Option<i64>,
    /// Where the last commit frame seen ends: the buffer is written once it
    /// reaches it.
    commit_end: Option<i64>,
}

impl WalBuffer {
    fn end(&self) -> i64 {
        self.start.saturating_add(len_i64(self.bytes.len()))
    }

    /// Takes `bytes`, to be written at `offset`, and hands what is due to
    /// `write` (offset and bytes, returning an SQLite result code); `header`
    /// reads the WAL header from the file when the page size is not known.
    fn write(
        &mut self,
        bytes: &[u8],
        offset: i64,
        header: impl FnOnce() -> Option<i64>,
        mut write: impl FnMut(i64, &[u8]) -> c_int,
    ) -> c_int {
        if offset == 0 && bytes.len() >= 32 {
            self.page_size = page_size(bytes);
        }
        if !self.bytes.is_empty()
            && (offset != self.end() || self.bytes.len() + bytes.len() > BUFFER_LIMIT)
        {
            let rc = self.flush(&mut write);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if self.bytes.is_empty() {
            self.start = offset;
        }
        self.bytes.extend_from_slice(bytes);
        if bytes.len() == FRAME_HEADER && commit_size(bytes) != 0 {
            if self.page_size.is_none() {
                self.page_size = header();
            }
            self.commit_end = match self.page_size {
                // A frame header where frames start: the frame ends after its page.
                Some(page) if (offset - WAL_HEADER) % (len_i64(FRAME_HEADER) + page) == 0 => {
                    Some(offset + len_i64(FRAME_HEADER) + page)
                }
                // Not a frame header after all, or no page size: write at once.
                _ => Some(self.end()),
            };
        }
        if self.commit_end.is_some_and(|end| self.end() >= end) {
            self.commit_end = None;
            return self.flush(&mut write);
        }
        ffi::SQLITE_OK
    }

    /// Hands what the buffer holds to `write` and empties it: written or
    /// failed, the bytes are SQLite's to write again (on failure it abandons
    /// the transaction).
    fn flush(&mut self, mut write: impl FnMut(i64, &[u8]) -> c_int) -> c_int {
        let mut rc = ffi::SQLITE_OK;
        let mut at = self.start;
        for chunk in self.bytes.chunks(BUFFER_LIMIT) {
            rc = write(at, chunk);
            if rc != ffi::SQLITE_OK {
                break;
            }
            at = at.saturating_add(len_i64(chunk.len()));
        }
        self.bytes.clear();
        rc
    }
}

fn len_i64(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

/// The page size a WAL header (its first 32 bytes) records, if valid.
fn page_size(header: &[u8]) -> Option<i64> {
    let size = u32::from_be_bytes(header.get(8..12)?.try_into().ok()?);
    (size.is_power_of_two() && (512..=65_536).contains(&size)).then_some(i64::from(size))
}

/// The database size a frame header records: non-zero on a commit frame.
fn commit_size(frame_header: &[u8]) -> u32 {
    frame_header
        .get(4..8)
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// Returns the wrapped file.
///
/// # Safety
///
/// `file` is a file opened by [`open`].
unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: `open` placed the wrapped file INNER_OFFSET bytes into ours.
    unsafe { file.cast::<u8>().add(INNER_OFFSET).cast() }
}

/// Returns the wrapped file's methods.
///
/// # Safety
///
/// `file` is a file opened by [`open`] whose wrapped file is open.
unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an open file's methods live as long as its VFS: forever.
    unsafe { &*(*inner(file)).pMethods }
}

/// Returns the buffer of a WAL file, `None` for other files.
///
/// # Safety
///
/// `file` is a file opened by [`open`], used by one thread at a time.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> Option<&'a mut WalBuffer> {
    // SAFETY: `open` initialised the header; SQLite serialises calls on a file.
    unsafe { (*file.cast::<File>()).wal.as_deref_mut() }
}

/// Writes `bytes` at `offset` through the wrapped file.
///
/// # Safety
///
/// `file` is an open file of [`open`]'s.
unsafe fn write_inner(file: *mut ffi::sqlite3_file, offset: i64, bytes: &[u8]) -> c_int {
    let Ok(amount) = c_int::try_from(bytes.len()) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: the wrapped file is open; the bytes outlive the call.
    unsafe {
        match methods(file).xWrite {
            Some(write) => write(inner(file), bytes.as_ptr().cast(), amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

/// Reads the page size from the WAL header on disk, for a WAL this file did
/// not start (opened with frames in it).
///
/// # Safety
///
/// `file` is an open file of [`open`]'s.
unsafe fn read_page_size(file: *mut ffi::sqlite3_file) -> Option<i64> {
    let mut header = [0_u8; 32];
    // SAFETY: the wrapped file is open; the buffer is 32 bytes.
    let rc = unsafe { methods(file).xRead?(inner(file), header.as_mut_ptr().cast(), 32, 0) };
    (rc == ffi::SQLITE_OK).then(|| page_size(&header)).flatten()
}

/// Flushes the buffer of a WAL file; nothing for other files.
///
/// # Safety
///
/// `file` is an open file of [`open`]'s.
unsafe fn flush_any(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as the caller's.
    unsafe {
        match wal(file) {
            Some(buffer) => buffer.flush(|offset, bytes| write_inner(file, offset, bytes)),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner_vfs = INNER.load(Ordering::Acquire);
    // SAFETY: SQLite hands `file` with szOsFile bytes, 8-aligned; the header is
    // written before anything reads it, and the wrapped VFS opens its file in
    // the rest. SQLite calls xClose only when pMethods is set.
    unsafe {
        ptr::write(
            file.cast::<File>(),
            File {
                base: ffi::sqlite3_file {
                    pMethods: ptr::null(),
                },
                wal: None,
            },
        );
        let Some(open_inner) = (*inner_vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open_inner(inner_vfs, name, inner(file), flags, out_flags);
        if (*inner(file)).pMethods.is_null() {
            return rc;
        }
        if flags & ffi::SQLITE_OPEN_WAL != 0 {
            (*file.cast::<File>()).wal = Some(Box::default());
        }
        (*file).pMethods = &METHODS;
        rc
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Calls the wrapped file's method `$method` with `$args` after the wrapped
/// file itself, or returns `$missing` when it has none. With `flush` first, a
/// WAL file's buffer is written before (and its error returned instead).
macro_rules! pass {
    (flush $file:expr, $($rest:tt)*) => {{
        // SAFETY: SQLite calls methods on an open file.
        let rc = unsafe { flush_any($file) };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        pass!($file, $($rest)*)
    }};
    ($file:expr, $method:ident, $missing:expr $(, $arg:expr)*) => {
        // SAFETY: SQLite calls a method only on an open file.
        unsafe {
            match methods($file).$method {
                Some(method) => method(inner($file) $(, $arg)*),
                None => $missing,
            }
        }
    };
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes an open file once.
    let flushed = unsafe { flush_any(file) };
    let rc = pass!(file, xClose, ffi::SQLITE_OK);
    // SAFETY: as above; the header is not used after this.
    unsafe { (*file.cast::<File>()).wal = None };
    if flushed == ffi::SQLITE_OK {
        rc
    } else {
        flushed
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    pass!(flush file, xRead, ffi::SQLITE_IOERR_READ, data, amount, offset)
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls methods on an open file.
    let Some(buffer) = (unsafe { wal(file) }) else {
        return pass!(file, xWrite, ffi::SQLITE_IOERR_WRITE, data, amount, offset);
    };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite passes `amount` readable bytes at `data`, and calls
    // methods on an open file.
    unsafe {
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
        buffer.write(
            bytes,
            offset,
            || read_page_size(file),
            |offset, bytes| write_inner(file, offset, bytes),
        )
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    pass!(flush file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    pass!(flush file, xSync, ffi::SQLITE_IOERR_FSYNC, flags)
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    pass!(flush file, xFileSize, ffi::SQLITE_IOERR_FSTAT, size)
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass!(file, xLock, ffi::SQLITE_IOERR_LOCK, level)
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass!(file, xUnlock, ffi::SQLITE_IOERR_UNLOCK, level)
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    pass!(
        file,
        xCheckReservedLock,
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        out
    )
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    pass!(flush file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    pass!(file, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    pass!(file, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    pass!(
        file,
        xShmMap,
        ffi::SQLITE_IOERR_SHMMAP,
        region,
        size,
        extend,
        out
    )
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    pass!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    pass!(file, xShmBarrier, ());
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    pass!(file, xShmUnmap, ffi::SQLITE_OK, delete)
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite passes where to put the mapping: none until the wrapped
    // file maps it (after the flush: a mapped page shows what was written).
    unsafe { *out = ptr::null_mut() };
    pass!(flush file, xFetch, ffi::SQLITE_OK, offset, amount, out)
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    pass!(file, xUnfetch, ffi::SQLITE_OK, offset, page)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
    use sqlx::{ConnectOptions as _, Connection as _, SqliteConnection};

    use super::{WalBuffer, ffi};

    const PAGE: usize = 4096;

    /// A frame's 24-byte header; `commit` is the database size of a commit frame.
    fn frame_header(commit: u32) -> Vec<u8> {
        let mut header = vec![0; 24];
        header[4..8].copy_from_slice(&commit.to_be_bytes());
        header
    }

    fn wal_header() -> Vec<u8> {
        let mut header = vec![0; 32];
        header[8..12].copy_from_slice(&u32::try_from(PAGE).unwrap().to_be_bytes());
        header
    }

    fn frame_offset(frame: usize) -> i64 {
        i64::try_from(32 + frame * (24 + PAGE)).unwrap()
    }

    /// Feeds `writes` to a buffer and returns what reached the file.
    fn feed(buffer: &mut WalBuffer, writes: &[(i64, Vec<u8>)]) -> Vec<(i64, usize)> {
        let mut written = Vec::new();
        for (offset, bytes) in writes {
            let rc = buffer.write(
                bytes,
                *offset,
                || Some(PAGE as i64),
                |at, bytes| {
                    written.push((at, bytes.len()));
                    ffi::SQLITE_OK
                },
            );
            assert_eq!(rc, ffi::SQLITE_OK);
        }
        written
    }

    /// The frames of a transaction, as SQLite writes them: two writes a frame.
    fn transaction(first_frame: usize, frames: usize, database_pages: u32) -> Vec<(i64, Vec<u8>)> {
        (first_frame..first_frame + frames)
            .flat_map(|frame| {
                let commit = if frame + 1 == first_frame + frames {
                    database_pages
                } else {
                    0
                };
                let at = frame_offset(frame);
                [(at, frame_header(commit)), (at + 24, vec![7; PAGE])]
            })
            .collect()
    }

    /// A transaction's frames, with the WAL header in front of a new WAL,
    /// reach the file in one write, once its commit frame is complete; the
    /// next transaction's frames wait for its own commit frame.
    #[test]
    fn a_transaction_is_written_once_its_commit_frame_is_whole() {
        let mut buffer = WalBuffer::default();
        let mut writes = vec![(0, wal_header())];
        writes.extend(transaction(0, 5, 10));
        assert_eq!(feed(&mut buffer, &writes), [(0, 32 + 5 * (24 + PAGE))]);
        let writes = transaction(5, 3, 12);
        let (last, rest) = writes.split_last().unwrap();
        assert_eq!(feed(&mut buffer, rest), []);
        assert_eq!(
            feed(&mut buffer, std::slice::from_ref(last)),
            [(frame_offset(5), 3 * (24 + PAGE))]
        );
    }

    /// A commit frame split by a sync (SQLite pads to a sector boundary that
    /// way) is written as soon as its last part arrives.
    #[test]
    fn a_commit_frame_split_by_a_sync_is_written_at_its_end() {
        let mut buffer = WalBuffer {
            page_size: Some(PAGE as i64),
            ..WalBuffer::default()
        };
        let at = frame_offset(9);
        let first = feed(
            &mut buffer,
            &[(at, frame_header(3)), (at + 24, vec![1; 1000])],
        );
        assert_eq!(first, []);
        let mut synced = Vec::new();
        buffer.flush(|at, bytes| {
            synced.push((at, bytes.len()));
            ffi::SQLITE_OK
        });
        assert_eq!(synced, [(at, 1024)]);
        let rest = feed(&mut buffer, &[(at + 1024, vec![1; PAGE - 1000])]);
        assert_eq!(rest, [(at + 1024, PAGE - 1000)]);
    }

    /// A write that does not continue the buffer (SQLite rewriting a frame of
    /// the open transaction) sends the buffer first, in order.
    #[test]
    fn a_write_elsewhere_sends_the_buffer_first() {
        let mut buffer = WalBuffer::default();
        let mut writes = transaction(0, 2, 0);
        writes.push((frame_offset(0) + 24, vec![8; PAGE]));
        assert_eq!(
            feed(&mut buffer, &writes),
            [(frame_offset(0), 2 * (24 + PAGE))]
        );
        assert_eq!(buffer.bytes.len(), PAGE);
    }

    /// Without a page size (the header unreadable), a commit frame's header
    /// sends the buffer at once rather than waiting for an end it cannot place.
    #[test]
    fn without_a_page_size_a_commit_header_sends_at_once() {
        let mut buffer = WalBuffer::default();
        let mut written = Vec::new();
        let at = frame_offset(4);
        for (offset, bytes) in [
            (at, frame_header(0)),
            (at + 24, vec![0; PAGE]),
            (frame_offset(5), frame_header(9)),
        ] {
            buffer.write(
                &bytes,
                offset,
                || None,
                |at, bytes| {
                    written.push((at, bytes.len()));
                    ffi::SQLITE_OK
                },
            );
        }
        assert_eq!(written, [(at, 2 * 24 + PAGE)]);
    }

    /// The writer's options: the buffering VFS, and no sync at commit, so that
    /// nothing but the commit frame makes the buffer reach the file.
    async fn writer(path: &Path) -> SqliteConnection {
        crate::db::sqlite_options(path)
            .synchronous(SqliteSynchronous::Off)
            .connect()
            .await
            .unwrap()
    }

    /// Every commit through the buffering VFS is in the file when it returns:
    /// a reader on SQLite's own VFS sees it whole at once (no sync at commit,
    /// so only the commit frame flushes the buffer), also after the writer is
    /// reopened on a WAL it did not start, and the file checks out whole.
    #[tokio::test]
    async fn readers_on_the_default_vfs_see_each_commit_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let mut write = writer(&path).await;
        sqlx::raw_sql(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB); PRAGMA wal_autocheckpoint = 0",
        )
        .execute(&mut write)
        .await
        .unwrap();
        let mut read = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap();
        let mut rows = 0_i64;
        for round in 0..2 {
            if round == 1 {
                // The reader keeps the WAL: the new writer appends to it.
                write.close().await.unwrap();
                write = writer(&path).await;
            }
            for _ in 0..40 {
                let mut tx = write.begin().await.unwrap();
                for _ in 0..3 {
                    rows += 1;
                    sqlx::query("INSERT INTO t (k, v) VALUES (?1, zeroblob(3000))")
                        .bind(rows)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                let (count, bytes): (i64, i64) =
                    sqlx::query_as("SELECT COUNT(*), SUM(LENGTH(v)) FROM t")
                        .fetch_one(&mut read)
                        .await
                        .unwrap();
                assert_eq!((count, bytes), (rows, rows * 3000));
            }
        }
        let wal_frames = (std::fs::metadata(dir.path().join("wal.db-wal"))
            .unwrap()
            .len()
            - 32)
            / (24 + PAGE as u64);
        assert!(wal_frames > 80, "{wal_frames} frames");
        write.close().await.unwrap();
        read.close().await.unwrap();
        let mut check = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap();
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut check)
            .await
            .unwrap();
        assert_eq!(integrity, "ok");
    }

    /// Write system calls the thread of `io` (its `/proc/.../io`) has made.
    #[cfg(target_os = "linux")]
    fn write_calls(io: &Path) -> u64 {
        let io = std::fs::read_to_string(io).unwrap();
        io.lines()
            .find_map(|line| line.strip_prefix("syscw: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A commit of many pages is a handful of write calls, not two a page:
    /// counted on the connection's own thread (sqlx runs each connection on
    /// one), which a collation called in a query there names.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_commit_of_many_pages_is_few_write_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let wal = dir.path().join("wal.db-wal");
        let thread = Arc::new(Mutex::new(None));
        let record = Arc::clone(&thread);
        let mut conn = crate::db::sqlite_options(&path)
            .collation("thread", move |_, _| {
                *record.lock().unwrap() = std::fs::read_link("/proc/thread-self").ok();
                std::cmp::Ordering::Equal
            })
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB); SELECT 'a' = 'b' COLLATE thread",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let io = Path::new("/proc")
            .join(thread.lock().unwrap().clone().unwrap())
            .join("io");
        let frames_before = std::fs::metadata(&wal).unwrap().len();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 100) INSERT INTO t SELECT k, zeroblob(2000) FROM n")
            .execute(&mut *tx)
            .await
            .unwrap();
        let calls_before = write_calls(&io);
        tx.commit().await.unwrap();
        let calls = write_calls(&io) - calls_before;
        let frames = (std::fs::metadata(&wal).unwrap().len() - frames_before) / (24 + PAGE as u64);
        assert!(frames >= 40, "{frames} frames");
        assert!(
            calls < frames / 4,
            "{calls} write calls for {frames} frames"
        );
    }
}
