//! A page cache over SQLite's own (`pcache1`) that does not scan the whole of
//! itself at the end of a transaction that split a B-tree page.
//!
//! When a B-tree page splits, `balance_nonroot` puts the new pages in
//! ascending order by swapping page numbers, moving one of them through a
//! parking number for a moment: the lock-byte page's (`PENDING_BYTE /
//! page size + 1`, 524,289 with 2 KiB pages). `pcache1` remembers the largest
//! page number it has held since its last truncation, and every transaction
//! ends by truncating the cache at the database's size. Below 1 GiB the
//! parking number lies past the end of the file, so each such transaction
//! scans every slot of the cache's hash table for pages to drop, though there
//! are none: one cache miss a slot, about 16,000 slots for the message
//! writer's 32 MiB. Under one-to-one load on a store of half a million
//! messages that scan (`pcache1TruncateUnsafe`) was 19 % of the writer's
//! SQLite thread, and it grows with the cache (3.6 % on a new store).
//!
//! This cache passes every call to `pcache1`, and keeps its own bound on the
//! largest page number held, not counting the parking number (a page holds it
//! only inside one balance). A truncation at a limit above that bound drops
//! nothing, and is not passed on. One-to-one at 7,000 msg/s on a store of
//! 450,000 messages (200 pairs, alternating servers): the writer's SQLite
//! thread 3.44 / 3.31 → 2.70 / 2.71 s of CPU, p99 87 / 151 → 51 / 47 ms.
//!
//! SQLite takes a page cache only before it is initialised
//! (`SQLITE_CONFIG_PCACHE2`), for the whole process: [`install`] runs before
//! the first connection of any of [`super`]'s ways to open one.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint};
use std::ptr;
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// Where SQLite's lock-byte page starts in a database file (`PENDING_BYTE`).
const PENDING_BYTE: c_uint = 0x4000_0000;

/// The methods of SQLite's own cache, which this one wraps.
#[derive(Debug, Clone, Copy)]
struct Inner {
    create: unsafe extern "C" fn(c_int, c_int, c_int) -> *mut ffi::sqlite3_pcache,
    cachesize: unsafe extern "C" fn(*mut ffi::sqlite3_pcache, c_int),
    pagecount: unsafe extern "C" fn(*mut ffi::sqlite3_pcache) -> c_int,
    fetch: unsafe extern "C" fn(
        *mut ffi::sqlite3_pcache,
        c_uint,
        c_int,
    ) -> *mut ffi::sqlite3_pcache_page,
    unpin: unsafe extern "C" fn(*mut ffi::sqlite3_pcache, *mut ffi::sqlite3_pcache_page, c_int),
    rekey: unsafe extern "C" fn(
        *mut ffi::sqlite3_pcache,
        *mut ffi::sqlite3_pcache_page,
        c_uint,
        c_uint,
    ),
    truncate: unsafe extern "C" fn(*mut ffi::sqlite3_pcache, c_uint),
    destroy: unsafe extern "C" fn(*mut ffi::sqlite3_pcache),
    shrink: unsafe extern "C" fn(*mut ffi::sqlite3_pcache),
}

static INNER: OnceLock<Inner> = OnceLock::new();

/// Makes SQLite use this cache in every connection of the process; false
/// when SQLite was initialised before (it then keeps its own) or has no
/// cache to wrap. Called once before the first connection; later calls
/// return the first one's answer.
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let installed = configure();
        if !installed {
            tracing::warn!(
                "SQLite was initialised before Confab's page cache could be installed: \
                 commits that split B-tree pages scan SQLite's own cache"
            );
        }
        installed
    })
}

