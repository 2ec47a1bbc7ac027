//! `lego`: one binary for users and daemons. Parses arguments, calls the
//! component libraries, maps errors to exit codes (125 when lego itself
//! fails, the program's own status otherwise).

#![deny(unsafe_code)]

mod run;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lego",
    version,
    about = "Run unmodified programs with disaggregated memory (a LegoOS splitkernel in user space)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program with its memory on memory daemons and only an ExCache locally.
    Run(run::RunArgs),
    /// Run a memory daemon (a memory component).
    Memory(MemoryArgs),
    /// Show a memory daemon's capacity and use.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct MemoryArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Most page memory this daemon holds, e.g. 4G.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    capacity: u64,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Memory daemon to ask, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    memory: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const LEGO_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Memory(args) => {
            init_logging();
            match lego_memory::MemoryDaemon::start(&args.listen, args.capacity) {
                Ok(d) => {
                    eprintln!(
                        "lego memory: serving on {} with {} capacity",
                        d.addr(),
                        size::human(args.capacity)
                    );
                    d.wait();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lego memory: {e}");
                    ExitCode::from(LEGO_FAILED)
                }
            }
        }
        Command::Status(args) => match lego_memory::query_stats(&args.memory) {
            Ok(s) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "address": args.memory,
                            "capacity_bytes": s.capacity_bytes,
                            "used_bytes": s.used_bytes,
                            "spaces": s.spaces,
                            "connections": s.connections,
                        })
                    );
                } else {
                    println!(
                        "{:<8} {:<22} {:>12} {:>12} {:>7} {:>11}",
                        "KIND", "ADDRESS", "CAPACITY", "USED", "SPACES", "CONNECTIONS"
                    );
                    println!(
                        "{:<8} {:<22} {:>12} {:>12} {:>7} {:>11}",
                        "memory",
                        args.memory,
                        size::human(s.capacity_bytes),
                        size::human(s.used_bytes),
                        s.spaces,
                        s.connections
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lego status: memory daemon {}: {e}", args.memory);
                ExitCode::from(LEGO_FAILED)
            }
        },
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
