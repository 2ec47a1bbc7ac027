//! Prefetch decisions: trend detection over recent misses, as in Leap
//! (Al Maruf & Chowdhury, ATC '20), kept per stream. Pure; the pager does
//! the fetching.
//!
//! A program often walks several arrays at once (`c[i] = a[i] + b[i]`
//! misses on three streams in turn), so one history of all misses shows no
//! trend even when every stream has one. The prefetcher keeps the last few
//! streams, each with its last [`HISTORY`] misses. A miss joins the stream
//! whose recent misses it lies within [`MAX_STRIDE`] pages of. The stream's
//! stride is the majority delta (Leap's vote) between its recent misses
//! *in address order*: threads sharing a walk (BLAS packing rows on two
//! cores) miss slightly out of order, and sorting undoes that. With a
//! majority stride, the pages beyond the stream's front (its highest page
//! if it walks up, lowest if down) are fetched in the same round trip, and
//! never-written ones zero-filled in the same `UFFDIO_COPY`.
//!
//! Prefetched pages are mapped at once, so their use is seen indirectly: a
//! miss just past the stream's last window means the program consumed all
//! of it, and the window doubles (up to the maximum); a miss inside the
//! last window means prefetched pages were evicted before use, and it
//! halves. A miss that joins no stream replaces the least recently used one;
//! while new streams keep turning out to be walks, the new one is taken for
//! a walk like the last at once (see `Prefetcher::start_stream`). Short
//! strides are fetched densely (see [`Ahead::dense`]).
//!
//! Many walks are short and alike: a training loop reads each mini-batch,
//! a few hundred pages, then jumps to another at random. Doubling windows
//! run past the end of such a walk by up to a window. So windows are also
//! cut at the *typical walk length* from the walk's first page, learned
//! like a congestion window (in strides): a walk that goes past the cut
//! (one more miss) raises it by an eighth, a cut walk that ends before it
//! (its stream is replaced) lowers it by a sixty-fourth, and a walk that
//! ended well short of it lowers it faster (see `Prefetcher::walk_ended`).
//! It settles just above the length of most walks. A walk past it gets a limit that rises
//! by twice as much each time it is reached (see `Prefetcher::walking`).

/// Misses remembered per stream.
pub const HISTORY: usize = 8;
/// Streams followed at once.
pub const STREAMS: usize = 8;
/// The window a new trend starts with.
pub const FIRST_WINDOW: usize = 4;
/// Bounds of [`Prefetcher`]'s confidence that new streams are walks.
const CONFIDENCE_MAX: i32 = 8;
/// The confidence at which a new stream is taken for a walk at once.
const CONFIDENCE_TO_GUESS: i32 = 4;
/// Strides longer than this (in pages) are not followed.
pub const MAX_STRIDE: i64 = 64;

/// The typical walk length (in strides) assumed before any walk was seen.
const FIRST_EXTENT: i64 = 64;
/// The typical walk length is raised by 1/`EXTENT_UP` when a walk goes past
/// it and lowered by 1/`EXTENT_DOWN` when a walk cut at it ends: it settles
/// where about one walk in nine goes past.
const EXTENT_UP: i64 = 8;
const EXTENT_DOWN: i64 = 64;

/// Strides up to this many pages are fetched densely (see [`Ahead::dense`]).
pub const DENSE_STRIDE: i64 = 4;

/// Whether miss `p` is just past a window ending at `last` in stride `st`:
/// the next stride or the one after (two threads sharing a walk miss
/// slightly out of order).
fn just_past(p: i64, st: i64, last: i64) -> bool {
    p == last + st || p == last + 2 * st
}

/// One detected run to prefetch: `count` pages at `from + k*stride`,
/// k = 1..=count (`from` is the faulting page or the stream's front).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ahead {
    pub from: i64,
    pub stride: i64,
    pub count: usize,
}

