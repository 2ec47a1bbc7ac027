//! `lego top`: a live view of a cluster (from its manager) or of one
//! memory daemon, refreshed every `--interval`: components with capacity
//! bars and state, programs with their ExCache, resident memory, miss
//! rate, p99 miss latency, network rates and the memory daemons holding
//! their memory. On a terminal it is a full-screen view (ratatui): `s`
//! changes the order of the programs, `q` (or Esc, Ctrl-C) quits and
//! gives the terminal back as it was. Elsewhere it prints the same tables
//! as text, `--iterations` times (default once).
//!
//! [`View::build`] turns two successive snapshots into rows (rates are
//! the counters' change between them); [`View::plain`] and `draw` show
//! them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lego_protocol::control::{ClusterStatus, Kind, ProcessInfo, Reply, Request, State};
use lego_transport::auth::Credential;

use crate::cluster::parse_duration;
use crate::fail;
use crate::size::human;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Show the cluster of the global manager at ADDR.
    #[arg(
        long,
        value_name = "ADDR",
        env = "LEGO_MANAGER",
        conflicts_with = "memory"
    )]
    manager: Option<String>,
    /// Show one memory daemon.
    #[arg(long, value_name = "ADDR")]
    memory: Option<String>,
    /// Time between refreshes, e.g. 1s or 500ms.
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Refreshes to show before ending (default: until quit on a
    /// terminal, once elsewhere).
    #[arg(long, short = 'n', value_name = "N")]
    iterations: Option<u64>,
    #[command(flatten)]
    key: crate::keys::KeyArg,
}

/// What one refresh sees.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Where it came from, for the title.
    pub source: String,
    pub status: ClusterStatus,
    /// A memory daemon asked directly: its open connections.
    pub connections: Option<u64>,
}

/// One component's row.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentRow {
    pub id: u64,
    pub kind: String,
    pub addr: String,
    pub state: String,
    pub capacity: u64,
    pub used: u64,
    pub load: u32,
}

/// One program's row.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramRow {
    pub processor: u64,
    pub pid: u32,
    pub program: String,
    pub excache: u64,
    pub resident: u64,
    /// Misses a second (all kinds), and network bytes a second in and out;
    /// `None` before two snapshots.
    pub miss_rate: Option<f64>,
    pub in_rate: Option<f64>,
    pub out_rate: Option<f64>,
    pub p99_us: u64,
    /// The memory daemons holding its memory: (address, units), shown
    /// as `ADDRESS×UNITS`.
    pub memory: Vec<(String, u64)>,
}

/// How programs are ordered (`s` cycles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    MissRate,
    P99,
    Excache,
    Network,
    Pid,
}

impl Order {
    fn next(self) -> Self {
        match self {
            Order::MissRate => Order::P99,
            Order::P99 => Order::Excache,
            Order::Excache => Order::Network,
            Order::Network => Order::Pid,
            Order::Pid => Order::MissRate,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Order::MissRate => "miss rate",
            Order::P99 => "p99 miss latency",
            Order::Excache => "ExCache",
            Order::Network => "network",
            Order::Pid => "pid",
        }
    }
}

/// What is shown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub title: String,
    pub summary: String,
    pub components: Vec<ComponentRow>,
    pub programs: Vec<ProgramRow>,
}

fn misses(p: &ProcessInfo) -> Option<u64> {
    p.counters
        .as_ref()
        .map(|c| c.remote_misses + c.zero_fills + c.tier_hits)
}

