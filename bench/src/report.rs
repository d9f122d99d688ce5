//! Turning measurements into tables (one per metric: a row per switch or overlay, a column per
//! round and the median, then ratio lines) and into the JSON file of raw results.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::process::Command;

use serde_json::{json, Value};

use crate::measure::{Outcome, Settings, Test};
use crate::noise::NOISY_CORES;
use crate::switch::SwitchKind;

/// How a metric is shown, and which direction is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Frames per second; higher is better.
    Rate,
    /// Megabits per second; higher is better.
    Mbps,
    /// A share of frames lost; lower is better.
    Percent,
    /// A latency in microseconds; lower is better.
    Micros,
    /// CPU time per frame in microseconds; lower is better.
    MicrosPerFrame,
    /// A latency in milliseconds; lower is better.
    Millis,
    /// CPU use in cores; lower is better.
    Cores,
}

impl Unit {
    fn higher_is_better(self) -> bool {
        matches!(self, Unit::Rate | Unit::Mbps)
    }

    fn format(self, value: f64) -> String {
        match self {
            Unit::Rate if value >= 1e6 => format!("{:.2}M", value / 1e6),
            Unit::Rate => format!("{:.1}k", value / 1e3),
            Unit::Mbps => format!("{value:.0}"),
            Unit::Percent => format!("{value:.1}%"),
            Unit::Micros => format!("{value:.1}"),
            Unit::MicrosPerFrame => format!("{value:.2}"),
            Unit::Millis => format!("{value:.3}"),
            Unit::Cores => format!("{value:.2}"),
        }
    }

    /// How the ratio line names the best of the other switches.
    fn best_other(self) -> &'static str {
        match self {
            Unit::Rate | Unit::Mbps | Unit::Micros | Unit::Millis => "fastest other",
            Unit::Percent | Unit::MicrosPerFrame | Unit::Cores => "best other",
        }
    }
}

/// One figure of one measurement.
#[derive(Clone, Debug)]
pub(crate) struct Metric {
    /// Identifies the table, e.g. `a.fps`; starts with the measurement's letter.
    pub(crate) key: String,
    pub(crate) title: String,
    pub(crate) unit: Unit,
    pub(crate) value: f64,
    /// A frame count shown in parentheses after the value.
    pub(crate) count: Option<f64>,
}

impl Metric {
    pub(crate) fn new(key: String, title: String, unit: Unit, value: f64) -> Metric {
        Metric { key, title, unit, value, count: None }
    }

    pub(crate) fn with_count(mut self, count: u64) -> Metric {
        self.count = Some(count as f64);
        self
    }
}

/// One measurement of one switch in one round.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) round: u32,
    pub(crate) switch: SwitchKind,
    pub(crate) test: Test,
    pub(crate) result: Result<Outcome, String>,
    /// Cores' worth of CPU other processes used meanwhile (see [`crate::noise`]).
    pub(crate) foreign_cores: Option<f64>,
}

/// Facts about the host that change the figures.
#[derive(Debug)]
pub(crate) struct Environment {
    pub(crate) kernel: String,
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) max_dgram_qlen: String,
    pub(crate) load_average: String,
    /// What was measured and its version, as the header shows it.
    pub(crate) versions: Vec<(String, String)>,
}

impl Environment {
    /// Reads the host's facts; `versions` names each system measured and its version.
    pub(crate) fn read(versions: Vec<(String, String)>) -> Environment {
        let read = |path: &str| fs::read_to_string(path).map(|s| s.trim().to_string());
        let cpu_model = read("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let load_average = read("/proc/loadavg")
            .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into());
        Environment {
            kernel: read("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            max_dgram_qlen: read("/proc/sys/net/unix/max_dgram_qlen")
                .unwrap_or_else(|_| "unknown".into()),
            load_average,
            versions,
        }
    }

    pub(crate) fn header(&self) -> String {
        let versions: Vec<String> =
            self.versions.iter().map(|(kind, version)| format!("{kind} {version}")).collect();
        format!(
            "host: kernel {}, nproc {}, {}\n\
             net.unix.max_dgram_qlen = {} (left as it is), load average {}\n\
             versions: {}",
            self.kernel,
            self.cpus,
            self.cpu_model,
            self.max_dgram_qlen,
            self.load_average,
            versions.join(", ")
        )
    }

    pub(crate) fn to_json(&self) -> Value {
        let versions: HashMap<&str, &str> =
            self.versions.iter().map(|(name, version)| (name.as_str(), version.as_str())).collect();
        json!({
            "kernel": self.kernel,
            "nproc": self.cpus,
            "cpu_model": self.cpu_model,
            "net_unix_max_dgram_qlen": self.max_dgram_qlen,
            "load_average_at_start": self.load_average,
            "versions": versions,
        })
    }
}

/// The versions of the switches, for [`Environment::read`].
pub(crate) fn switch_versions(switches: &[SwitchKind]) -> Vec<(String, String)> {
    let version = |kind: SwitchKind| match kind {
        SwitchKind::Umnet => umnet_version(),
        SwitchKind::UmlSwitch => package_version("uml-utilities"),
        SwitchKind::VdeSwitch => package_version("vde2"),
    };
    switches.iter().map(|&kind| (kind.name().to_string(), version(kind))).collect()
}

/// umnet is measured as built from this workspace.
pub(crate) fn umnet_version() -> String {
    format!("(workspace {})", env!("CARGO_PKG_VERSION"))
}

/// The installed version of a Debian package, as `(package version)`.
pub(crate) fn package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| format!("({package} {})", String::from_utf8_lossy(&output.stdout).trim()))
        .unwrap_or_else(|| "(version unknown)".into())
}

