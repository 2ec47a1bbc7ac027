//! State-machine fuzzing of the memory daemon's request handler: random
//! sequences of requests from several connections, encoded, sometimes
//! mutated on the way, decoded and served by [`super::handle`] on one
//! [`Store`]. Nothing may panic, the store's accounting must hold after
//! every step, and once every connection is gone nothing is left.
//!
//! Each proptest case is a seed; `PROPTEST_CASES` sets how many (CI runs
//! the default, docs/security.md records a long run).

use lego_protocol::{decode, encode, Capability, Message, SpaceId, VirtAddr, PAGE_SIZE};
use proptest::prelude::*;

use super::{handle, Reply};
use crate::store::Store;

/// Frames per case.
const STEPS: usize = 300;
const CONNECTIONS: usize = 4;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A value from the edges where bugs live, or any.
    fn value(&mut self) -> u64 {
        const EDGES: [u64; 12] = [
            0,
            1,
            4095,
            4096,
            1 << 30,
            1 << 40,
            (1 << 40) + (2 << 30),
            (1 << 40) + (3 << 30) - 4096,
            4 << 30,
            u64::MAX,
            u64::MAX - 4095,
            1 << 63,
        ];
        match self.below(4) {
            0 => self.next(),
            1 => (1 << 40) + self.below(4 << 30) / 4096 * 4096,
            _ => EDGES[self.below(EDGES.len() as u64) as usize],
        }
    }
}

const CAPS: [Capability; 2] = [Capability([1; 16]), Capability([2; 16])];

/// One request, as a connection might send it, with ids from those seen.
fn request(rng: &mut Rng, known: &[SpaceId], page: &[u8]) -> Vec<u8> {
    let id = |rng: &mut Rng| match (known.is_empty(), rng.below(3)) {
        (false, 0 | 1) => known[rng.below(known.len() as u64) as usize],
        _ => SpaceId(rng.value()),
    };
    let cap = |rng: &mut Rng| CAPS[rng.below(2) as usize];
    let addrs: Vec<VirtAddr> = (0..rng.below(4)).map(|_| VirtAddr(rng.value())).collect();
    let data = page.repeat(addrs.len());
    let m = match rng.below(15) {
        0 => Message::OpenSpace {
            pid: 1,
            program: "fuzz",
            region_base: VirtAddr(if rng.below(2) == 0 {
                1 << 40
            } else {
                rng.value()
            }),
            region_bytes: if rng.below(2) == 0 {
                4 << 30
            } else {
                rng.value()
            },
            bootstrap_bytes: if rng.below(2) == 0 { 0 } else { rng.value() },
            capability: cap(rng),
        },
        1 => Message::AttachSpace {
            space: id(rng),
            capability: cap(rng),
            region_base: VirtAddr(1 << 40),
            region_bytes: rng.value(),
        },
        2 => Message::ForkSpace {
            parent: id(rng),
            parent_capability: cap(rng),
            child: if rng.below(2) == 0 {
                SpaceId(0)
            } else {
                id(rng)
            },
            child_capability: cap(rng),
        },
        3 => Message::Mmap { len: rng.value() },
        4 => Message::Munmap {
            addr: VirtAddr(rng.value()),
            len: rng.value(),
        },
        5 => Message::Mremap {
            old: VirtAddr(rng.value()),
            old_len: rng.value(),
            new_len: rng.value(),
            may_move: rng.below(2) == 0,
        },
        6 => Message::Brk {
            new_brk: VirtAddr(rng.value()),
        },
        7 => Message::Discard {
            addr: VirtAddr(rng.value()),
            len: rng.value(),
        },
        8 | 9 => Message::ReadPages {
            addrs: addrs.into(),
        },
        10 | 11 => {
            let mut frame = Vec::new();
            let m = if rng.below(3) == 0 {
                Message::FillPages {
                    epoch: rng.below(3),
                    addrs: addrs.into(),
                    data: &data,
                }
            } else {
                Message::WritePages {
                    addrs: addrs.into(),
                    data: &data,
                }
            };
            encode(0, &m, &mut frame);
            return frame;
        }
        12 if rng.below(2) == 0 => Message::BeginFill {
            addr: VirtAddr(rng.value()),
            len: rng.value(),
            epoch: rng.below(3),
        },
        12 => Message::GetStats,
        13 => Message::GetLayout,
        _ => Message::Layout {
            brk_start: VirtAddr(rng.value()),
            brk: VirtAddr(rng.value()),
            mappings: (0..rng.below(4))
                .map(|_| (rng.value(), rng.value()))
                .collect(),
        },
    };
    let mut frame = Vec::new();
    encode(0, &m, &mut frame);
    frame
}

fn run(seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut st = Store::new(64 * PAGE_SIZE as u64);
    let mut spaces: [Option<SpaceId>; CONNECTIONS] = [None; CONNECTIONS];
    let mut known: Vec<SpaceId> = Vec::new();
    let page = vec![0xa5u8; PAGE_SIZE];
    let mut out = Vec::new();
    for _ in 0..STEPS {
        let c = rng.below(CONNECTIONS as u64) as usize;
        if rng.below(20) == 0 {
            // The connection closes.
            if let Some(id) = spaces[c].take() {
                st.release(id);
            }
            continue;
        }
        let mut frame = request(&mut rng, &known, &page);
        if rng.below(8) == 0 {
            // Damaged on the way.
            let at = rng.below(frame.len() as u64) as usize;
            frame[at] ^= 1 << rng.below(8);
        }
        let Ok(f) = decode(&frame) else {
            // The connection would close.
            if let Some(id) = spaces[c].take() {
                st.release(id);
            }
            continue;
        };
        if let Ok(Reply::Opened(id)) = handle(&mut st, &mut spaces[c], f.message, &mut out) {
            known.push(id);
        }
        let s = st.stats();
        assert!(s.used_bytes <= s.capacity_bytes, "{s:?}");
    }
    for s in spaces.iter_mut() {
        if let Some(id) = s.take() {
            st.release(id);
        }
    }
    let s = st.stats();
    assert_eq!((s.spaces, s.used_bytes), (0, 0), "leaked: {s:?}");
}

/// Found by this fuzzer: a batch naming one page twice was counted as
/// two pages, one of which was never freed.
#[test]
fn a_batch_naming_a_page_twice_counts_it_once() {
    run(982420648500219466);
}

proptest! {
    #[test]
    fn requests_never_panic_and_leave_nothing_behind(seed in any::<u64>()) {
        run(seed);
    }
}
