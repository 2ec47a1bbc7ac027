//! Prefetch decisions: stride detection over recent misses, in the spirit
//! of Leap (Al Maruf & Chowdhury, ATC '20), kept per stream. Pure; the
//! pager does the fetching.
//!
//! A program often walks several arrays at once (`c[i] = a[i] + b[i]`
//! misses on three streams in turn), so one history of all misses shows no
//! trend even when every stream has one. The prefetcher keeps the last few
//! streams (a miss page and stride each). A miss joins the stream it
//! continues: one whose last miss is at most [`MAX_STRIDE`] pages away.
//! The same stride seen twice in a row is a trend, and the pages ahead of
//! the miss along it are fetched in the same round trip (never-written ones
//! zero-filled in the same `UFFDIO_COPY`). Prefetched pages are mapped at
//! once, so their use is seen indirectly: a miss landing exactly where the
//! stream's last window ended means the program consumed all of it, and
//! the window doubles (up to the maximum); a miss inside the last window
//! means prefetched pages were evicted before use, and it halves. A miss
//! that continues no stream replaces the least recently used one.

/// Streams followed at once.
pub const STREAMS: usize = 8;
/// The window a new trend starts with.
pub const FIRST_WINDOW: usize = 4;
/// Strides longer than this (in pages) are not followed.
pub const MAX_STRIDE: i64 = 64;

/// One detected run to prefetch: `count` pages at `fault + k*stride`, k ≥ 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ahead {
    pub stride: i64,
    pub count: usize,
}

#[derive(Clone, Copy, Default)]
struct Stream {
    /// Last miss of this stream.
    last: i64,
    /// Stride between its last two misses (0: one miss so far).
    stride: i64,
    /// Current window; 0 while no trend.
    window: usize,
    /// The last window fetched: first and last page (`stride` apart).
    ahead: Option<(i64, i64)>,
    /// Miss count when last used (for replacement).
    used: u64,
}

pub struct Prefetcher {
    streams: [Stream; STREAMS],
    live: usize,
    misses: u64,
    max_window: usize,
}

impl Prefetcher {
    /// `max_window` 0 disables prefetching.
    pub fn new(max_window: usize) -> Self {
        Self {
            streams: [Stream::default(); STREAMS],
            live: 0,
            misses: 0,
            max_window,
        }
    }

    /// Records a miss on page `page`; returns what to fetch ahead of it.
    pub fn on_miss(&mut self, page: usize) -> Option<Ahead> {
        if self.max_window == 0 {
            return None;
        }
        let p = page as i64;
        self.misses += 1;
        let live = &mut self.streams[..self.live];
        // The stream this miss continues: exactly past its window first,
        // else the nearest one within reach.
        let k = live
            .iter()
            .position(|s| matches!(s.ahead, Some((_, end)) if p == end + s.stride))
            .or_else(|| {
                live.iter()
                    .enumerate()
                    .filter(|(_, s)| p != s.last && (p - s.last).abs() <= MAX_STRIDE)
                    .min_by_key(|(_, s)| (p - s.last).abs())
                    .map(|(k, _)| k)
            });
        let Some(k) = k else {
            self.start_stream(p);
            return None;
        };
        let max = self.max_window;
        let s = &mut self.streams[k];
        s.used = self.misses;
        let d = p - s.last;
        let trend = match s.ahead {
            Some((_, end)) if p == end + s.stride => {
                // Walked off the end of the window: all of it was used.
                s.window = (s.window * 2).clamp(FIRST_WINDOW, max);
                true
            }
            Some((first, end)) if (first.min(end)..=first.max(end)).contains(&p) => {
                // A prefetched page was evicted before it was used.
                s.window /= 2;
                s.window > 0
            }
            _ if d == s.stride => {
                s.window = s.window.max(FIRST_WINDOW.min(max));
                true
            }
            _ => {
                s.stride = d;
                s.window = 0;
                false
            }
        };
        s.last = p;
        if !trend {
            s.ahead = None;
            return None;
        }
        let count = s.window;
        s.ahead = Some((p + s.stride, p + s.stride * count as i64));
        Some(Ahead {
            stride: s.stride,
            count,
        })
    }

    fn start_stream(&mut self, p: i64) {
        let k = if self.live < STREAMS {
            self.live += 1;
            self.live - 1
        } else {
            (0..STREAMS)
                .min_by_key(|&k| self.streams[k].used)
                .unwrap_or(0)
        };
        self.streams[k] = Stream {
            last: p,
            used: self.misses,
            ..Stream::default()
        };
    }

    /// The window of the stream that last missed (for tests).
    #[cfg(test)]
    fn window(&self) -> usize {
        self.streams[..self.live]
            .iter()
            .max_by_key(|s| s.used)
            .map_or(0, |s| s.window)
    }
}

#[cfg(test)]
mod tests {
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
                stride: 1,
                count: FIRST_WINDOW
            }
        );
        // The program touches the prefetched pages without missing, then
        // misses just past the window.
        let mut next = 102 + 1 + a.count;
        let mut windows = vec![];
        for _ in 0..6 {
            let a = p.on_miss(next).expect("stream continues");
            windows.push(a.count);
            next += 1 + a.count;
        }
        assert_eq!(windows, [8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn backward_and_strided_walks_are_followed() {
        let mut p = Prefetcher::new(16);
        p.on_miss(1000);
        p.on_miss(997);
        let a = p.on_miss(994);
        assert_eq!(
            a,
            Some(Ahead {
                stride: -3,
                count: FIRST_WINDOW
            })
        );
        // Past the window's end: 994 - 3 * (FIRST_WINDOW + 1).
        let b = p.on_miss(994 - 3 * (FIRST_WINDOW + 1));
        assert_eq!(
            b,
            Some(Ahead {
                stride: -3,
                count: 2 * FIRST_WINDOW
            })
        );
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
        let a = p.on_miss(next - 10).expect("still a trend");
        assert_eq!(a.count, 16);
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
            assert_eq!(
                got[6 + k],
                Some(Ahead {
                    stride: 1,
                    count: FIRST_WINDOW
                }),
                "stream {base}"
            );
        }
    }

    #[test]
    fn disabled_prefetcher_never_fetches() {
        let mut p = Prefetcher::new(0);
        for i in 0..100 {
            assert_eq!(p.on_miss(i), None);
        }
    }
}