/// Gives SQLite this cache, wrapping its own; false when SQLite refuses.
fn configure() -> bool {
    let mut default = ffi::sqlite3_pcache_methods2 {
        iVersion: 0,
        pArg: ptr::null_mut(),
        xInit: None,
        xShutdown: None,
        xCreate: None,
        xCachesize: None,
        xPagecount: None,
        xFetch: None,
        xUnpin: None,
        xRekey: None,
        xTruncate: None,
        xDestroy: None,
        xShrink: None,
    };
    // SAFETY: SQLITE_CONFIG_GETPCACHE2 takes a pointer to a methods
    // struct to fill; SQLite refuses it once initialised. Every opening
    // of a connection in this crate calls `install` first, so no other
    // thread is in SQLite meanwhile (sqlite3_config is not thread-safe).
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &raw mut default) };
    if rc != ffi::SQLITE_OK {
        return false;
    }
    let (
        Some(create),
        Some(cachesize),
        Some(pagecount),
        Some(fetch),
        Some(unpin),
        Some(rekey),
        Some(truncate),
        Some(destroy),
        Some(shrink),
    ) = (
        default.xCreate,
        default.xCachesize,
        default.xPagecount,
        default.xFetch,
        default.xUnpin,
        default.xRekey,
        default.xTruncate,
        default.xDestroy,
        default.xShrink,
    )
    else {
        return false;
    };
    let inner = Inner {
        create,
        cachesize,
        pagecount,
        fetch,
        unpin,
        rekey,
        truncate,
        destroy,
        shrink,
    };
    if INNER.set(inner).is_err() {
        return false;
    }
    let methods = ffi::sqlite3_pcache_methods2 {
        iVersion: 1,
        // The global ones are the default cache's, with its argument.
        pArg: default.pArg,
        xInit: default.xInit,
        xShutdown: default.xShutdown,
        xCreate: Some(create_cache),
        xCachesize: Some(cachesize_cache),
        xPagecount: Some(pagecount_cache),
        xFetch: Some(fetch_page),
        xUnpin: Some(unpin_page),
        xRekey: Some(rekey_page),
        xTruncate: Some(truncate_cache),
        xDestroy: Some(destroy_cache),
        xShrink: Some(shrink_cache),
    };
    // SAFETY: as above; SQLite copies the struct.
    unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &raw const methods) == ffi::SQLITE_OK }
}

/// One cache: SQLite's, and what this one knows of it. SQLite uses a cache
/// under its connection's lock only: no locking of its own.
#[derive(Debug)]
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    methods: Inner,
    /// The page number `balance_nonroot` parks a page at: the lock-byte
    /// page's, which never holds data.
    parking: c_uint,
    /// At least the largest page number held, other than a page parked by a
    /// balance (which moves it on before the transaction ends).
    max_key: c_uint,
    /// Truncations passed on to SQLite's cache, for the tests.
    passed: u64,
}

/// # Safety
///
/// `cache` was returned by [`create_cache`] and not destroyed; SQLite calls a
/// cache's methods one at a time.
unsafe fn cache<'a>(cache: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: as the caller's.
    unsafe { &mut *cache.cast::<Cache>() }
}

unsafe extern "C" fn create_cache(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let (Some(methods), Ok(size)) = (INNER.get().copied(), c_uint::try_from(page_size)) else {
        return ptr::null_mut();
    };
    if size == 0 {
        return ptr::null_mut();
    }
    // SAFETY: the arguments are SQLite's, passed on.
    let inner = unsafe { (methods.create)(page_size, extra, purgeable) };
    if inner.is_null() {
        return ptr::null_mut();
    }
    Box::into_raw(Box::new(Cache {
        inner,
        methods,
        parking: PENDING_BYTE / size + 1,
        max_key: 0,
        passed: 0,
    }))
    .cast()
}

unsafe extern "C" fn cachesize_cache(this: *mut ffi::sqlite3_pcache, pages: c_int) {
    // SAFETY: SQLite passes a live cache of ours.
    let this = unsafe { cache(this) };
    // SAFETY: the wrapped cache is live.
    unsafe { (this.methods.cachesize)(this.inner, pages) }
}

