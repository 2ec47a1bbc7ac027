//! The prefetcher's decisions, case by case.
use super::*;

#[test]
fn sequential_walk_grows_the_window_to_the_maximum() {
    let mut p = Prefetcher::new(64);
    assert_eq!(p.on_miss(100), None);
    assert_eq!(p.on_miss(101), None);
    let a = p.on_miss(102).expect("trend after three misses");
    assert_eq!(
        a,
        Ahead {
            from: 102,
            stride: 1,
            count: FIRST_WINDOW
        }
    );
    // The program touches the prefetched pages without missing, then
    // misses just past the window.
    let mut next = 102 + 1 + a.count;
    let mut windows = vec![];
    for _ in 0..9 {
        let a = p.on_miss(next).expect("stream continues");
        windows.push(a.count);
        next += 1 + a.count;
    }
    // The third window is cut at the typical walk length assumed at
    // first (FIRST_EXTENT pages from 100). Past it, the walk's limit
    // rises by 8, 16, 32, 64 pages, ..., so a window is cut short now
    // and then, ever more rarely (a scan of n pages pays about log2(n)
    // misses more).
    assert_eq!(windows, [8, 16, 30, 7, 15, 31, 63, 64, 62]);
    assert!(p.extent() > FIRST_EXTENT);
}

#[test]
fn backward_and_strided_walks_are_followed() {
    let mut p = Prefetcher::new(16);
    p.on_miss(1000);
    p.on_miss(992);
    let a = p.on_miss(984);
    assert_eq!(
        a,
        Some(Ahead {
            from: 984,
            stride: -8,
            count: FIRST_WINDOW
        })
    );
    // Past the window's end: 984 - 8 * (FIRST_WINDOW + 1).
    let from = 984 - 8 * (FIRST_WINDOW as i64 + 1);
    let b = p.on_miss(from as usize);
    assert_eq!(
        b,
        Some(Ahead {
            from,
            stride: -8,
            count: 2 * FIRST_WINDOW
        })
    );
}

#[test]
fn a_short_stride_is_fetched_densely_and_keeps_its_window() {
    let mut p = Prefetcher::new(16);
    p.on_miss(1000);
    p.on_miss(997);
    let a = p.on_miss(994);
    // Rows of three pages walked downwards: every page from the first
    // miss (the pages between the misses too) to the end of the fourth
    // row below 994: 999 down to 994 - 3*4 - 2.
    assert_eq!(
        a,
        Some(Ahead {
            from: 1000,
            stride: -1,
            count: 1000 - (994 - 3 * FIRST_WINDOW - 2)
        })
    );
    // The window still grows in the stream's own stride when the
    // program misses just past it: two rows per row before.
    let from = 994 - 3 * (FIRST_WINDOW as i64 + 1);
    // Fetched from the window's end (982): a miss a stride further on
    // would not leave a row out.
    let b = p.on_miss(from as usize).expect("stream continues");
    assert_eq!((b.from, b.stride), (from + 3, -1));
    assert_eq!(b.count, 3 + 3 * 2 * FIRST_WINDOW + 2);
}

#[test]
fn random_misses_prefetch_nothing() {
    let mut p = Prefetcher::new(64);
    let mut x: u64 = 12345;
    let mut fetched = 0;
    for _ in 0..1000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if p.on_miss((x >> 20) as usize % 1_000_000).is_some() {
            fetched += 1;
        }
    }
    assert!(fetched < 5, "{fetched} prefetches on random misses");
}

#[test]
fn a_miss_inside_the_last_window_shrinks_it() {
    let mut p = Prefetcher::new(64);
    for i in 0..3 {
        p.on_miss(10 + i);
    }
    let mut next = 13 + FIRST_WINDOW;
    for _ in 0..3 {
        next += 1 + p.on_miss(next).unwrap().count;
    }
    assert_eq!(p.window(), 32);
    // The last window started at `next - 32`; a miss inside it means
    // prefetched pages were thrown out unused.
    p.on_miss(next - 10).expect("still a trend");
    assert_eq!(p.window(), 16);
}

#[test]
fn interleaved_streams_are_each_followed() {
    let mut p = Prefetcher::new(64);
    // c[i] = a[i] + b[i]: three arrays far apart, missed in turn.
    let (a, b, c) = (1_000, 50_000, 900_000);
    let mut got = vec![];
    for i in 0..3 {
        for base in [a, b, c] {
            got.push(p.on_miss(base + i));
        }
    }
    assert_eq!(&got[..6], &[None; 6]);
    for (k, base) in [a, b, c].into_iter().enumerate() {
        let want = Ahead {
            from: base as i64 + 2,
            stride: 1,
            count: FIRST_WINDOW,
        };
        assert_eq!(got[6 + k], Some(want), "stream {base}");
    }
}

