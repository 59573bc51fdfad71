//! Snowflake id generation: one thread, and several threads sharing one
//! generator (the writer is the only caller in production, but the lock is
//! there). Run with `cargo bench --bench ids`.

use confab_common::ids::Snowflake;
use divan::{Bencher, black_box};

fn main() {
    divan::main();
}

/// One id from a generator used by one thread.
#[divan::bench]
fn next_id(bencher: Bencher<'_, '_>) {
    let ids = Snowflake::new(7);
    bencher.bench_local(|| black_box(&ids).next_id());
}

/// One id from a generator shared by every thread divan runs.
#[divan::bench(threads = [2, 4])]
fn next_id_shared(bencher: Bencher<'_, '_>) {
    let ids = Snowflake::new(7);
    bencher.bench(|| black_box(&ids).next_id());
}