unsafe extern "C" fn pagecount_cache(this: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    // SAFETY: as in cachesize_cache.
    unsafe { (this.methods.pagecount)(this.inner) }
}

unsafe extern "C" fn fetch_page(
    this: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    // SAFETY: as in cachesize_cache.
    let page = unsafe { (this.methods.fetch)(this.inner, key, create) };
    if !page.is_null() {
        this.max_key = this.max_key.max(key);
    }
    page
}

unsafe extern "C" fn unpin_page(
    this: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    // SAFETY: as in cachesize_cache; the page is the wrapped cache's.
    unsafe { (this.methods.unpin)(this.inner, page, discard) }
}

unsafe extern "C" fn rekey_page(
    this: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    // SAFETY: as in unpin_page.
    unsafe { (this.methods.rekey)(this.inner, page, old, new) };
    if new != this.parking {
        this.max_key = this.max_key.max(new);
    }
}

unsafe extern "C" fn truncate_cache(this: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    if limit > this.max_key {
        // No page at `limit` or beyond: nothing to drop.
        return;
    }
    this.passed += 1;
    // SAFETY: as in cachesize_cache.
    unsafe { (this.methods.truncate)(this.inner, limit) };
    this.max_key = limit.saturating_sub(1);
}

unsafe extern "C" fn destroy_cache(this: *mut ffi::sqlite3_pcache) {
    // SAFETY: SQLite destroys a cache once, and uses it no more: ours goes
    // with the wrapped one.
    let this = unsafe { Box::from_raw(this.cast::<Cache>()) };
    // SAFETY: the wrapped cache is live until here.
    unsafe { (this.methods.destroy)(this.inner) };
}

