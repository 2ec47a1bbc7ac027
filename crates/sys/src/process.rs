//! Process control for `lego run`: signal forwarding and exit-status
//! pass-through.

use std::sync::atomic::{AtomicI32, Ordering};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // Terminal-generated SIGINT/SIGQUIT (si_code SI_KERNEL) already reach the
    // whole foreground process group, child included: forward only signals
    // sent to lego itself.
    if (sig == libc::SIGINT || sig == libc::SIGQUIT) && code > 0 {
        return;
    }
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes no pointers.
        unsafe { libc::kill(pid, sig) };
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn to_pipe(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _ = (info, ctx);
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write is async-signal-safe; one byte from a valid buffer.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

/// The signals lego passes on to the program it runs (from `lego run` to
/// a program on another host, and on to it there).
pub const PASSED_SIGNALS: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Delivers SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
/// this process to `deliver`, called on a thread of its own, instead of
/// their default action (for `lego run` of a program on another host).
pub fn signals_to(deliver: impl Fn(i32) + Send + 'static) -> std::io::Result<()> {
    let (r, w) = pipe()?;
    SIGNAL_PIPE.store(w, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("lego-signals".into())
        .spawn(move || loop {
            let mut b = 0u8;
            // SAFETY: reads one byte into a valid buffer.
            let n = unsafe { libc::read(r, &mut b as *mut u8 as *mut libc::c_void, 1) };
            match n {
                1 => deliver(b as i32),
                n if n < 0 && crate::last_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return,
            }
        })?;
    // The handler only calls write.
    handle_passed_signals(to_pipe);
    Ok(())
}

pub use libc::{SIGKILL, SIGSTOP, SIGTERM};

/// Whether `sig`, one of those [`signals_to`] delivers, asks a process to
/// end: SIGINT, SIGTERM, SIGHUP or SIGQUIT (not SIGUSR1 or SIGUSR2).
pub fn asks_to_end(sig: i32) -> bool {
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
}

/// A signal handler of the `SA_SIGINFO` kind.
type Handler = extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` (which must call only async-signal-safe functions)
/// for the signals lego passes on to a program: SIGINT, SIGTERM, SIGHUP,
/// SIGQUIT, SIGUSR1 and SIGUSR2.
fn handle_passed_signals(handler: Handler) {
    for sig in PASSED_SIGNALS {
        // SAFETY: sa is fully initialised; the handler is async-signal-safe
        // by this function's contract.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Sends signal `sig` to process `pid`.
pub fn send_signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill has no memory arguments.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
/// this process to `pid`.
pub fn forward_signals_to(pid: i32) {
    CHILD.store(pid, Ordering::Relaxed);
    // The handler only calls kill.
    handle_passed_signals(forward);
}

/// Ends this process the way a child ended: by the same signal, or with the
/// same exit code.
pub fn exit_like(status: std::process::ExitStatus) -> ! {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        // SAFETY: restoring the default action and raising a signal have no
        // memory-safety preconditions.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // Do not leave a core file of lego behind for the program's crash.
            let lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &lim);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(status.code().unwrap_or(1))
}

/// Writes `lego: <msg>` to stderr with one `write` (no stdio lock, which
/// the program may hold).
pub fn warn(msg: &str) {
    let line = format!("lego: {msg}\n");
    // SAFETY: write takes a valid buffer of the given length.
    unsafe { libc::write(2, line.as_ptr() as *const libc::c_void, line.len()) };
}

/// Writes `lego: <msg>` to stderr and ends the process at once with
/// [`FATAL_EXIT_CODE`], without running exit handlers (which could touch
/// memory that can no longer be served).
pub fn die(msg: &str) -> ! {
    warn(msg);
    // SAFETY: _exit takes no pointers.
    unsafe { libc::_exit(FATAL_EXIT_CODE) }
}

/// Exit status of a program whose runtime hit a fatal error.
pub const FATAL_EXIT_CODE: i32 = 125;

/// `poll(2)` over `fds`; returns how many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> std::io::Result<usize> {
    // SAFETY: fds is a valid, writable slice of pollfd structs.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = crate::last_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Registers fork handlers (`pthread_atfork`).
pub fn at_fork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) {
    // SAFETY: the handlers are plain functions that live for the whole
    // process (they are in the runtime library, never unloaded).
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
    }
}

type Start = Box<dyn FnOnce() + Send + 'static>;

extern "C" fn thread_start(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: arg is the Box<Start> leaked by spawn_thread, used once.
    let (hook, f) = *unsafe { Box::from_raw(arg as *mut (fn(), Start)) };
    hook();
    f();
    std::ptr::null_mut()
}

/// Starts a detached thread with `pthread_create`, running `first` before
/// anything else in it (Rust's own thread start-up allocates before a
/// closure passed to `std::thread::spawn` gets control). The thread blocks
/// every signal from birth: the program's handlers must run in the
/// program's threads (a handler touching memory only this thread can page
/// in would otherwise deadlock it). Its stack is mapped here rather than
/// taken from glibc's stack cache: a cached stack (after fork, the parent's
/// other threads' stacks are cached) comes with its old thread-local
/// storage vector, which the program may have allocated in memory only
/// this thread could page in.
pub fn spawn_thread(first: fn(), f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    const STACK_BYTES: usize = 4 << 20;
    let stack = crate::mm::mmap_raw(
        0,
        STACK_BYTES,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
        -1,
        0,
    )?;
    let arg = Box::into_raw(Box::new((first, Box::new(f) as Start)));
    // SAFETY: attr is initialised before use and destroyed after; the thread
    // takes ownership of `arg` exactly once.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        // The thread lives as long as the process: its stack is never freed.
        libc::pthread_attr_setstack(&mut attr, stack as *mut libc::c_void, STACK_BYTES);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut tid: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut tid, &attr, thread_start, arg as *mut libc::c_void);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if r != 0 {
            drop(Box::from_raw(arg));
            let _ = crate::mm::munmap_raw(stack, STACK_BYTES);
            return Err(std::io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> std::io::Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(crate::last_error());
    }
    Ok((fds[0], fds[1]))
}

/// Closes a descriptor this code owns.
pub fn close(fd: i32) {
    // SAFETY: callers pass descriptors they own and no longer use.
    unsafe { libc::close(fd) };
}

/// Writes one byte to a pipe.
pub fn signal_pipe(fd: i32) {
    let b = 1u8;
    // SAFETY: writes one byte from a valid buffer.
    unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
}

/// Blocks until a pipe has a byte or reaches end of file (at most 30 s).
pub fn wait_readable_or_eof(fd: i32) {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let _ = poll(&mut p, 30_000);
}

/// Every signal blocked in the calling thread until this is dropped (then
/// the mask it had before is restored): a signal handler of the program
/// cannot run, and so cannot `fork`, while the thread holds one of the
/// runtime's locks.
pub struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    pub fn new() -> Self {
        // SAFETY: both sets are plain data written by the calls; a failing
        // pthread_sigmask leaves `old` as the empty set it was given.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            Self { old }
        }
    }
}

impl Default for SignalsBlocked {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores a mask read by pthread_sigmask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// An identifier of the calling thread, cheap to read (`pthread_self`).
pub fn thread_id() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only on a CPU that
/// has nothing else to run.
pub fn set_idle_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r < 0 {
        return Err(crate::last_error());
    }
    Ok(())
}

/// Gives up the CPU to another runnable thread, if there is one.
pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// How many CPUs the calling thread may run on.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The name of the runtime's keeper threads (they spin while misses come
/// close together and never serve a fault).
pub const KEEPER_THREAD_NAME: &str = "lego-keeper";
/// The runtime's placer thread (asks the manager where units go).
pub const PLACER_THREAD_NAME: &str = "lego-placer";
/// The runtime's repair thread (replicas, drains, the layout's backup).
pub const REPAIR_THREAD_NAME: &str = "lego-repair";
/// The runtime's helper threads: none of them serves a fault (only the
/// pager does), so the hang watchdog leaves them out.
pub const HELPER_THREAD_NAMES: [&str; 3] =
    [KEEPER_THREAD_NAME, PLACER_THREAD_NAME, REPAIR_THREAD_NAME];

/// Names the calling thread (its `comm`, at most 15 bytes).
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes; buf is one.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// A local user's ids, from the password database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Looks up the local user `name`; `None` if there is none (or the
/// database cannot be read).
pub fn user_by_name(name: &str) -> Option<UserIds> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain old data; zeroed is a valid value to pass
    // as getpwnam_r's output.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: a NUL-terminated name,
    // an output struct, a buffer of buf.len() bytes for its strings, and
    // the result pointer; nothing is kept after it.
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return None;
    }
    Some(UserIds {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Lets SIGPIPE end the process silently, as it does most commands: for
/// a command whose output may go to a pipe that closes early (`lego status
/// | head`). Rust ignores SIGPIPE by default, which turns it into a write
/// error.
pub fn end_quietly_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL takes no pointers
    // and is valid at any time.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
