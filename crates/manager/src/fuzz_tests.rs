//! State-machine fuzzing of the global manager: random sequences of
//! requests (from components and clients, with ids, addresses and sizes
//! from the edges) and clock ticks applied to one [`Cluster`]. Nothing may
//! panic, every answer must fit one control frame, and the component count
//! stays within its cap. Each proptest case is a seed; `PROPTEST_CASES`
//! sets how many.

use lego_protocol::control::{
    self, Kind, ProcessInfo, Reply, Request, MAX_COMPONENTS, MAX_PROGRAM_BYTES,
};
use lego_protocol::MAX_CONTROL_BYTES;
use proptest::prelude::*;

use crate::state::Cluster;

const STEPS: usize = 300;

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
    fn value(&mut self) -> u64 {
        const EDGES: [u64; 8] = [0, 1, 2, 3, 1 << 32, u64::MAX, u64::MAX - 1, 16 << 20];
        match self.below(3) {
            0 => self.next(),
            1 => self.below(8),
            _ => EDGES[self.below(EDGES.len() as u64) as usize],
        }
    }
    fn text(&mut self, most: u64) -> String {
        let n = match self.below(4) {
            0 => self.below(most),
            _ => self.below(24),
        };
        (0..n)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

fn request(rng: &mut Rng) -> Request {
    let kind = if rng.below(2) == 0 {
        Kind::Memory
    } else {
        Kind::Processor
    };
    match rng.below(11) {
        0 | 1 => Request::Register {
            kind,
            addr: rng.text(400),
            capacity_bytes: rng.value(),
            id: (rng.below(2) == 0).then(|| rng.value()),
            key: rng.text(40),
            zone: rng.text(300),
        },
        2 | 3 => Request::Heartbeat {
            id: rng.value(),
            key: rng.text(40),
            used_bytes: rng.value(),
            load: rng.next() as u32,
            spaces: (0..rng.below(6)).map(|_| rng.value()).collect(),
            processes: (0..rng.below(4))
                .map(|_| ProcessInfo {
                    pid: rng.next() as u32,
                    program: rng.text(2 * MAX_PROGRAM_BYTES as u64),
                    excache_bytes: rng.value(),
                    // Counters as a user's file may have them: lists of
                    // any length up to past the limit.
                    counters: (rng.below(2) == 0).then(|| control::ProgramCounters {
                        remote_misses: rng.value(),
                        miss_latency: (0..rng.below(80)).map(|_| rng.value()).collect(),
                        spaces: (0..rng.below(80)).map(|_| rng.value()).collect(),
                        ..Default::default()
                    }),
                })
                .collect(),
        },
        4 => Request::Leave {
            id: rng.value(),
            key: rng.text(40),
        },
        5 => Request::PlaceMemory {
            space: rng.value(),
            unit: rng.value(),
            keep: (0..rng.below(5)).map(|_| rng.value()).collect(),
            avoid: (0..rng.below(3)).map(|_| rng.value()).collect(),
        },
        6 => Request::Restored {
            space: rng.value(),
            unit: rng.value(),
            ids: (0..rng.below(4)).map(|_| rng.value()).collect(),
        },
        7 => Request::Drain { id: rng.value() },
        8 => Request::Undrain { id: rng.value() },
        9 => Request::PlaceProcess {
            program: rng.text(64),
            excache_bytes: rng.value(),
        },
        _ => Request::Status,
    }
}

fn run(seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut c = Cluster::new(1000).with_replicas(1 + rng.below(3) as usize);
    let mut now = 0u64;
    for _ in 0..STEPS {
        now += rng.below(400);
        if rng.below(10) == 0 {
            c.tick(now);
            continue;
        }
        let (reply, _) = c.apply(now, request(&mut rng));
        let json = control::to_json(&reply);
        assert!(json.len() <= MAX_CONTROL_BYTES, "{} bytes", json.len());
        assert!(c.components.len() <= MAX_COMPONENTS);
        assert!(c
            .components
            .values()
            .flat_map(|x| &x.processes)
            .all(|p| p.counters.as_ref().is_none_or(|k| k.is_sane())));
        if let Reply::Registered { id, .. } = reply {
            assert!(id > 0, "component id 0");
        }
    }
    let status = control::to_json(&Reply::Status(Box::new(c.status(now))));
    assert!(status.len() <= MAX_CONTROL_BYTES);
}

proptest! {
    #[test]
    fn requests_never_panic_and_answers_fit_a_frame(seed in any::<u64>()) {
        run(seed);
    }
}

#[test]
fn a_claimed_id_at_the_top_does_not_wrap_the_next_ones() {
    let mut c = Cluster::new(1000);
    let register = |c: &mut Cluster, id| {
        c.apply(
            0,
            Request::Register {
                kind: Kind::Memory,
                addr: "127.0.0.1:1".into(),
                capacity_bytes: 1 << 30,
                id,
                key: String::new(),
                zone: String::new(),
            },
        )
        .0
    };
    assert!(matches!(
        register(&mut c, Some(u64::MAX)),
        Reply::Error { .. }
    ));
    assert!(matches!(
        register(&mut c, Some(control::MAX_COMPONENT_ID)),
        Reply::Registered { .. }
    ));
    // The next new one has no id left above: refused, not id 0.
    let r = c.apply(
        0,
        Request::Register {
            kind: Kind::Processor,
            addr: "127.0.0.1:2".into(),
            capacity_bytes: 1 << 30,
            id: None,
            key: String::new(),
            zone: String::new(),
        },
    );
    assert!(matches!(r.0, Reply::Error { .. }), "{:?}", r.0);
}