/// All tables, in the order their metrics were first measured.
pub(crate) fn tables(switches: &[SwitchKind], rounds: u32, entries: &[Entry]) -> String {
    let mut out = String::new();
    for (key, title, unit) in metric_keys(entries) {
        let table = Table::collect(&key, unit, switches, rounds, entries);
        out.push_str(&table_title(&title, unit));
        out.push_str(&table.render("switch"));
        if let Some(line) = table.ratio_line(switches) {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// A table's heading line, with a blank line before it.
pub(crate) fn table_title(title: &str, unit: Unit) -> String {
    let better = if unit.higher_is_better() { "higher" } else { "lower" };
    format!("\n{title} ({better} is better)\n")
}

/// A summary of how much other processes disturbed the run.
pub(crate) fn noise(entries: &[Entry]) -> String {
    let loads: Vec<f64> = entries.iter().filter_map(|entry| entry.foreign_cores).collect();
    noise_summary(&loads)
}

/// The same summary from the foreign load of each measurement.
pub(crate) fn noise_summary(loads: &[f64]) -> String {
    let Some(max) = loads.iter().copied().reduce(f64::max) else { return String::new() };
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let noisy = loads.iter().filter(|&&load| load > NOISY_CORES).count();
    format!(
        "\nother processes on the host used {mean:.2} cores on average during the measurements, \
         {max:.2} at most;\n{noisy} of {} measurements had more than {NOISY_CORES} cores of \
         such noise (marked *)\n",
        loads.len()
    )
}

/// The failures, one line each.
pub(crate) fn failures(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|entry| {
            let error = entry.result.as_ref().err()?;
            Some(format!("round {} {} {}: {error}", entry.round, entry.test.letter(), entry.switch))
        })
        .collect()
}

/// The raw results and summaries, as written by `--json`.
pub(crate) fn to_json(
    environment: &Environment,
    settings: &Settings,
    rounds: u32,
    starts: &[(SwitchKind, Result<libc::pid_t, String>)],
    entries: &[Entry],
) -> Value {
    let switches: Vec<SwitchKind> = starts.iter().map(|(kind, _)| *kind).collect();
    let results: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let (metrics, raw, error) = match &entry.result {
                Ok(outcome) => {
                    let metrics: HashMap<&str, f64> =
                        outcome.metrics.iter().map(|m| (m.key.as_str(), m.value)).collect();
                    (json!(metrics), outcome.raw.clone(), Value::Null)
                }
                Err(error) => (Value::Null, Value::Null, json!(error)),
            };
            json!({
                "round": entry.round,
                "switch": entry.switch.name(),
                "test": entry.test.letter(),
                "ok": entry.result.is_ok(),
                "other_processes_cores": entry.foreign_cores,
                "error": error,
                "metrics": metrics,
                "raw": raw,
            })
        })
        .collect();
    let summary: Vec<Value> = metric_keys(entries)
        .into_iter()
        .map(|(key, title, unit)| {
            let table = Table::collect(&key, unit, &switches, rounds, entries);
            let medians: HashMap<&str, Option<f64>> =
                table.rows.iter().map(|row| (row.name.as_str(), median(&row.values()))).collect();
            json!({
                "key": key,
                "title": title,
                "higher_is_better": unit.higher_is_better(),
                "medians": medians,
                "ratio_first_to_best_other": table.ratio(),
                "ratio_per_round": table.round_ratios(),
            })
        })
        .collect();
    json!({
        "environment": environment.to_json(),
        "settings": {
            "rounds": rounds,
            "duration_ms": settings.duration.as_millis() as u64,
            "paced_rates": settings.rates,
            "rtt_samples": settings.rtt_samples,
        },
        "switches": starts.iter().map(|(kind, start)| json!({
            "name": kind.name(),
            "started": start.is_ok(),
            "pid": start.as_ref().ok(),
            "error": start.as_ref().err(),
        })).collect::<Vec<_>>(),
        "results": results,
        "summary": summary,
    })
}

