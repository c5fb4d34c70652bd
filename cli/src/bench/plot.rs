//! PNG plots of the bench figures with plotters' bitmap backend. Text is drawn with DejaVu Sans
//! embedded in the binary (the `dejavu` crate, through plotters' `ab_glyph` feature), so plots
//! render the same on a fresh machine with no fonts or fontconfig installed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use hubmsg_core::{Error, ErrorKind};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::d2c::{ThroughputRun, LATENCY_TARGET_MS, THROUGHPUT_TARGET};
use super::fmt_value;

/// Line colors, in order (readable on white).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// What drawing one chart returns.
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Everything the scenarios hand over for plotting.
#[derive(Default)]
pub struct PlotData {
    /// `(label, system, msg/s)` per throughput run.
    pub throughput: Vec<(String, &'static str, f64)>,
    /// `(label, [(s, msg/s)])` received per 100 ms, per throughput run.
    pub timelines: Vec<(String, Vec<(f64, f64)>)>,
    /// `(label, [(percentile, ms)])` latency distributions.
    pub latency_curves: Vec<(String, Vec<(f64, f64)>)>,
    /// `(label, [(s since start, ms)])` latency of individual D2C messages over the window.
    pub latency_points: Vec<(String, Vec<(f64, f64)>)>,
}

impl PlotData {
    /// Adds a throughput run (bar and timeline).
    pub fn add_throughput(&mut self, r: &ThroughputRun) {
        let label = format!("{} {}", r.system, r.label);
        self.throughput.push((label.clone(), r.system, r.msgs_per_sec));
        self.timelines.push((label, r.timeline.clone()));
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
        let root = BitMapBackend::new(path, (1100, 120 + 50 * n as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = self.throughput.iter().map(|t| t.2).fold(THROUGHPUT_TARGET, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .caption("D2C throughput to an acknowledging consumer (256-byte bodies, QoS 1)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(330)
            .build_cartesian_2d(0f64..max, (0..n - 1).into_segmented())?;
        let labels: Vec<String> = self.throughput.iter().map(|t| t.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("messages per second, first send to last event received")
            .x_label_formatter(&|v| fmt_value(*v))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .y_labels(n as usize)
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(self.throughput.iter().enumerate().map(|(i, (_, system, v))| {
            let color = if *system == "hubmsg" { RGBColor(31, 119, 180) } else { RGBColor(255, 127, 14) };
            let i = i as i32;
            Rectangle::new([(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], color.mix(0.85).filled())
        }))?;
        chart.draw_series(self.throughput.iter().enumerate().map(|(i, (_, _, v))| {
            Text::new(format!(" {}", fmt_value(*v)), (*v, SegmentValue::CenterOf(i as i32)), ("sans-serif", 14).into_font())
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
        let root = BitMapBackend::new(path, (1100, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_x = self.timelines.iter().flat_map(|t| t.1.iter().map(|p| p.0)).fold(0.1, f64::max);
        let max_y = self.timelines.iter().flat_map(|t| t.1.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("Messages received per second over each throughput run (100 ms buckets)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first send")
            .y_desc("messages / s")
            .y_label_formatter(&|v| fmt_value(*v))
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (label, pts)) in self.timelines.iter().enumerate() {
            let color = color(i);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
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
        for (ms, label) in [(LATENCY_TARGET_MS, "D2C p99 target 5 ms"), (10.0, "C2D p99 target 10 ms")] {
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