unsafe extern "C" fn shrink_cache(this: *mut ffi::sqlite3_pcache) {
    // SAFETY: as in cachesize_cache.
    let this = unsafe { cache(this) };
    // SAFETY: as in cachesize_cache.
    unsafe { (this.methods.shrink)(this.inner) }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_uint;

    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};
    use sqlx::{ConnectOptions as _, Connection as _, Row as _};

    use super::{
        PENDING_BYTE, cache, cachesize_cache, create_cache, destroy_cache, fetch_page, ffi,
        install, rekey_page, truncate_cache, unpin_page,
    };

    const PAGE: c_uint = 2048;

    /// Reads the number the test wrote at the start of a page's buffer.
    ///
    /// # Safety
    ///
    /// `page` is a live page of a cache of [`PAGE`]-byte pages.
    unsafe fn marked(page: *mut ffi::sqlite3_pcache_page) -> c_uint {
        assert!(!page.is_null());
        // SAFETY: as the caller's.
        unsafe { (*page).pBuf.cast::<c_uint>().read() }
    }

    /// The calls a B-tree balance makes to swap two pages' numbers, and a
    /// commit's truncation at the database's size: the truncation drops
    /// nothing, and is not passed on; one that drops pages is.
    #[test]
    fn a_truncation_past_every_page_but_a_parked_one_is_not_passed_on() {
        assert!(install(), "SQLite was initialised before the page cache");
        let parking = PENDING_BYTE / PAGE + 1;
        // SAFETY: the cache is used by this thread only, its pages while
        // pinned, and destroyed once; SQLite is initialised first, as on a
        // first connection (the default cache's shared state).
        unsafe {
            assert_eq!(ffi::sqlite3_initialize(), ffi::SQLITE_OK);
            let pcache = create_cache(i32::try_from(PAGE).unwrap(), 64, 1);
            assert!(!pcache.is_null());
            cachesize_cache(pcache, 100);
            for key in 1..=8 {
                let page = fetch_page(pcache, key, 2);
                (*page).pBuf.cast::<c_uint>().write(key);
                unpin_page(pcache, page, 0);
            }
            let (three, seven) = (fetch_page(pcache, 3, 0), fetch_page(pcache, 7, 0));
            rekey_page(pcache, three, 3, parking);
            rekey_page(pcache, seven, 7, 3);
            rekey_page(pcache, three, parking, 7);
            unpin_page(pcache, three, 0);
            unpin_page(pcache, seven, 0);

            truncate_cache(pcache, 9);
            assert_eq!(cache(pcache).passed, 0);
            for (key, mark) in [(3, 7), (7, 3), (8, 8)] {
                let page = fetch_page(pcache, key, 0);
                assert_eq!(marked(page), mark, "page {key}");
                unpin_page(pcache, page, 0);
            }
            assert!(fetch_page(pcache, parking, 0).is_null());

            truncate_cache(pcache, 6);
            assert_eq!(cache(pcache).passed, 1);
            assert!(fetch_page(pcache, 6, 0).is_null());
            assert!(fetch_page(pcache, 7, 0).is_null());
            let five = fetch_page(pcache, 5, 0);
            assert_eq!(marked(five), 5);
            unpin_page(pcache, five, 0);
            // Everything left is below the last limit.
            truncate_cache(pcache, 6);
            assert_eq!(cache(pcache).passed, 1);
            destroy_cache(pcache);
        }
    }

    /// A store of 2 KiB pages under this cache: inserts in random key order
    /// (B-tree splits that reorder pages), transactions that grow the file
    /// and roll back, another connection's writes (each drops every cached
    /// page: a truncation that must be passed on), a VACUUM that shrinks the
    /// file, and the file checks out whole with exactly what was committed.
    #[tokio::test]
    async fn a_database_under_the_cache_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let options = crate::db::sqlite_options(&dir.path().join("cache.db"))
            .page_size(PAGE)
            .pragma("cache_size", "-4096");
        let mut conn = options.connect().await.unwrap();
        let mut other = options.connect().await.unwrap();
        assert!(install(), "SQLite was initialised before the page cache");
        sqlx::raw_sql("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t (v)")
            .execute(&mut conn)
            .await
            .unwrap();
        // A fixed sequence of keys in no order.
        let mut random = StdRng::seed_from_u64(0x2545_f491);
        let mut committed = 0_i64;
        for round in 0..60 {
            let mut tx = conn.begin().await.unwrap();
            let rows = if round % 3 == 2 { 400 } else { 60 };
            for _ in 0..rows {
                let key: i64 = random.random_range(0..i64::MAX);
                sqlx::query("INSERT INTO t (k, v) VALUES (?1, printf('%064d', ?1))")
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            if round % 3 == 2 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                committed += rows;
            }
            if round % 10 == 9 {
                // Seen by `conn` at its next read, through a cache emptied.
                sqlx::query("UPDATE t SET v = 'x' || v WHERE k IN (SELECT k FROM t LIMIT 50)")
                    .execute(&mut other)
                    .await
                    .unwrap();
                let changed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE v LIKE 'x%'")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                assert!(changed >= 50, "round {round}: {changed} rows changed");
            }
            if round == 30 {
                // The file shrinks: pages past its new end are dropped.
                let deleted = sqlx::query("DELETE FROM t WHERE k % 2 = 0")
                    .execute(&mut conn)
                    .await
                    .unwrap()
                    .rows_affected();
                committed -= i64::try_from(deleted).unwrap();
                let pages = async |conn: &mut sqlx::SqliteConnection| -> i64 {
                    sqlx::query_scalar("PRAGMA page_count")
                        .fetch_one(conn)
                        .await
                        .unwrap()
                };
                let before = pages(&mut conn).await;
                sqlx::raw_sql("VACUUM").execute(&mut conn).await.unwrap();
                let after = pages(&mut conn).await;
                assert!(after < before, "{before} pages → {after}");
            }
        }
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(integrity, "ok");
        let row = sqlx::query("SELECT COUNT(*), COUNT(DISTINCT v) FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            (row.get::<i64, _>(0), row.get::<i64, _>(1)),
            (committed, committed)
        );
        conn.close().await.unwrap();
        other.close().await.unwrap();
    }
}
