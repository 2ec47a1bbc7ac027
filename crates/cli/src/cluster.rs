//! `lego manager` and `lego status --manager`: the global manager daemon and
//! the cluster table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use lego_protocol::control::{Reply, Request};

use crate::size::human;
use crate::{fail, LEGO_FAILED};

#[derive(clap::Args)]
pub struct ManagerArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Directory of the manager's state database; a restarted manager finds
    /// the cluster there.
    #[arg(long, value_name = "DIR", env = "LEGO_STATE")]
    state: PathBuf,
    /// A component that sends no heartbeat for this long is marked failed
    /// and gets no new placements, e.g. 3s or 500ms.
    #[arg(long, value_name = "TIME", default_value = "3s", value_parser = parse_duration, env = "LEGO_HEARTBEAT_TIMEOUT")]
    heartbeat_timeout: Duration,
}

/// Parses `500ms`, `3s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 3s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s or m)")),
    };
    if !(secs > 0.0 && secs < 1e7) {
        return Err(format!("'{s}' is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn manager(args: ManagerArgs) -> ExitCode {
    match lego_manager::Manager::start(&args.listen, &args.state, args.heartbeat_timeout) {
        Ok(m) => {
            eprintln!(
                "lego manager: serving on {} with state in {}",
                m.addr(),
                args.state.display()
            );
            m.wait();
            ExitCode::SUCCESS
        }
        Err(e) => fail("lego manager", e),
    }
}

pub fn status(manager: &str, json: bool) -> ExitCode {
    let s = match lego_transport::ask_manager(manager, &Request::Status) {
        Ok(Reply::Status(s)) => s,
        Ok(other) => return fail("lego status", format!("unexpected answer {other:?}")),
        Err(e) => return fail("lego status", e),
    };
    if json {
        match serde_json::to_string_pretty(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("lego status: {e}");
                return ExitCode::from(LEGO_FAILED);
            }
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>3} {:<9} {:<22} {:<8} {:>10} {:>10} {:>5} {:>6}",
        "ID", "KIND", "ADDRESS", "STATE", "CAPACITY", "USED", "LOAD", "UNITS"
    );
    for c in &s.components {
        println!(
            "{:>3} {:<9} {:<22} {:<8} {:>10} {:>10} {:>5} {:>6}",
            c.id,
            c.kind.to_string(),
            c.addr,
            c.state.to_string(),
            human(c.capacity_bytes),
            human(c.used_bytes),
            c.load,
            c.units
        );
    }
    if !s.processes.is_empty() {
        println!();
        println!(
            "{:<10} {:>8} {:>10}  PROGRAM",
            "PROCESSOR", "PID", "EXCACHE"
        );
        for p in &s.processes {
            let mut program: String = p
                .process
                .program
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(60)
                .collect();
            if p.process.program.chars().count() > 60 {
                program.push('…');
            }
            println!(
                "{:<10} {:>8} {:>10}  {}",
                p.processor,
                p.process.pid,
                human(p.process.excache_bytes),
                program
            );
        }
    }
    if !s.spaces.is_empty() {
        println!();
        println!(
            "{:<18}  PLACEMENT (memory daemon id: 16 MiB units)",
            "SPACE"
        );
        for sp in &s.spaces {
            let by: Vec<String> = sp
                .units
                .iter()
                .map(|(id, n)| format!("{id}: {n}"))
                .collect();
            println!("{:<18x}  {}", sp.space, by.join(", "));
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