fn metric_keys(entries: &[Entry]) -> Vec<(String, String, Unit)> {
    let mut keys: Vec<(String, String, Unit)> = Vec::new();
    for entry in entries {
        let Ok(outcome) = &entry.result else { continue };
        for metric in &outcome.metrics {
            if !keys.iter().any(|(key, _, _)| *key == metric.key) {
                keys.push((metric.key.clone(), metric.title.clone(), metric.unit));
            }
        }
    }
    // Measurements are interleaved, so order by letter while keeping each one's own order.
    keys.sort_by_key(|(key, _, _)| key.chars().next());
    keys
}

/// What one table cell holds.
#[derive(Clone, Debug)]
pub(crate) enum Cell {
    /// The value, the count shown beside it, and whether the measurement was noisy.
    Value(f64, Option<f64>, bool),
    Failed,
    NotRun,
}

/// One switch's or overlay's figures, a cell per round.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) cells: Vec<Cell>,
}

impl Row {
    pub(crate) fn values(&self) -> Vec<f64> {
        self.cells
            .iter()
            .filter_map(|cell| match cell {
                Cell::Value(value, _, _) => Some(*value),
                _ => None,
            })
            .collect()
    }

    fn counts(&self) -> Vec<f64> {
        self.cells
            .iter()
            .filter_map(|cell| match cell {
                Cell::Value(_, count, _) => *count,
                _ => None,
            })
            .collect()
    }
}

/// One metric: a row per switch or overlay, a column per round.
#[derive(Debug)]
pub(crate) struct Table {
    unit: Unit,
    rounds: u32,
    rows: Vec<Row>,
}

impl Table {
    pub(crate) fn new(unit: Unit, rounds: u32, rows: Vec<Row>) -> Table {
        Table { unit, rounds, rows }
    }

    fn collect(
        key: &str,
        unit: Unit,
        switches: &[SwitchKind],
        rounds: u32,
        entries: &[Entry],
    ) -> Table {
        let letter = key.split('.').next().unwrap_or_default();
        let rows = switches
            .iter()
            .map(|&switch| {
                let cells = (1..=rounds)
                    .map(|round| {
                        let entry = entries.iter().find(|e| {
                            e.round == round && e.switch == switch && e.test.letter() == letter
                        });
                        let Some(entry) = entry else { return Cell::NotRun };
                        let noisy = entry.foreign_cores.is_some_and(|cores| cores > NOISY_CORES);
                        match &entry.result {
                            Ok(outcome) => outcome
                                .metrics
                                .iter()
                                .find(|m| m.key == key)
                                .map_or(Cell::NotRun, |m| Cell::Value(m.value, m.count, noisy)),
                            Err(_) => Cell::Failed,
                        }
                    })
                    .collect();
                Row { name: switch.name().to_string(), cells }
            })
            .collect();
        Table { unit, rounds, rows }
    }

    fn format(&self, value: f64, count: Option<f64>) -> String {
        match count {
            Some(count) => format!("{} ({count:.0})", self.unit.format(value)),
            None => self.unit.format(value),
        }
    }

