//! PNG plots of the bench figures with plotters' bitmap backend. Text is drawn with DejaVu Sans
//! embedded in the binary (the `dejavu` crate, through plotters' `ab_glyph` feature), so plots
//! render the same on a fresh machine with no fonts or fontconfig installed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use hubmsg_core::{Error, ErrorKind};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::c2d::ROUNDTRIP_TARGET_MS;
use super::conns::{CPU_TARGET_PCT, RSS_TARGET_KIB};
use super::d2c::{ThroughputRun, LATENCY_TARGET_MS, THROUGHPUT_TARGET};
use super::fmt_value;

/// Line colors, in order (readable on white).
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// One color per system in bar charts.
fn system_color(system: &str) -> RGBColor {
    match system {
        "hubmsg" => COLORS[0],
        "Mosquitto" => COLORS[4],
        "RabbitMQ" => COLORS[2],
        "NATS" => COLORS[3],
        _ => COLORS[5],
    }
}

/// What drawing one chart returns.
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Everything the scenarios hand over for plotting.
#[derive(Default)]
pub struct PlotData {
    /// `(label, system, msg/s)` per throughput run.
    pub throughput: Vec<(String, &'static str, f64)>,
    /// Messages received per 100 ms, per throughput run.
    pub timelines: Vec<TimelineRun>,
    /// `(label, [(percentile, ms)])` latency distributions.
    pub latency_curves: Vec<(String, Vec<(f64, f64)>)>,
    /// `(label, [(s since start, ms)])` latency of individual D2C messages over the window.
    pub latency_points: Vec<(String, Vec<(f64, f64)>)>,
    /// What each server did in the connection scenario.
    pub connections: Vec<ConnBar>,
}

/// One throughput run's arrivals over time.
pub struct TimelineRun {
    /// Legend label.
    pub label: String,
    /// Publishing devices / publishers (runs are plotted in one panel per count).
    pub senders: usize,
    /// `(s since the first send, msg/s)` per 100 ms.
    pub points: Vec<(f64, f64)>,
}

/// One server in the connection scenario.
pub struct ConnBar {
    /// `hubmsg hub` or the broker.
    pub label: String,
    /// Resident memory per connection, KiB.
    pub rss_kib: f64,
    /// CPU while every connection sends, % of a core.
    pub cpu_pct: f64,
}

impl PlotData {
    /// Adds a throughput run (bar and timeline).
    pub fn add_throughput(&mut self, r: &ThroughputRun) {
        let label = if r.label.starts_with(r.system) { r.label.clone() } else { format!("{} {}", r.system, r.label) };
        self.throughput.push((label.clone(), r.system, r.msgs_per_sec));
        self.timelines.push(TimelineRun { label, senders: r.devices, points: r.timeline.clone() });
    }

    /// Writes the PNGs for which there is data; returns their paths.
    pub fn render(&self, out: &Path) -> Result<Vec<PathBuf>, Error> {
        static FONT: Once = Once::new();
        FONT.call_once(|| {
            let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
            let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
        });
        let mut written = Vec::new();
        let mut go = |name: &str, draw: &dyn Fn(&Path) -> Drawn| -> Result<(), Error> {
            let p = out.join(name);
            draw(&p).map_err(|e| Error::new(ErrorKind::Internal, format!("plot {}: {e}", p.display())))?;
            written.push(p);
            Ok(())
        };
        if !self.throughput.is_empty() {
            go("throughput.png", &|p| self.throughput_bars(p))?;
            go("throughput-timeline.png", &|p| self.throughput_timeline(p))?;
        }
        if !self.connections.is_empty() {
            go("connections.png", &|p| self.connection_bars(p))?;
        }
        if !self.latency_curves.is_empty() {
            go("latency.png", &|p| self.latency_distribution(p))?;
        }
        if !self.latency_points.is_empty() {
            go("latency-timeline.png", &|p| self.latency_timeline(p))?;
        }
        Ok(written)
    }

