//! The lego processor component (LegoOS's processor manager, the part
//! outside the program; the part inside is `lego-runtime`).
//!
//! - [`daemon`]: the processor daemon (`lego processor`). It joins the
//!   cluster with the host's ExCache budget and runs the programs the
//!   global process manager places on this host.
//! - [`remote`]: the client side (`lego run --manager` with processor
//!   daemons in the cluster): asks the manager for a processor daemon, runs
//!   the program there and relays its stdin, stdout, stderr, signals and
//!   exit status.
//! - [`vnode`]: running a program in a vNode (`lego vnode-host`): its
//!   namespaces, its file system, the broker of its connections.
//! - [`vnet`]: the vNodes' network namespaces on one processor host, and
//!   the router that lets connected vNodes (only) reach each other's vIP.
//! - [`watchdog`] (over [`hang`], its pure core): the watch `lego run`
//!   keeps over the program it launched, which stops a program whose
//!   every thread waits on a page fault nobody can serve.
//!
//! None of them prints lego's one-line errors or exits the process: they
//! return typed errors, exit statuses and verdicts, which the `lego`
//! binary reports.

#![deny(unsafe_code)]

pub mod daemon;
pub mod hang;
pub mod remote;
pub mod vnet;
pub mod vnode;
pub mod watchdog;

pub use daemon::{ProcessorConfig, ProcessorDaemon, ProcessorError};
pub use remote::{RemoteError, RemoteRun, RemoteRunEnded};
pub use watchdog::Watchdog;