impl Ahead {
    /// A short stride is a dense structure read a piece at a time: the
    /// rows of a matrix (three pages each for 3072 floats) read one column
    /// block per pass, as BLAS packs its operands, miss every third page
    /// on the first pass and the pages in between on the next. The whole
    /// span is fetched at once, in the same round trip: from `back` (the
    /// walk's first remembered miss: the pages between the misses that
    /// revealed the trend) to the end of the last row of the window.
    fn dense(self, back: i64) -> Ahead {
        let s = self.stride.abs();
        if s <= 1 || s > DENSE_STRIDE {
            return self;
        }
        let dir = self.stride.signum();
        let end = self.from + self.stride * self.count as i64 + dir * (s - 1);
        let start = if (self.from - back) * dir > 0 {
            back
        } else {
            self.from
        };
        Ahead {
            from: start,
            stride: dir,
            count: ((end - start) * dir) as usize,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Stream {
    history: [i64; HISTORY],
    len: usize,
    next: usize,
    /// Current window; 0 while no trend.
    window: usize,
    /// The last window fetched: stride, first and last page.
    ahead: Option<(i64, i64, i64)>,
    /// Miss count when last used (for replacement).
    used: u64,
    /// A trend was found in this stream (it was not a lone miss).
    trended: bool,
    /// The walk this stream follows, once it is one.
    walk: Option<Walk>,
}

/// A walk's extent so far, and how far its windows may reach.
#[derive(Clone, Copy)]
struct Walk {
    /// First page.
    start: i64,
    /// +1 up, -1 down.
    dir: i64,
    /// Windows reach at most this many strides from `start`.
    limit: i64,
    /// What `limit` rises by when the walk reaches it.
    raise: i64,
    /// The walk reached its first limit, the typical length.
    past: bool,
}

impl Walk {
    fn new(start: i64, dir: i64, extent: i64) -> Self {
        Walk {
            start,
            dir,
            limit: extent,
            raise: (extent / EXTENT_UP).max(1),
            past: false,
        }
    }
}

impl Stream {
    fn record(&mut self, p: i64) {
        self.history[self.next] = p;
        self.next = (self.next + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
    }

    fn recent(&self) -> &[i64] {
        &self.history[..self.len]
    }

    /// Whether miss `p` belongs to this stream.
    fn reaches(&self, p: i64) -> bool {
        let near = self.recent().iter().any(|&h| (p - h).abs() <= MAX_STRIDE);
        let in_window = matches!(self.ahead, Some((s, first, last))
            if (first.min(last) - s.abs()..=first.max(last) + s.abs()).contains(&p));
        near || in_window
    }

    /// The majority delta between recent misses in address order, the
    /// front the walk moves from (the newest miss's side) and its back.
    fn trend(&self, newest: i64) -> Option<(i64, i64, i64)> {
        if self.len < 3 {
            return None;
        }
        let mut sorted = [0i64; HISTORY];
        let sorted = &mut sorted[..self.len];
        sorted.copy_from_slice(self.recent());
        sorted.sort_unstable();
        let deltas = sorted.windows(2).map(|w| w[1] - w[0]).filter(|&d| d != 0);
        let (mut cand, mut votes) = (0i64, 0usize);
        for d in deltas.clone() {
            if votes == 0 {
                cand = d;
                votes = 1;
            } else if d == cand {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        let n = deltas.clone().count();
        let count = deltas.filter(|&d| d == cand).count();
        if cand == 0 || cand > MAX_STRIDE || count * 2 <= n {
            return None;
        }
        let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
        // Walking up if the newest miss is in the upper half, else down.
        if newest * 2 >= lo + hi {
            Some((cand, hi, lo))
        } else {
            Some((-cand, lo, hi))
        }
    }
}

#[derive(Clone)]
pub struct Prefetcher {
    streams: [Stream; STREAMS],
    live: usize,
    misses: u64,
    max_window: usize,
    /// How often new streams turned out to be walks lately: up by one for
    /// each that found a trend, down by one for each replaced without.
    confidence: i32,
    /// The stride of the last trend followed.
    last: Option<i64>,
    /// The typical walk length in strides (see the module comment).
    extent: i64,
}

impl Prefetcher {
    /// `max_window` 0 disables prefetching.
    pub fn new(max_window: usize) -> Self {
        Self {
            streams: [Stream::default(); STREAMS],
            live: 0,
            misses: 0,
            max_window,
            confidence: 0,
            last: None,
            extent: FIRST_EXTENT,
        }
    }

    /// Records a miss on page `page`; returns what to fetch ahead of it.
    pub fn on_miss(&mut self, page: usize) -> Option<Ahead> {
        let (a, back) = self.follow(page)?;
        self.last = Some(a.stride);
        Some(a.dense(back))
    }

    /// The typical walk length (for tests).
    #[cfg(test)]
    fn extent(&self) -> i64 {
        self.extent
    }

    /// Stream `k`'s walk runs from `back` in the direction of `stride`:
    /// notes where it started, and whether miss `p` took it past its limit.
    /// The first time, the typical length rises to cover it; each time,
    /// the limit rises, by twice as much as the time before (a long scan
    /// is soon followed uncut, a walk just past the typical length gets
    /// little more than it needs).
    fn walking(&mut self, k: usize, p: i64, stride: i64, back: i64) {
        let extent = self.extent;
        let s = &mut self.streams[k];
        let dir = stride.signum();
        let w = match &mut s.walk {
            Some(w) if w.dir == dir => w,
            // A new walk, or it turned around.
            other => other.insert(Walk::new(back, dir, extent)),
        };
        let reached = (p - w.start) * dir / stride.abs() + 1;
        if reached < w.limit {
            return;
        }
        if !std::mem::replace(&mut w.past, true) {
            self.extent = (extent + (extent / EXTENT_UP).max(1)).max(reached);
        }
        while w.limit <= reached {
            w.limit += w.raise;
            w.raise *= 2;
        }
    }

    /// Stream `old` is replaced: if it was a walk that ended before its
    /// limit, the typical length falls: by a sixty-fourth if the walk was
    /// cut at it (it may have ended just there), else a quarter of the way
    /// down to where its last window ended (it ended no further).
    fn walk_ended(&mut self, old: &Stream) {
        let (Some(w), Some((st, _, last))) = (old.walk, old.ahead) else {
            return;
        };
        if w.past {
            return;
        }
        let fetched = (last - w.start) * w.dir / st.abs() + 1;
        let fall = (self.extent / EXTENT_DOWN)
            .max((self.extent - fetched) / 4)
            .max(1);
        self.extent = (self.extent - fall).max(FIRST_WINDOW as i64);
    }

    /// Cuts `a`, a window of stream `k`'s walk, at the walk's limit.
    fn cut(&mut self, k: usize, mut a: Ahead) -> Ahead {
        let s = &mut self.streams[k];
        let Some(w) = s.walk else {
            return a;
        };
        let step = a.stride.abs();
        let room = ((w.start - a.from) * w.dir + (w.limit - 1) * step) / step;
        let count = (room.max(1) as usize).min(a.count);
        if count < a.count {
            a.count = count;
            if let Some((st, first, _)) = s.ahead {
                s.ahead = Some((st, first, a.from + st * count as i64));
            }
        }
        a
    }

    /// The trend the miss continues, in its own stride, and the back of the
    /// walk (its first page still in the stream's history).
    fn follow(&mut self, page: usize) -> Option<(Ahead, i64)> {
        if self.max_window == 0 {
            return None;
        }
        let p = page as i64;
        self.misses += 1;
        let live = &self.streams[..self.live];
        // The stream this miss continues: exactly past its window first,
        // else one it lies near.
        let k = live
            .iter()
            .position(|s| matches!(s.ahead, Some((st, _, last)) if just_past(p, st, last)))
            .or_else(|| live.iter().position(|s| s.reaches(p)));
        let Some(k) = k else {
            return self.start_stream(p).map(|a| (a, p));
        };
        let max = self.max_window;
        let s = &mut self.streams[k];
        s.used = self.misses;
        match s.ahead {
            Some((st, _, last)) if just_past(p, st, last) => {
                // Walked off the end of the window: all of it was used.
                s.window = (s.window * 2).max(FIRST_WINDOW).min(max);
                // The pages read in between never missed: remember the
                // walk as the stride it was, not as one long jump.
                s.len = 0;
                for k in (0..3).rev() {
                    s.record(p - k * st);
                }
                s.ahead = Some((st, p + st, p + st * s.window as i64));
                let a = Ahead {
                    from: p,
                    stride: st,
                    count: s.window,
                };
                // A guessed walk (see `start_stream`) that held.
                if !std::mem::replace(&mut s.trended, true) {
                    self.confidence = (self.confidence + 1).min(CONFIDENCE_MAX);
                }
                self.walking(k, p, st, last);
                return Some((self.cut(k, a), last));
            }
            Some((_, first, last)) if (first.min(last)..=first.max(last)).contains(&p) => {
                // A prefetched page was evicted before it was used.
                s.window /= 2;
            }
            _ => {}
        }
        s.record(p);
        match s.trend(p) {
            Some((stride, front, back)) => {
                if !s.trended {
                    s.trended = true;
                    self.confidence = (self.confidence + 1).min(CONFIDENCE_MAX);
                }
                if s.window == 0 {
                    s.window = FIRST_WINDOW.min(max);
                }
                // Continue from the front unless the fault is past it.
                let from = if (p - front) * stride > 0 { p } else { front };
                s.ahead = Some((stride, from + stride, from + stride * s.window as i64));
                let a = Ahead {
                    from,
                    stride,
                    count: s.window,
                };
                self.walking(k, from, stride, back);
                Some((self.cut(k, a), back))
            }
            None => {
                s.ahead = None;
                s.window /= 2;
                None
            }
        }
    }

    /// Starts a stream at miss `p`, replacing the least recently used one.
    /// While new streams have lately been walks (a program visiting rows of
    /// a data set in random order starts a walk at each), the new one is
    /// taken for a walk like the last at once: in the last trend's stride,
    /// half the typical walk length is fetched ahead of this first miss,
    /// saving the misses that would otherwise reveal the trend again. Only
    /// half: a guess that held shows itself by a miss just past it (pages
    /// mapped ahead are used unseen), which fetches the rest of the walk;
    /// without that miss the guess counts as wrong.
    fn start_stream(&mut self, p: i64) -> Option<Ahead> {
        let k = if self.live < STREAMS {
            self.live += 1;
            self.live - 1
        } else {
            let k = (0..STREAMS)
                .min_by_key(|&k| self.streams[k].used)
                .unwrap_or(0);
            let old = &self.streams[k];
            if !old.trended {
                self.confidence = (self.confidence - 1).max(-CONFIDENCE_MAX);
            }
            let old = self.streams[k];
            self.walk_ended(&old);
            k
        };
        let mut s = Stream {
            used: self.misses,
            ..Stream::default()
        };
        s.record(p);
        let guess = match self.last {
            Some(stride) if self.confidence >= CONFIDENCE_TO_GUESS => {
                // Remembered as the walk it is taken for (starting here), so
                // the next misses, perhaps out of order, continue it.
                s.len = 0;
                for k in 0..3 {
                    s.record(p + k * stride);
                }
                let half = (self.extent as usize).div_ceil(2);
                s.window = half.clamp(1, self.max_window);
                s.ahead = Some((stride, p + stride, p + stride * s.window as i64));
                s.walk = Some(Walk::new(p, stride.signum(), self.extent));
                Some(Ahead {
                    from: p,
                    stride,
                    count: s.window,
                })
            }
            _ => None,
        };
        self.streams[k] = s;
        guess
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
mod tests;