impl View {
    /// The view of `cur`, with rates against `prev` (taken `elapsed`
    /// earlier), programs ordered by `order`.
    pub fn build(prev: Option<(&Snapshot, Duration)>, cur: &Snapshot, order: Order) -> View {
        let s = &cur.status;
        let components: Vec<ComponentRow> = s
            .components
            .iter()
            .map(|c| ComponentRow {
                id: c.id,
                kind: c.kind.to_string(),
                addr: c.addr.clone(),
                state: c.state.to_string(),
                capacity: c.capacity_bytes,
                used: c.used_bytes,
                load: c.load,
            })
            .collect();
        let addr_of: BTreeMap<u64, &str> = s
            .components
            .iter()
            .map(|c| (c.id, c.addr.as_str()))
            .collect();
        let rate = |now: Option<u64>, before: Option<u64>, dt: Duration| {
            let (n, b) = (now?, before?);
            (dt > Duration::ZERO).then(|| n.saturating_sub(b) as f64 / dt.as_secs_f64())
        };
        let mut programs: Vec<ProgramRow> =
            s.processes
                .iter()
                .map(|r| {
                    let p = &r.process;
                    let before = prev.and_then(|(snap, dt)| {
                        snap.status
                            .processes
                            .iter()
                            .find(|q| q.processor == r.processor && q.process.pid == p.pid)
                            .map(|q| (&q.process, dt))
                    });
                    let c = p.counters.clone().unwrap_or_default();
                    let field =
                        |f: fn(&lego_protocol::control::ProgramCounters) -> u64,
                         x: &ProcessInfo| x.counters.as_ref().map(f);
                    let (miss_rate, in_rate, out_rate) = match before {
                        Some((q, dt)) => (
                            rate(misses(p), misses(q), dt),
                            rate(field(|c| c.bytes_in, p), field(|c| c.bytes_in, q), dt),
                            rate(field(|c| c.bytes_out, p), field(|c| c.bytes_out, q), dt),
                        ),
                        None => (None, None, None),
                    };
                    let mut memory: BTreeMap<u64, u64> = BTreeMap::new();
                    for space in &c.spaces {
                        for info in s.spaces.iter().filter(|i| i.space == *space) {
                            for &(component, units) in &info.units {
                                *memory.entry(component).or_insert(0) += units;
                            }
                        }
                    }
                    ProgramRow {
                        processor: r.processor,
                        pid: p.pid,
                        // Its name is the user's: no terminal controls
                        // from it.
                        program: crate::cluster::printable(
                            &p.program,
                            lego_protocol::control::MAX_PROGRAM_BYTES,
                        ),
                        excache: p.excache_bytes,
                        resident: c.peak_resident_bytes,
                        miss_rate,
                        in_rate,
                        out_rate,
                        p99_us: c.miss_p99_us,
                        memory: memory
                            .into_iter()
                            .map(|(id, units)| {
                                let a = addr_of.get(&id).map_or(id.to_string(), |a| a.to_string());
                                (a, units)
                            })
                            .collect(),
                    }
                })
                .collect();
        let key = |p: &ProgramRow| -> f64 {
            match order {
                Order::MissRate => p.miss_rate.unwrap_or(0.0),
                Order::P99 => p.p99_us as f64,
                Order::Excache => p.excache as f64,
                Order::Network => p.in_rate.unwrap_or(0.0) + p.out_rate.unwrap_or(0.0),
                Order::Pid => -(p.pid as f64),
            }
        };
        programs.sort_by(|a, b| key(b).total_cmp(&key(a)));
        let count = |k: Kind| {
            s.components
                .iter()
                .filter(|c| c.kind == k && matches!(c.state, State::Alive | State::Draining))
                .count()
        };
        let mut summary = format!(
            "{} memory, {} processor, {} storage alive · {} programs",
            count(Kind::Memory),
            count(Kind::Processor),
            count(Kind::Storage),
            s.processes.len()
        );
        if s.degraded_units > 0 {
            summary.push_str(&format!(" · {} units degraded", s.degraded_units));
        }
        if let Some(c) = cur.connections {
            summary = format!("{} spaces · {c} connections", s.spaces.len());
        }
        View {
            title: format!("lego top — {} — programs by {}", cur.source, order.name()),
            summary,
            components,
            programs,
        }
    }

    /// The component table's rows as text cells.
    fn component_cells(&self) -> Vec<[String; 7]> {
        self.components
            .iter()
            .map(|c| {
                [
                    c.id.to_string(),
                    c.kind.clone(),
                    c.addr.clone(),
                    c.state.clone(),
                    bar(c.used, c.capacity, 10),
                    format!("{}/{}", human(c.used), human(c.capacity)),
                    c.load.to_string(),
                ]
            })
            .collect()
    }

