//! `holdclear bench --plot DIR`: SVG plots of a run, drawn with plotters'
//! SVG backend (no system fonts needed): the orders cleared over time under
//! the rate limit (section 7's `timeline`, next to the floor) and the claim's
//! p50 and p99 against the number of watched cases (section 4).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Report;
use super::calls::Calls;
use super::watching::Watching;

/// The plot of section 7.
pub const CLEARED_SVG: &str = "cleared-over-time.svg";
/// The plot of section 4.
pub const CLAIMS_SVG: &str = "claim-p99-vs-watched.svg";

const SIZE: (u32, u32) = (800, 450);

/// Writes the plots of the sections `report` has into `dir` (created if
/// missing); returns the files written.
pub fn write(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    if let Some(c) = &report.calls_per_order {
        let path = dir.join(CLEARED_SVG);
        cleared(c, &path).map_err(std::io::Error::other)?;
        written.push(path);
    }
    if let Some(w) = &report.watching {
        let path = dir.join(CLAIMS_SVG);
        claims(w, &path).map_err(std::io::Error::other)?;
        written.push(path);
    }
    Ok(written)
}

/// Orders cleared against real-time minutes, with the floor's line (the
/// rate limit ÷ the fewest calls an order needs).
fn cleared(c: &Calls, path: &Path) -> Result<(), String> {
    let points: Vec<(f64, f64)> = c
        .timeline
        .iter()
        .map(|&(t, n)| (t / 60.0, n as f64))
        .collect();
    let x_max = points.last().map_or(1.0, |p| p.0).max(1.0);
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Orders cleared under the rate limit ({:.0} calls/s; run at time ÷ {:.0})",
                c.rate_limit_per_sec, c.time_scale
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("minutes (real time)")
        .y_desc("orders cleared")
        .draw()
        .map_err(text)?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(text)?
        .label(format!("cleared ({:.0}/min)", c.cleared_per_minute))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let floor = c.floor_per_minute.max(f64::MIN_POSITIVE);
    let end = x_max.min(y_max / floor);
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (end, end * floor)], &RED))
        .map_err(text)?
        .label(format!("floor ({:.0}/min)", c.floor_per_minute))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    legend(&mut chart)?;
    root.present().map_err(text)
}

/// Claim p50 and p99 (ms) against watched cases (log scale), with the bar.
fn claims(w: &Watching, path: &Path) -> Result<(), String> {
    let sizes = [&w.small, &w.large];
    let x_min = sizes.iter().map(|c| c.waiting).min().unwrap_or(1).max(1) as f64 / 2.0;
    let x_max = sizes.iter().map(|c| c.waiting).max().unwrap_or(1).max(1) as f64 * 2.0;
    let y_max = sizes
        .iter()
        .map(|c| c.claim_ms.p99)
        .fold(w.target_ms, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Claim of 100 due cases against watched cases",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("watched cases (log scale)")
        .y_desc("claim, ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(text)?;
    for (name, colour, pick) in [
        (
            "p99",
            RED,
            (|c: &super::watching::Claims| c.claim_ms.p99) as fn(&_) -> f64,
        ),
        ("p50", BLUE, |c: &super::watching::Claims| c.claim_ms.p50),
    ] {
        let points: Vec<(f64, f64)> = sizes.iter().map(|c| (c.waiting as f64, pick(c))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(text)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(text)?;
    }
    chart
        .draw_series(LineSeries::new(
            [(x_min, w.target_ms), (x_max, w.target_ms)],
            BLACK.stroke_width(1),
        ))
        .map_err(text)?
        .label(format!("bar ({} ms)", w.target_ms))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    legend(&mut chart)?;
    root.present().map_err(text)
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(text)
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}