#[test]
fn two_threads_walking_out_of_order_are_one_trend() {
    // Rows of 3 pages read by two BLAS threads: misses arrive slightly
    // out of order (+6, +3, +6, -3, ...), the walk is stride 3 upward.
    let mut p = Prefetcher::new(64);
    let mut last = None;
    for page in [901, 907, 910, 916, 913, 919] {
        last = p.on_miss(page);
    }
    let a = last.expect("a trend despite the reordering");
    // Stride 3, fetched densely: every page from the first miss to the
    // end of the rows ahead.
    assert_eq!((a.from, a.stride), (901, 1));
    assert!(a.count >= 919 + 2 - 901, "{a:?}");
}

#[test]
fn new_walks_are_guessed_while_new_streams_keep_being_walks() {
    let mut p = Prefetcher::new(64);
    // Walks of six rows of three pages at scattered places (mini-batches
    // in random order): after a few, the first miss of the next one
    // already fetches ahead.
    let walk = |p: &mut Prefetcher, base: usize| -> Option<Ahead> {
        let first = p.on_miss(base);
        for r in 1..6 {
            p.on_miss(base + 3 * r);
        }
        first
    };
    let firsts: Vec<_> = (0..16).map(|k| walk(&mut p, 100_000 * (k + 1))).collect();
    assert_eq!(firsts[0], None);
    let last = firsts[15].expect("a guessed walk");
    assert_eq!((last.from, last.stride), (1_600_000, 1));
    // Random misses wear the confidence down: no more guesses.
    let mut x: u64 = 99;
    for _ in 0..64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.on_miss((x >> 24) as usize % 100_000_000);
    }
    assert_eq!(p.on_miss(500_000_000), None);
}

/// Runs a program that reads `walks` walks of `rows` rows of three
/// pages each, at scattered places, one after the other (mini-batches
/// visited in random order), each the way BLAS packs a matrix: the
/// first page of every row, then the second, then the third. Fetches
/// what the prefetcher asks for. Returns the misses and the pages
/// fetched outside the walks in the last `tail` walks.
fn short_walks(p: &mut Prefetcher, walks: usize, rows: i64, tail: usize) -> (usize, usize) {
    let (mut misses, mut over) = (0, 0);
    for w in 0..walks {
        let base = 1_000_000 * (w as i64 + 1);
        let mut fetched = std::collections::BTreeSet::new();
        for col in 0..3 {
            for row in 0..rows {
                let page = base + 3 * row + col;
                if !fetched.insert(page) {
                    continue;
                }
                if let Some(a) = p.on_miss(page as usize) {
                    fetched.extend((1..=a.count as i64).map(|k| a.from + k * a.stride));
                }
                if w >= walks - tail {
                    misses += 1;
                }
            }
        }
        if w >= walks - tail {
            over += fetched
                .iter()
                .filter(|&&q| q < base || q >= base + 3 * rows)
                .count();
        }
    }
    (misses, over)
}

#[test]
fn windows_settle_at_the_length_of_short_walks() {
    let mut p = Prefetcher::new(64);
    // Walks of 40 rows (120 pages). Doubling windows alone would run a
    // window past each; cut at the learned length, the walks take about
    // two misses each (a guess, then the rest) and fetch little past
    // their ends.
    let (misses, over) = short_walks(&mut p, 300, 40, 100);
    assert!(misses <= 220, "{misses} misses in 100 walks");
    assert!(over <= 100 * 120 / 8, "{over} pages fetched past 100 walks");
    assert!((40..=48).contains(&p.extent()), "extent {}", p.extent());
    // Longer walks raise it.
    short_walks(&mut p, 100, 60, 0);
    assert!((60..=72).contains(&p.extent()), "extent {}", p.extent());
    // After long scans (a data set written in chunks), short walks
    // bring it down within a few dozen walks.
    short_walks(&mut p, 20, 5000, 0);
    assert!(p.extent() > 200, "extent {}", p.extent());
    let (_, over) = short_walks(&mut p, 100, 40, 50);
    assert!(over <= 50 * 120 / 8, "{over} pages fetched past 50 walks");
}

#[test]
fn disabled_prefetcher_never_fetches() {
    let mut p = Prefetcher::new(0);
    for i in 0..100 {
        assert_eq!(p.on_miss(i), None);
    }
}