    fn program_cells(&self) -> Vec<[String; 10]> {
        let per_s = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.0}"));
        let bytes_s =
            |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{}/s", human(r as u64)));
        self.programs
            .iter()
            .map(|p| {
                [
                    p.processor.to_string(),
                    p.pid.to_string(),
                    p.program.clone(),
                    human(p.excache),
                    human(p.resident),
                    per_s(p.miss_rate),
                    if p.p99_us == 0 {
                        "-".into()
                    } else {
                        format!("{} µs", p.p99_us)
                    },
                    bytes_s(p.in_rate),
                    bytes_s(p.out_rate),
                    p.memory
                        .iter()
                        .map(|(a, u)| format!("{a}×{u}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect()
    }

    /// The view as text (no terminal).
    pub fn plain(&self) -> String {
        let mut out = format!("{}\n{}\n\n", self.title, self.summary);
        out.push_str(&table(&COMPONENT_HEADER, &self.component_cells()));
        out.push('\n');
        out.push_str(&table(&PROGRAM_HEADER, &self.program_cells()));
        out
    }
}

const COMPONENT_HEADER: [&str; 7] = [
    "ID",
    "KIND",
    "ADDRESS",
    "STATE",
    "USE",
    "USED/CAPACITY",
    "LOAD",
];
const PROGRAM_HEADER: [&str; 10] = [
    "PROC",
    "PID",
    "PROGRAM",
    "EXCACHE",
    "RESIDENT",
    "MISSES/S",
    "P99",
    "IN",
    "OUT",
    "MEMORY ON",
];

/// `[#####.....] 50%`: `used` of `capacity` in `width` marks.
fn bar(used: u64, capacity: u64, width: usize) -> String {
    if capacity == 0 {
        return format!("[{}]   -", " ".repeat(width));
    }
    let frac = (used as f64 / capacity as f64).clamp(0.0, 1.0);
    let full = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(full),
        ".".repeat(width - full),
        frac * 100.0
    )
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Where snapshots come from.
enum Source {
    Manager(String),
    Memory(String),
}

impl Source {
    fn take(&self, cred: &Credential) -> Result<Snapshot, String> {
        match self {
            Source::Manager(m) => match lego_transport::ask_manager(m, &Request::Status, cred)? {
                Reply::Status(status) => Ok(Snapshot {
                    source: format!("manager {m}"),
                    status: *status,
                    connections: None,
                }),
                other => Err(format!("global manager {m}: unexpected answer {other:?}")),
            },
            Source::Memory(a) => {
                let s = lego_memory::query_stats(a, cred)
                    .map_err(|e| format!("memory daemon {a}: {e}"))?;
                let status = ClusterStatus {
                    components: vec![lego_protocol::control::ComponentInfo {
                        id: 0,
                        kind: Kind::Memory,
                        addr: a.clone(),
                        state: State::Alive,
                        capacity_bytes: s.capacity_bytes,
                        used_bytes: s.used_bytes,
                        load: 0,
                        units: 0,
                        last_seen_ms: 0,
                        zone: String::new(),
                    }],
                    spaces: (0..s.spaces)
                        .map(|k| lego_protocol::control::SpaceInfo {
                            space: k,
                            units: vec![],
                            degraded: 0,
                        })
                        .collect(),
                    ..Default::default()
                };
                Ok(Snapshot {
                    source: format!("memory daemon {a}"),
                    status,
                    connections: Some(s.connections),
                })
            }
        }
    }
}

pub fn top(args: TopArgs) -> ExitCode {
    let source = match (&args.manager, &args.memory) {
        (Some(m), None) => Source::Manager(m.clone()),
        (None, Some(a)) => Source::Memory(a.clone()),
        _ => return fail("lego top", "give --manager or --memory"),
    };
    let cred = match args.key.client() {
        Ok(c) => c,
        Err(e) => return fail("lego top", e),
    };
    // The first look: an unreachable cluster is an error before anything
    // is drawn.
    let first = match source.take(&cred) {
        Ok(s) => s,
        Err(e) => return fail("lego top", e),
    };
    if std::io::stdout().is_terminal() {
        interactive(source, cred, first, &args)
    } else {
        lego_sys::process::end_quietly_on_closed_pipe();
        printed(&source, &cred, first, &args)
    }
}

/// Not on a terminal: the tables, `--iterations` times (default once).
fn printed(source: &Source, cred: &Credential, first: Snapshot, args: &TopArgs) -> ExitCode {
    let n = args.iterations.unwrap_or(1).max(1);
    let mut prev: Option<(Snapshot, Instant)> = None;
    let mut cur = (first, Instant::now());
    for k in 0..n {
        let p = prev.as_ref().map(|(s, t)| (s, cur.1 - *t));
        print!("{}", View::build(p, &cur.0, Order::MissRate).plain());
        if k + 1 == n {
            break;
        }
        println!();
        std::thread::sleep(args.interval);
        match source.take(cred) {
            Ok(s) => prev = Some(std::mem::replace(&mut cur, (s, Instant::now()))),
            Err(e) => return fail("lego top", e),
        }
    }
    ExitCode::SUCCESS
}

/// On a terminal: the full-screen view until `q`.
/// On a terminal: the full-screen view until `q`. The manager is asked on
/// a thread of its own, so keys are answered at once even while it is
/// slow to answer.
fn interactive(source: Source, cred: Credential, first: Snapshot, args: &TopArgs) -> ExitCode {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            // Raw mode may be on already.
            ratatui::restore();
            return fail("lego top", format!("cannot use this terminal: {e}"));
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<(Result<Snapshot, String>, Instant)>();
    let interval = args.interval;
    // Ends at its next send once this view is gone.
    let _asker = std::thread::Builder::new()
        .name("lego-top-ask".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            if tx.send((source.take(&cred), Instant::now())).is_err() {
                return;
            }
        });
    let mut order = Order::MissRate;
    let mut prev: Option<(Snapshot, Instant)> = None;
    let mut cur = (first, Instant::now());
    let mut error: Option<String> = None;
    // Snapshots shown (the first included).
    let mut shown = 1u64;
    let mut redraw = true;
    let result = loop {
        if redraw {
            let view = View::build(prev.as_ref().map(|(s, t)| (s, cur.1 - *t)), &cur.0, order);
            if let Err(e) = terminal.draw(|f| draw(f, &view, error.as_deref())) {
                break Err(format!("cannot draw: {e}"));
            }
            redraw = false;
        }
        if args.iterations.is_some_and(|n| shown >= n) {
            break Ok(());
        }
        match rx.try_recv() {
            Ok((Ok(s), at)) => {
                error = None;
                prev = Some(std::mem::replace(&mut cur, (s, at)));
                shown += 1;
                redraw = true;
                continue;
            }
            // Shown, and asked again at the next refresh.
            Ok((Err(e), _)) => {
                error = Some(e);
                redraw = true;
                continue;
            }
            Err(_) => {}
        }
        match event::poll(Duration::from_millis(50)) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        break Ok(())
                    }
                    KeyCode::Char('s') => {
                        order = order.next();
                        redraw = true;
                    }
                    _ => {}
                },
                Ok(Event::Resize(..)) => redraw = true,
                _ => {}
            },
            Ok(false) => {}
            Err(e) => break Err(format!("cannot read the terminal: {e}")),
        }
    };
    ratatui::restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("lego top", e),
    }
}

