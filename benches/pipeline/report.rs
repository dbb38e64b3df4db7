//! Medians with their range, and the Markdown the harness prints and writes.

use std::fmt::Write as _;

/// One figure measured once per run.
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// `median (min–max)`, each value formatted by `f`; the range is left out for one run.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        let v = self.sorted();
        match v.len() {
            0 => "–".into(),
            1 => f(v[0]),
            n => format!("{} ({}–{})", f(self.median()), f(v[0]), f(v[n - 1])),
        }
    }
}

/// The `q` quantile (0..=1) of unsorted nanosecond samples, by nearest rank.
pub fn quantile(samples: &mut [u64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1] as f64
}

/// Thousands with separators: `12,345`.
pub fn count(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn ratio(v: f64) -> String {
    format!("{v:.2}")
}

pub fn micros(v: f64) -> String {
    format!("{v:.1}")
}

pub fn millis(v: f64) -> String {
    format!("{v:.2}")
}

pub fn mib(v: f64) -> String {
    format!("{:.1}", v / (1024.0 * 1024.0))
}

/// A Markdown table.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        let _ = writeln!(
            out,
            "|{}",
            self.header.iter().map(|_| "---|").collect::<String>()
        );
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// Replaces the generated part of `BENCHMARKS.md` (between the markers), keeping the
/// hand-written notes around it; a missing file or missing markers get a fresh section.
pub fn splice(existing: Option<&str>, generated: &str) -> String {
    const BEGIN: &str = "<!-- BEGIN GENERATED: scripts/bench writes this part -->";
    const END: &str = "<!-- END GENERATED -->";
    let section = format!("{BEGIN}\n{generated}{END}\n");
    match existing {
        Some(text) => match (text.find(BEGIN), text.find(END)) {
            (Some(b), Some(e)) if b < e => {
                let rest = text[e + END.len()..].trim_start_matches('\n');
                let gap = if rest.is_empty() { "" } else { "\n" };
                format!("{}{section}{gap}{rest}", &text[..b])
            }
            _ => format!("{}\n{section}", text.trim_end()),
        },
        None => format!("# Benchmarks\n\n{section}"),
    }
}