    fn throughput_bars(&self, path: &Path) -> Drawn {
        let n = self.throughput.len() as i32;
        let root = BitMapBackend::new(path, (1500, 140 + 34 * n as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = self.throughput.iter().map(|t| t.2).fold(THROUGHPUT_TARGET, f64::max) * 2.0;
        let min = self.throughput.iter().map(|t| t.2).fold(f64::MAX, f64::min).clamp(1.0, 1000.0) / 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption("D2C throughput to an acknowledging consumer, hubmsg and every baseline (256-byte bodies, QoS 1)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(640)
            .build_cartesian_2d((min..max).log_scale(), (0..n - 1).into_segmented())?;
        let labels: Vec<String> = self.throughput.iter().map(|t| t.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("messages per second, first send to last message received (log scale)")
            .x_label_formatter(&|v| fmt_value(*v))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .y_labels(n as usize)
            .label_style(("sans-serif", 13))
            .draw()?;
        chart.draw_series(self.throughput.iter().enumerate().map(|(i, (_, system, v))| {
            let i = i as i32;
            Rectangle::new([(min, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], system_color(system).mix(0.85).filled())
        }))?;
        chart.draw_series(self.throughput.iter().enumerate().map(|(i, (_, _, v))| {
            Text::new(format!(" {}", fmt_value(*v)), (*v, SegmentValue::CenterOf(i as i32)), ("sans-serif", 13).into_font())
        }))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(THROUGHPUT_TARGET, SegmentValue::Exact(0)), (THROUGHPUT_TARGET, SegmentValue::Last)],
                RED.stroke_width(2),
            )))?
            .label(format!("target {} msg/s (fsync'd)", fmt_value(THROUGHPUT_TARGET)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    }

    fn throughput_timeline(&self, path: &Path) -> Drawn {
        let groups: Vec<usize> = {
            let mut g: Vec<usize> = self.timelines.iter().map(|t| t.senders).collect();
            g.sort_unstable();
            g.dedup();
            g
        };
        let root = BitMapBackend::new(path, (1500, 560 * groups.len().max(1) as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, senders) in root.split_evenly((groups.len().max(1), 1)).into_iter().zip(&groups) {
            let runs: Vec<&TimelineRun> = self.timelines.iter().filter(|t| t.senders == *senders).collect();
            let max_x = runs.iter().flat_map(|t| t.points.iter().map(|p| p.0)).fold(0.1, f64::max);
            let max_y = runs.iter().flat_map(|t| t.points.iter().map(|p| p.1)).fold(10.0, f64::max) * 1.5;
            let mut chart = ChartBuilder::on(&area)
                .caption(
                    format!(
                        "Messages received per second over each throughput run, {senders} sender{} (100 ms buckets)",
                        if *senders == 1 { "" } else { "s" }
                    ),
                    ("sans-serif", 18),
                )
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(80)
                .build_cartesian_2d(0f64..max_x * 1.6, (10f64..max_y).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("seconds since the first send")
                .y_desc("messages / s (log scale)")
                .y_label_formatter(&|v| fmt_value(*v))
                .label_style(("sans-serif", 13))
                .draw()?;
            for (i, run) in runs.iter().enumerate() {
                let color = color(i);
                chart
                    .draw_series(LineSeries::new(run.points.iter().map(|&(x, y)| (x, y.max(10.0))), color.stroke_width(2)))?
                    .label(run.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    fn connection_bars(&self, path: &Path) -> Drawn {
        let root = BitMapBackend::new(path, (1100, 200 + 60 * self.connections.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = self.connections.len() as i32;
        let labels: Vec<String> = self.connections.iter().map(|c| c.label.clone()).collect();
        let panels = root.split_evenly((1, 2));
        let rss: fn(&ConnBar) -> f64 = |c| c.rss_kib;
        let cpu: fn(&ConnBar) -> f64 = |c| c.cpu_pct;
        let figures = [
            ("resident memory per connection", RSS_TARGET_KIB, rss, "KiB"),
            ("CPU while every connection sends", CPU_TARGET_PCT, cpu, "% of a core"),
        ];
        for (k, (area, (title, target, value, unit))) in panels.iter().zip(figures).enumerate() {
            let max = self.connections.iter().map(value).fold(target, f64::max) * 1.3;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("Connections: {title}"), ("sans-serif", 17))
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(if k == 0 { 220 } else { 10 })
                .build_cartesian_2d(0f64..max, (0..n - 1).into_segmented())?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_desc(unit)
                .x_label_formatter(&|v| fmt_value(*v))
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) if k == 0 => labels.get(*i as usize).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .y_labels(n as usize)
                .label_style(("sans-serif", 13))
                .draw()?;
            chart.draw_series(self.connections.iter().enumerate().map(|(i, c)| {
                let system = if c.label.starts_with("hubmsg") { "hubmsg" } else { "Mosquitto" };
                let i = i as i32;
                Rectangle::new(
                    [(0.0, SegmentValue::Exact(i)), (value(c), SegmentValue::Exact(i + 1))],
                    system_color(system).mix(0.85).filled(),
                )
            }))?;
            chart.draw_series(self.connections.iter().enumerate().map(|(i, c)| {
                Text::new(format!(" {}", fmt_value(value(c))), (value(c), SegmentValue::CenterOf(i as i32)), ("sans-serif", 13).into_font())
            }))?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(target, SegmentValue::Exact(0)), (target, SegmentValue::Last)],
                    RED.stroke_width(2),
                )))?
                .label(format!("hub goal <= {} {unit}", fmt_value(target)))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    fn latency_distribution(&self, path: &Path) -> Drawn {
        // x = -log10(1 - p): 1 → 90 %, 2 → 99 %, 3 → 99.9 % …; the maximum is drawn at 5.
        let to_x = |p: f64| if p >= 100.0 { 5.0 } else { (-(1.0 - p / 100.0).log10()).min(5.0) };
        let all = self.latency_curves.iter().flat_map(|c| c.1.iter().map(|p| p.1));
        let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = ((lo * 0.8).max(0.01), (hi * 1.25).max(lo * 2.0).max(0.1));
        let root = BitMapBackend::new(path, (1100, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency distribution (D2C: send() to consumer; C2D: send to feedback)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..5.0, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&|x| match x.round() as i64 {
                0 => "0 %".into(),
                5 => "max".into(),
                k => format!("{} %", 100.0 - 100.0 * 10f64.powi(-k as i32)),
            })
            .x_desc("percentile")
            .y_desc("milliseconds (log scale)")
            .y_labels(10)
            .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (label, pts)) in self.latency_curves.iter().enumerate() {
            let color = color(i);
            chart
                .draw_series(LineSeries::new(pts.iter().map(|&(p, v)| (to_x(p), v.max(lo))), color.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        let targets = [
            (LATENCY_TARGET_MS, format!("D2C p99 target {LATENCY_TARGET_MS} ms")),
            (ROUNDTRIP_TARGET_MS, format!("C2D p99 target {ROUNDTRIP_TARGET_MS} ms")),
        ];
        for (i, (ms, label)) in targets.into_iter().enumerate() {
            // Equal targets share one line and one label.
            if i > 0 && ms == LATENCY_TARGET_MS {
                continue;
            }
            let label = if i == 0 && ms == ROUNDTRIP_TARGET_MS { format!("D2C and C2D p99 target {ms} ms") } else { label };
            if ms > lo && ms < hi {
                chart.draw_series(std::iter::once(PathElement::new(vec![(0.0, ms), (5.0, ms)], RED.mix(0.5).stroke_width(1))))?;
                chart.draw_series(std::iter::once(Text::new(label, (0.05, ms), ("sans-serif", 13).into_font().color(&RED))))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    }

    fn latency_timeline(&self, path: &Path) -> Drawn {
        let n = self.latency_points.len() as u32;
        let root = BitMapBackend::new(path, (1100, 320 * n.max(1))).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, (i, (label, pts))) in root.split_evenly((n as usize, 1)).into_iter().zip(self.latency_points.iter().enumerate()) {
            let max_x = pts.iter().map(|p| p.0).fold(0.1, f64::max);
            let lo = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min).max(0.01) * 0.8;
            let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(lo * 2.0) * 1.2;
            let mut chart = ChartBuilder::on(&area)
                .caption(format!("Latency of each message over the window: {label}"), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..max_x, (lo..hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("seconds into the measured window")
                .y_desc("ms (log scale)")
                .y_labels(6)
                .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
                .label_style(("sans-serif", 13))
                .draw()?;
            let color = color(i);
            chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 1, color.filled())))?;
        }
        root.present()?;
        Ok(())
    }
}
