//! PNG line charts of a suite's runs, drawn with `plotters` (bitmap backend,
//! text through `ab_glyph` with a bundled font, so no system font is needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// DejaVu Sans Mono (Bitstream Vera license, see `assets/`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// The family name the charts ask for.
const FAMILY: &str = "sans-serif";

/// Chart size in pixels.
const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;

/// Line colours, one per series in turn.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) name: String,
    /// (x, y), drawn in x order.
    pub(crate) points: Vec<(f64, f64)>,
}

/// A line chart: title, axis labels and its series.
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) series: Vec<Series>,
    /// A logarithmic y axis (latencies that span orders of magnitude).
    pub(crate) log_y: bool,
    /// Where the legend goes: where the lines are not.
    pub(crate) legend: SeriesLabelPosition,
}

/// Returns a tick label: no decimals from 10 up, up to two below.
fn short(value: f64) -> String {
    if value.abs() >= 10.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Returns a logarithmic axis range around the positive `values`, with room
/// below and above.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for value in values.filter(|v| v.is_finite() && *v > 0.0) {
        low = low.min(value);
        high = high.max(value);
    }
    if !low.is_finite() {
        return (0.1, 10.0);
    }
    (low / 2.0, high * 2.0)
}

/// Registers the bundled font once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The font is bundled and known to parse; a failure leaves the
            // charts without text, which `draw` reports as an error.
            let _ = plotters::style::register_font(FAMILY, style, FONT);
        }
    });
}

/// Returns the range of `values` with some room around it, starting at 0 when
/// every value is positive (latencies, bytes).
fn axis_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for value in values.filter(|v| v.is_finite()) {
        low = low.min(value);
        high = high.max(value);
    }
    if !low.is_finite() {
        return (0.0, 1.0);
    }
    if low >= 0.0 {
        low = 0.0;
    }
    if high <= low {
        high = low + 1.0;
    }
    (low, high + (high - low) * 0.08)
}

/// Returns the room to add above a linear axis's range, as a share of it, so
/// that a legend at the top (a row per series) sits above the lines.
fn legend_room(legend: &SeriesLabelPosition, series: usize) -> f64 {
    match legend {
        SeriesLabelPosition::UpperLeft
        | SeriesLabelPosition::UpperMiddle
        | SeriesLabelPosition::UpperRight => 0.07 * series as f64,
        _ => 0.0,
    }
}

impl Chart {
    /// Draws the chart as a PNG at `path`.
    ///
    /// # Errors
    ///
    /// Fails when there is nothing to draw, or the PNG cannot be written.
    pub(crate) fn draw(&self, path: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.series.iter().any(|series| !series.points.is_empty()),
            "no points to draw"
        );
        register_font();
        let points = || self.series.iter().flat_map(|series| &series.points);
        let (x_low, x_high) = axis_range(points().map(|&(x, _)| x));
        let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
        let failed = |error: &dyn std::fmt::Debug| anyhow::anyhow!("drawing {path:?}: {error:?}");
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&self.title, (FAMILY, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64);
        // The same drawing on a linear or a logarithmic y axis (two types).
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart.map_err(|e| failed(&e))?;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .x_label_formatter(&|x| format!("{x:.0}"))
                    .y_label_formatter(&|y| short(*y))
                    .label_style((FAMILY, 14))
                    .axis_desc_style((FAMILY, 15))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|e| failed(&e))?;
                for (i, series) in self.series.iter().enumerate() {
                    let colour = COLOURS[i % COLOURS.len()];
                    let mut line = series.points.clone();
                    line.sort_by(|a, b| a.0.total_cmp(&b.0));
                    chart
                        .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
                        .map_err(|e| failed(&e))?
                        .label(&series.name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                        });
                    chart
                        .draw_series(
                            line.into_iter()
                                .map(|point| Circle::new(point, 4, colour.filled())),
                        )
                        .map_err(|e| failed(&e))?;
                }
                chart
                    .configure_series_labels()
                    .position(self.legend.clone())
                    .label_font((FAMILY, 14))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| failed(&e))?;
            }};
        }
        if self.log_y {
            let (y_low, y_high) = log_range(points().map(|&(_, y)| y));
            finish!(builder.build_cartesian_2d(x_low..x_high, (y_low..y_high).log_scale()));
        } else {
            let (y_low, y_high) = axis_range(points().map(|&(_, y)| y));
            let y_high = y_high + legend_room(&self.legend, self.series.len()) * (y_high - y_low);
            finish!(builder.build_cartesian_2d(x_low..x_high, y_low..y_high));
        }
        root.present().map_err(|e| failed(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_written_as_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let chart = Chart {
            title: "latency against offered load".into(),
            x_label: "offered msg/s".into(),
            y_label: "ms".into(),
            series: vec![
                Series {
                    name: "p50".into(),
                    points: vec![(2_000.0, 1.5), (500.0, 1.0), (1_000.0, 1.2)],
                },
                Series {
                    name: "p99".into(),
                    points: vec![(500.0, 4.0), (1_000.0, 5.0), (2_000.0, 9.0)],
                },
            ],
            log_y: true,
            legend: SeriesLabelPosition::UpperLeft,
        };
        chart.draw(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 2_000, "{} bytes", bytes.len());
    }

    #[test]
    fn an_empty_chart_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "nothing".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "none".into(),
                points: Vec::new(),
            }],
            log_y: false,
            legend: SeriesLabelPosition::UpperLeft,
        };
        assert!(chart.draw(&dir.path().join("none.png")).is_err());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(short(1_000.0), "1000");
        assert_eq!(short(12.4), "12");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.126), "0.13");
    }

    #[test]
    fn a_log_axis_leaves_a_factor_of_two_around_the_positive_values() {
        assert_eq!(log_range([0.0, 1.0, 100.0].into_iter()), (0.5, 200.0));
        assert_eq!(log_range(std::iter::empty()), (0.1, 10.0));
    }

    #[test]
    fn a_legend_at_the_top_gets_room_by_its_rows() {
        assert_eq!(legend_room(&SeriesLabelPosition::MiddleRight, 4), 0.0);
        assert!((legend_room(&SeriesLabelPosition::UpperRight, 4) - 0.28).abs() < 1e-9);
    }

    #[test]
    fn axes_start_at_zero_and_leave_room_above() {
        assert_eq!(axis_range([2.0, 10.0].into_iter()), (0.0, 10.8));
        assert_eq!(axis_range(std::iter::empty()), (0.0, 1.0));
        assert_eq!(axis_range([5.0].into_iter()), (0.0, 5.4));
        let (low, high) = axis_range([-2.0, 2.0].into_iter());
        assert_eq!(low, -2.0);
        assert!(high > 2.0);
    }
}
