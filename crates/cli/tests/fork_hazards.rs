//! fork in every situation that once left a program waiting on a page
//! nobody serves (invariant 7: runtime threads never touch disaggregated
//! memory, also in a fork child), each at a small ExCache so that nearly
//! everything is evicted when it happens. Every run's output must equal a
//! plain run's.

mod common;

use common::*;

/// The reproduction of the hang: a forked Python worker's new pager thread
/// read the locale data glibc had allocated in disaggregated memory (in
/// `start_thread`), evicted by then. Workers run one task each so the
/// output does not depend on which worker got which task.
const POOL: &str = "import hashlib, multiprocessing as mp
blob = bytearray(MB << 20)
for i in range(0, len(blob), 4096): blob[i] = 1
d0 = hashlib.sha256(blob).hexdigest()
def f(k):
    for i in range(k, len(blob), 8192): blob[i] ^= 0x5A
    return hashlib.sha256(blob[k*4096:(k+64)*4096]).hexdigest()[:8]
with mp.get_context('fork').Pool(2, maxtasksperchild=1) as p: print(p.map(f, range(4)))
";

fn pool_same_as_plain(mb: u32, excache: &str) {
    let script = POOL.replace("MB", &mb.to_string());
    let expect = plain(&[PYTHON3, "-c", &script], None);
    assert!(expect.status.success(), "{}", text(&expect.stderr));
    let (got, stats) = under_lego(&["--excache", excache], &[PYTHON3, "-c", &script], None);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), text(&expect.stdout));
    assert!(stats["processes"].as_u64().unwrap() >= 5, "{stats}");
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn python_pool_workers_forked_after_hashlib_finish() {
    pool_same_as_plain(96, "24M");
}

#[test]
fn python_pool_workers_finish_with_a_one_mib_excache() {
    pool_same_as_plain(8, "1M");
}

fn hazard(mode: &str) {
    let prog = compile("fork_hazards", &[]);
    let p = prog.to_str().unwrap();
    let expect = plain(&[p, mode, "32"], None);
    assert!(expect.status.success(), "{}", text(&expect.stdout));
    let (got, stats) = under_lego(&["--excache", "2M"], &[p, mode, "32"], None);
    assert!(
        got.status.success(),
        "{mode}: {} {}",
        text(&got.stdout),
        text(&got.stderr)
    );
    assert_eq!(text(&got.stdout), text(&expect.stdout));
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn fork_while_two_threads_write_and_page() {
    hazard("busy");
}

#[test]
fn fork_inside_a_signal_handler_that_interrupted_malloc() {
    hazard("signal");
}

#[test]
fn nested_forks_each_see_their_parents_memory() {
    hazard("nested");
}

#[test]
fn posix_spawn_and_vfork_from_a_paging_program() {
    hazard("spawn");
}