fn draw(f: &mut ratatui::Frame, view: &View, error: Option<&str>) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style, Stylize};
    use ratatui::widgets::{Block, Paragraph, Row, Table};
    let comps = view.component_cells();
    let progs = view.program_cells();
    let [head, top, bottom, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(comps.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let status = match error {
        Some(e) => format!("{} · {e}", view.summary),
        None => view.summary.clone(),
    };
    f.render_widget(
        Paragraph::new(vec![view.title.clone().bold().into(), status.into()]),
        head,
    );
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let widths = |cells: &[Vec<String>], header: &[&str]| -> Vec<Constraint> {
        (0..header.len())
            .map(|i| {
                let w = cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(1);
                Constraint::Length(w as u16)
            })
            .collect()
    };
    let comp_rows: Vec<Vec<String>> = comps.iter().map(|r| r.to_vec()).collect();
    f.render_widget(
        Table::new(
            comp_rows.iter().map(|r| Row::new(r.clone())),
            widths(&comp_rows, &COMPONENT_HEADER),
        )
        .header(Row::new(COMPONENT_HEADER.to_vec()).style(bold))
        .block(Block::bordered().title("components")),
        top,
    );
    let prog_rows: Vec<Vec<String>> = progs.iter().map(|r| r.to_vec()).collect();
    f.render_widget(
        Table::new(
            prog_rows.iter().map(|r| Row::new(r.clone())),
            widths(&prog_rows, &PROGRAM_HEADER),
        )
        .header(Row::new(PROGRAM_HEADER.to_vec()).style(bold))
        .block(Block::bordered().title("programs")),
        bottom,
    );
    f.render_widget(Paragraph::new("s: order programs  q: quit".dim()), foot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::control::{ComponentInfo, ProgramCounters, RunningInfo, SpaceInfo};

    fn snapshot(misses: u64, bytes_in: u64) -> Snapshot {
        let comp = |id, kind, addr: &str, state, cap, used| ComponentInfo {
            id,
            kind,
            addr: addr.into(),
            state,
            capacity_bytes: cap,
            used_bytes: used,
            load: 0,
            units: 0,
            last_seen_ms: 0,
            zone: String::new(),
        };
        let program = |pid, name: &str, counters| RunningInfo {
            processor: 3,
            process: ProcessInfo {
                pid,
                program: name.into(),
                excache_bytes: 64 << 20,
                counters,
            },
        };
        Snapshot {
            source: "manager m:1".into(),
            status: ClusterStatus {
                components: vec![
                    comp(1, Kind::Memory, "m1:7", State::Alive, 1 << 30, 1 << 29),
                    comp(2, Kind::Memory, "m2:7", State::Failed, 1 << 30, 0),
                    comp(3, Kind::Processor, "p:7", State::Alive, 1 << 30, 64 << 20),
                ],
                spaces: vec![SpaceInfo {
                    space: 77,
                    units: vec![(1, 5), (2, 1)],
                    degraded: 1,
                }],
                processes: vec![
                    program(
                        10,
                        "sort",
                        Some(ProgramCounters {
                            remote_misses: misses,
                            zero_fills: 5,
                            bytes_in,
                            miss_p99_us: 140,
                            spaces: vec![77],
                            ..Default::default()
                        }),
                    ),
                    program(11, "idle", None),
                ],
                degraded_units: 1,
                ..Default::default()
            },
            connections: None,
        }
    }

    #[test]
    fn rates_come_from_two_snapshots_and_memory_from_the_spaces() {
        let (a, b) = (snapshot(100, 4096), snapshot(300, 4096 * 201));
        let first = View::build(None, &a, Order::MissRate);
        assert_eq!(first.programs[0].miss_rate, None, "one snapshot: no rate");
        let v = View::build(Some((&a, Duration::from_secs(2))), &b, Order::MissRate);
        let sort = &v.programs[0];
        assert_eq!(sort.program, "sort");
        assert_eq!(sort.miss_rate, Some(100.0));
        assert_eq!(sort.in_rate, Some(409600.0));
        assert_eq!(sort.p99_us, 140);
        assert_eq!(
            sort.memory,
            [("m1:7".to_string(), 5), ("m2:7".to_string(), 1)]
        );
        assert_eq!(v.programs[1].program, "idle");
        assert!(v.summary.contains("1 memory, 1 processor"), "{}", v.summary);
        assert!(
            v.summary.contains("2 programs · 1 units degraded"),
            "{}",
            v.summary
        );
        // By pid, the lower first.
        let by_pid = View::build(Some((&a, Duration::from_secs(2))), &b, Order::Pid);
        assert_eq!(by_pid.programs[0].pid, 10);
        assert_eq!(Order::Pid.next(), Order::MissRate);
    }

    #[test]
    fn the_plain_view_is_aligned_tables() {
        let (a, b) = (snapshot(100, 0), snapshot(300, 0));
        let text = View::build(Some((&a, Duration::from_secs(1))), &b, Order::MissRate).plain();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("lego top — manager m:1"), "{text}");
        assert!(text.contains("[#####.....]  50%"), "{text}");
        let header = lines.iter().position(|l| l.starts_with("PROC")).unwrap();
        let col = lines[header].find("MISSES/S").unwrap();
        assert_eq!(&lines[header + 1][col..col + 3], "200", "{text}");
        assert!(lines[header + 1].ends_with("m1:7×5 m2:7×1"), "{text}");
        assert_eq!(bar(0, 0, 4), "[    ]   -");
        // A program name cannot move the cursor of a terminal showing it.
        let mut evil = snapshot(1, 0);
        evil.status.processes[0].process.program = "x\u{1b}[2Jy".into();
        let text = View::build(None, &evil, Order::Pid).plain();
        assert!(
            !text.contains('\u{1b}') && text.contains("x [2Jy"),
            "{text}"
        );
    }
}
