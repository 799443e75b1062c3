//! `training_loss.png` and `training_eval_loss.png`, drawn as LLaMA-Factory's `plot_loss` draws
//! them: the raw curve faint, a smoothed curve on top.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

use crate::error::{TrainError, TrainResult};

/// DejaVu Sans (its licence is beside it), bundled so that plots need no system fonts.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Exponential smoothing whose weight grows with the number of points, as LLaMA-Factory's.
fn smooth(values: &[f64]) -> Vec<f64> {
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = values.first().copied().unwrap_or_default();
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// Plots `loss` and `eval_loss` from `log_history` into `output_dir`; a metric with no points
/// is skipped.
pub fn plot_losses(output_dir: &Path, log_history: &[Value]) -> TrainResult<()> {
    // Registering twice is harmless: the second call finds the family already present.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    for key in ["loss", "eval_loss"] {
        let points: Vec<(f64, f64)> = log_history
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let path = output_dir.join(format!("training_{key}.png"));
        draw(&path, key, output_dir, &points)
            .map_err(|e| TrainError::Checkpoint(format!("cannot draw {}: {e}", path.display())))?;
    }
    Ok(())
}

fn draw(
    path: &Path,
    key: &str,
    output_dir: &Path,
    points: &[(f64, f64)],
) -> Result<(), Box<dyn std::error::Error>> {
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let smoothed = smooth(&values);
    let (x_min, x_max) = (
        points[0].0,
        points[points.len() - 1].0.max(points[0].0 + 1.0),
    );
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);

    let root = BitMapBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("training {key} of {}", output_dir.display());
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(key)
        .label_style(("sans-serif", 13))
        .draw()?;
    let blue = RGBColor(0x1f, 0x77, 0xb4);
    chart
        .draw_series(LineSeries::new(points.iter().copied(), blue.mix(0.4)))?
        .label("original")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.mix(0.4)));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| p.0).zip(smoothed),
            blue.stroke_width(2),
        ))?
        .label("smoothed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_starts_at_the_first_value_and_lags() {
        let s = smooth(&[4.0, 2.0, 2.0]);
        assert_eq!(s[0], 4.0);
        assert!(s[1] > 2.0 && s[1] < 4.0);
        assert!(s[2] < s[1]);
    }
}