    /// The table as text; `what` heads the column of row names.
    pub(crate) fn render(&self, what: &str) -> String {
        let mut lines: Vec<Vec<String>> = Vec::new();
        let mut head = vec![what.to_string()];
        head.extend((1..=self.rounds).map(|round| format!("round {round} ")));
        head.push("median ".into());
        lines.push(head);
        for row in &self.rows {
            let mut line = vec![row.name.clone()];
            line.extend(row.cells.iter().map(|cell| match cell {
                Cell::Value(value, count, noisy) => {
                    let mark = if *noisy { "*" } else { " " };
                    format!("{}{mark}", self.format(*value, *count))
                }
                Cell::Failed => "failed ".into(),
                Cell::NotRun => "- ".into(),
            }));
            line.push(match median(&row.values()) {
                Some(value) => format!("{} ", self.format(value, median(&row.counts()))),
                None => "- ".into(),
            });
            lines.push(line);
        }

        let columns = lines[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|column| lines.iter().map(|line| line[column].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for line in lines {
            out.push_str("  ");
            for (column, text) in line.iter().enumerate() {
                if column == 0 {
                    let _ = write!(out, "{text:<width$}", width = widths[0]);
                } else {
                    let _ = write!(out, "   {text:>width$}", width = widths[column]);
                }
            }
            out.push('\n');
        }
        out
    }

    /// The first switch's median over the best median of the others.
    fn ratio(&self) -> Option<f64> {
        let (first, others) = self.rows.split_first()?;
        let first = median(&first.values())?;
        let best = self.best(others.iter().filter_map(|row| median(&row.values())))?;
        (best != 0.0).then_some(first / best)
    }

    /// The same ratio within each round.
    fn round_ratios(&self) -> Vec<Option<f64>> {
        let Some((first, others)) = self.rows.split_first() else { return Vec::new() };
        (0..self.rounds as usize)
            .map(|round| {
                let value = |row: &Row| match row.cells.get(round) {
                    Some(Cell::Value(value, _, _)) => Some(*value),
                    _ => None,
                };
                let first = value(first)?;
                let best = self.best(others.iter().filter_map(value))?;
                (best != 0.0).then_some(first / best)
            })
            .collect()
    }

    /// Row `first`'s median over row `other`'s, and the same ratio within each round.
    pub(crate) fn ratio_between(&self, first: usize, other: usize) -> RatioLine {
        let (Some(first), Some(other)) = (self.rows.get(first), self.rows.get(other)) else {
            return RatioLine { median: None, per_round: Vec::new() };
        };
        let divide = |a: Option<f64>, b: Option<f64>| {
            let (a, b) = (a?, b?);
            (b != 0.0).then_some(a / b)
        };
        let value = |row: &Row, round: usize| match row.cells.get(round) {
            Some(Cell::Value(value, _, _)) => Some(*value),
            _ => None,
        };
        RatioLine {
            median: divide(median(&first.values()), median(&other.values())),
            per_round: (0..self.rounds as usize)
                .map(|round| divide(value(first, round), value(other, round)))
                .collect(),
        }
    }

    fn best(&self, values: impl Iterator<Item = f64>) -> Option<f64> {
        if self.unit.higher_is_better() {
            values.reduce(f64::max)
        } else {
            values.reduce(f64::min)
        }
    }

    fn ratio_line(&self, switches: &[SwitchKind]) -> Option<String> {
        let (first, _) = switches.split_first()?;
        if switches.len() < 2 {
            return None;
        }
        let label = format!("{first} / {}", self.unit.best_other());
        let ratio = match self.ratio() {
            Some(ratio) => format!("{ratio:.2}x"),
            None if median(&self.rows[0].values()).is_none() => format!("no {first} result"),
            None => "n/a (no other result, or the best other is 0)".into(),
        };
        let per_round: Vec<String> = self
            .round_ratios()
            .iter()
            .map(|ratio| ratio.map_or("-".into(), |ratio| format!("{ratio:.2}x")))
            .collect();
        Some(format!("{label}: {ratio}   (per round: {})", per_round.join(" ")))
    }
}

/// One row's figures over another's: the ratio of the medians and the ratio in each round.
#[derive(Debug)]
pub(crate) struct RatioLine {
    pub(crate) median: Option<f64>,
    pub(crate) per_round: Vec<Option<f64>>,
}

impl RatioLine {
    /// `label: 1.23x   (per round: 1.20x 1.25x -)`.
    pub(crate) fn render(&self, label: &str) -> String {
        let ratio = |ratio: &Option<f64>| ratio.map_or("-".into(), |r| format!("{r:.2}x"));
        let per_round: Vec<String> = self.per_round.iter().map(ratio).collect();
        format!("{label}: {}   (per round: {})", ratio(&self.median), per_round.join(" "))
    }
}

/// The median of `values`, the mean of the middle two for an even count.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(round: u32, switch: SwitchKind, value: Option<f64>) -> Entry {
        let result = match value {
            Some(value) => Ok(Outcome {
                metrics: vec![Metric::new("a.fps".into(), "a".into(), Unit::Rate, value)],
                raw: Value::Null,
            }),
            None => Err("boom".into()),
        };
        Entry { round, switch, test: Test::A, result, foreign_cores: None }
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_compares_first_switch_with_best_other_per_round() {
        let switches = [SwitchKind::Umnet, SwitchKind::UmlSwitch, SwitchKind::VdeSwitch];
        let entries = vec![
            entry(1, SwitchKind::Umnet, Some(200.0)),
            entry(1, SwitchKind::UmlSwitch, Some(100.0)),
            entry(1, SwitchKind::VdeSwitch, Some(50.0)),
            entry(2, SwitchKind::Umnet, None),
            entry(2, SwitchKind::UmlSwitch, Some(100.0)),
            entry(2, SwitchKind::VdeSwitch, Some(125.0)),
        ];
        let table = Table::collect("a.fps", Unit::Rate, &switches, 2, &entries);
        assert_eq!(table.round_ratios(), vec![Some(2.0), None]);
        // Medians: umnet 200, uml_switch 100, vde_switch 87.5.
        assert_eq!(table.ratio(), Some(2.0));
        let rendered = table.render("switch");
        assert!(rendered.contains("failed"), "{rendered}");
    }
}
