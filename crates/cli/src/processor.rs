//! `lego processor`: the flags of the processor daemon
//! ([`lego_processor::ProcessorDaemon`]) and its messages.

use std::process::ExitCode;

use lego_processor::{ProcessorConfig, ProcessorDaemon};

use crate::fail;
use crate::size::{human, parse_size};

#[derive(clap::Args)]
pub struct ProcessorArgs {
    /// Address to listen on for programs to run, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Global manager of the cluster, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: String,
    /// This host's ExCache budget, shared by the programs it runs, e.g. 1G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, env = "LEGO_PROCESSOR_EXCACHE")]
    excache: u64,
    /// Address clients reach this daemon at, if not the listening address.
    #[arg(long, value_name = "ADDR", env = "LEGO_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    metrics: crate::MetricsArg,
    #[command(flatten)]
    key: crate::keys::KeyArg,
}

pub fn processor(args: ProcessorArgs) -> ExitCode {
    let lego_exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return fail(
                "lego processor",
                format!("cannot locate the lego binary: {e}"),
            )
        }
    };
    let cred = match args.key.daemon(&args.listen) {
        Ok(c) => c,
        Err(e) => return fail("lego processor", e),
    };
    let config = ProcessorConfig {
        listen: args.listen,
        manager: args.manager,
        excache_bytes: args.excache,
        advertise: args.advertise.clone(),
        lego_exe,
        cred,
    };
    let d = match ProcessorDaemon::start(config) {
        Ok(d) => d,
        Err(e) => return fail("lego processor", e),
    };
    if let Err(e) = crate::stop_on_signals(d.stopper()) {
        return fail("lego processor", e);
    }
    let _metrics = match args
        .metrics
        .serve("lego processor", d.scraper(args.advertise.as_deref()))
    {
        Ok(m) => m,
        Err(e) => return fail("lego processor", e),
    };
    eprintln!(
        "lego processor: serving on {} with {} of ExCache",
        d.addr(),
        human(args.excache)
    );
    d.wait();
    eprintln!("lego processor: stopped; left the cluster");
    ExitCode::SUCCESS
}
