//! The property test: random programs of faults, writes, evictions,
//! forks, frees and discards against a model of memory contents.

use proptest::prelude::*;

use super::{word, Machine};

/// One step of a random program.
#[derive(Clone, Debug)]
enum Op {
    Read {
        page: usize,
        word: usize,
    },
    Write {
        page: usize,
        word: usize,
        v: u64,
    },
    Evict,
    Fork,
    /// Switch to the `n`th process (mod the count).
    Switch(usize),
    Free {
        page: usize,
        count: usize,
    },
    Discard {
        page: usize,
        count: usize,
    },
}

const PAGES: usize = 48;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PAGES, 0usize..4).prop_map(|(page, word)| Op::Read { page, word }),
        6 => (0..PAGES, 0usize..4, any::<u64>()).prop_map(|(page, word, v)| Op::Write { page, word, v }),
        2 => Just(Op::Evict),
        1 => Just(Op::Fork),
        1 => (0usize..8).prop_map(Op::Switch),
        1 => (0..PAGES, 1usize..6).prop_map(|(page, count)| Op::Free { page, count }),
        1 => (0..PAGES, 1usize..6).prop_map(|(page, count)| Op::Discard { page, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
    ))]

    /// No lost or stale write, whatever the faults, evictions, forks, frees
    /// and discards: every read returns what the model says.
    #[test]
    fn memory_reads_what_was_written(ops in proptest::collection::vec(op(), 1..120), budget in 4usize..12, prefetch in 0usize..9, tier in prop_oneof![Just(0usize), 1usize..6000, Just(1 << 20)]) {
        // The tier: off, a few compressed pages (constant demotion), or a
        // share larger than the budget (bounded by the budget alone).
        let mut procs = vec![Machine::new(PAGES, budget, prefetch, 2).with_tier(tier)];
        let mut cur = 0;
        for op in ops {
            if let Op::Fork = op {
                if procs.len() < 6 {
                    let child = procs[cur].fork();
                    procs.push(child);
                }
                continue;
            }
            let m = &mut procs[cur];
            match op {
                Op::Read { page, word: w } => { m.read(word(page, w * 64)); }
                Op::Write { page, word: w, v } => m.write(word(page, w * 64), v),
                Op::Evict => m.evict(),
                Op::Fork => {}
                Op::Switch(n) => cur = n,
                Op::Free { page, count } => m.free(page, count.min(PAGES - page)),
                Op::Discard { page, count } => m.discard(page, count.min(PAGES - page)),
            }
            cur %= procs.len();
            procs[cur].check();
        }
        // Everything still reads right in every process.
        for m in &mut procs {
            for page in 0..PAGES {
                for w in 0..4 {
                    m.read(word(page, w * 64));
                }
            }
            m.check();
        }
    }
}
