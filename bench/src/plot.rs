//! The one plot: latency and RSS against load, as SVG (plotters, SVG backend only).

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

/// Draw each series in its own panel, one above the other: `(title, [(load, value)])`.
pub fn draw(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let panels = series.len().max(1);
    let root = SVGBackend::new(path, (900, 320 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let areas = root.split_evenly((panels, 1));
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, ((title, points), area)) in series.iter().zip(areas.iter()).enumerate() {
        let finite: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let x_max = finite.iter().map(|p| p.0).fold(0.0_f64, f64::max).max(1.0);
        let y_max = finite.iter().map(|p| p.1).fold(0.0_f64, f64::max).max(1.0) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        let color = colors[i % colors.len()];
        if finite.len() > 60 {
            chart
                .draw_series(finite.iter().map(|p| Circle::new(*p, 2, color.filled())))
                .map_err(|e| anyhow!("{e:?}"))?;
        } else {
            chart
                .draw_series(LineSeries::new(finite.iter().copied(), &color))
                .map_err(|e| anyhow!("{e:?}"))?;
            chart
                .draw_series(finite.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
