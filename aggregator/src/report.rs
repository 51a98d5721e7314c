//! The federation's report: a table per round, and validation loss against training tokens for
//! the global model (optionally beside a centralized baseline) as a PNG.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Deserialize;

use crate::{engine::RoundSummary, state::StateDir};

/// One point of a loss curve.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct CurvePoint {
    /// Training tokens seen so far (all sites together).
    pub tokens: u64,
    /// Mean validation loss.
    pub val_loss: f64,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Mean validation loss of the global model a round started from: from the masked sum where the
/// round has one (every survivor), else from the sites that report in the clear.
fn global_val_loss(s: &RoundSummary) -> Option<f64> {
    s.metrics
        .map(|m| m.val_loss_before)
        .or_else(|| mean(s.reports.values().map(|r| r.val_loss_before)))
}

/// Tokens a round trained on, by the same sources as [`global_val_loss`].
fn round_tokens(s: &RoundSummary) -> u64 {
    s.metrics
        .map_or_else(|| s.reports.values().map(|r| r.tokens).sum(), |m| m.tokens)
}

/// Validation loss of the global model against tokens: the loss each round's cohort measured
/// on the model it received (sites' own validation splits, averaged), placed at the tokens
/// trained before that model was made.
pub fn global_curve(history: &[RoundSummary]) -> Vec<CurvePoint> {
    let mut tokens = 0;
    let mut curve = Vec::new();
    for summary in history {
        if let Some(loss) = global_val_loss(summary) {
            curve.push(CurvePoint {
                tokens,
                val_loss: loss,
            });
        }
        tokens += round_tokens(summary);
    }
    curve
}

/// A plain-text table of the rounds, for the terminal.
pub fn summary_table(history: &[RoundSummary]) -> String {
    let mut out = String::new();
    let sites: Vec<&String> = history
        .iter()
        .flat_map(|s| s.reports.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let _ = write!(
        out,
        "\n{:>5} {:>7} {:>9} {:>9} {:>8} {:>10}",
        "round", "secs", "up MB", "down MB", "ε", "global val"
    );
    for site in &sites {
        let _ = write!(out, " {:>12}", format!("{site} val"));
    }
    out.push('\n');
    for s in history {
        let label = if s.evaluation_only {
            "final".to_string()
        } else {
            s.round.to_string()
        };
        let epsilon = if let Some(epsilon) = s.epsilon {
            format!("{epsilon:.3}")
        } else {
            "-".into()
        };
        let global = global_val_loss(s).map_or("-".to_string(), |l| format!("{l:.4}"));
        let _ = write!(
            out,
            "{label:>5} {:>7.1} {:>9.2} {:>9.2} {epsilon:>8} {global:>10}",
            s.seconds,
            s.upload_bytes as f64 / 1e6,
            s.download_bytes as f64 / 1e6,
        );
        for site in &sites {
            let cell = s.reports.get(*site).map_or("-".to_string(), |r| {
                if s.evaluation_only {
                    format!("{:.4}", r.val_loss_before)
                } else {
                    format!("{:.3}→{:.3}", r.val_loss_before, r.val_loss_after)
                }
            });
            let _ = write!(out, " {cell:>12}");
        }
        out.push('\n');
    }
    out.push_str(
        "global val: mean over the round's survivors of the validation loss of the global model it starts from,\n\
         decoded from the masked sum (from clear reports only where a round has no sum);\n\
         site val: that loss → the loss after the site's local training (sites that share metrics only).\n",
    );
    out
}

/// Writes report.md and loss.png for the state folder; returns the paths written.
pub fn write(state: &Path, out: &Path, baseline: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    let persisted = StateDir::new(state)?
        .load()?
        .with_context(|| format!("{} holds no completed round yet", state.display()))?;
    let history = persisted.history;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let federated = global_curve(&history);
    let baseline: Option<Vec<CurvePoint>> = baseline
        .map(|path| -> anyhow::Result<_> {
            let text =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&text).with_context(|| {
                format!(
                    "{} is not a JSON list of {{tokens, val_loss}}",
                    path.display()
                )
            })
        })
        .transpose()?;

    let md = out.join("report.md");
    let mut text = String::from(
        "# Federation report\n\n| round | seconds | upload MB | ε | global val loss |\n|---|---|---|---|---|\n",
    );
    for s in &history {
        let global = global_val_loss(s).unwrap_or(f64::NAN);
        let label = if s.evaluation_only {
            "final".to_string()
        } else {
            s.round.to_string()
        };
        let _ = writeln!(
            text,
            "| {label} | {:.1} | {:.2} | {} | {global:.4} |",
            s.seconds,
            s.upload_bytes as f64 / 1e6,
            if let Some(epsilon) = s.epsilon {
                format!("{epsilon:.3}")
            } else {
                "no DP".into()
            }
        );
    }
    if let Some(base) = &baseline {
        text.push_str("\n## Centralized baseline\n\n| tokens | val loss |\n|---|---|\n");
        for p in base {
            let _ = writeln!(text, "| {} | {:.4} |", p.tokens, p.val_loss);
        }
    }
    std::fs::write(&md, text).with_context(|| format!("cannot write {}", md.display()))?;

    let png = out.join("loss.png");
    draw(&png, &federated, baseline.as_deref())?;
    Ok(vec![md, png])
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a system font for labels; false when none is installed (the plot is then drawn
/// without text rather than not at all).
fn register_font() -> bool {
    for path in FONT_CANDIDATES {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the life of the process; one small leak per report.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws validation loss against tokens.
pub fn draw(
    path: &Path,
    federated: &[CurvePoint],
    baseline: Option<&[CurvePoint]>,
) -> anyhow::Result<()> {
    let labels = register_font();
    let all = federated.iter().chain(baseline.unwrap_or_default());
    let max_tokens = all.clone().map(|p| p.tokens).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.val_loss), hi.max(p.val_loss))
    });
    let (lo, hi) = if lo <= hi {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };

    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let draw_err =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption("Validation loss vs training tokens", ("sans-serif", 24))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_tokens, lo..hi)
        .map_err(|e| draw_err(&e))?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("tokens (all sites)")
            .y_desc("validation loss")
            .draw()
            .map_err(|e| draw_err(&e))?;
    }
    let series = [("federated (global model)", federated, BLUE)]
        .into_iter()
        .chain(baseline.map(|b| ("centralized baseline", b, RED)));
    for (name, points, color) in series {
        let line = points.iter().map(|p| (p.tokens as f64, p.val_loss));
        let drawn = chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| draw_err(&e))?;
        if labels {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(line.map(|(x, y)| Circle::new((x, y), 3, color.filled())))
            .map_err(|e| draw_err(&e))?;
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::SiteReport;

    fn summary(round: u32, losses: &[(&str, f64, u64)]) -> RoundSummary {
        RoundSummary {
            round,
            evaluation_only: false,
            survivors: vec![],
            dropped: vec![],
            seconds: 1.0,
            upload_bytes: 10,
            download_bytes: 10,
            epsilon: Some(1.0),
            rho: 0.1,
            model_sha256: String::new(),
            reports: losses
                .iter()
                .map(|(s, l, t)| {
                    (
                        s.to_string(),
                        SiteReport {
                            val_loss_before: *l,
                            tokens: *t,
                            ..Default::default()
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            metrics: None,
        }
    }

    #[test]
    fn global_curve_takes_the_masked_sum_where_a_round_has_one() {
        // Round 2's sites report nothing in the clear; its sum says mean 4.5 over 300 tokens.
        let mut private = summary(2, &[]);
        private.metrics = Some(quorum_round::SummedMetrics {
            sites: 3,
            val_loss_before: 4.5,
            tokens: 300,
            ..Default::default()
        });
        let history = [summary(1, &[("a", 5.0, 100)]), private, summary(3, &[])];
        let curve = global_curve(&history);
        let points: Vec<(u64, f64)> = curve.iter().map(|p| (p.tokens, p.val_loss)).collect();
        assert_eq!(points, [(0, 5.0), (100, 4.5)]);
        assert!(summary_table(&history).contains("4.5000"));
    }

    #[test]
    fn global_curve_places_each_model_at_the_tokens_trained_before_it() {
        let history = [
            summary(1, &[("a", 5.0, 100), ("b", 7.0, 50)]),
            summary(2, &[("a", 3.0, 100), ("b", 5.0, 50)]),
        ];
        let curve = global_curve(&history);
        assert_eq!(
            curve,
            vec![
                CurvePoint {
                    tokens: 0,
                    val_loss: 6.0
                },
                CurvePoint {
                    tokens: 150,
                    val_loss: 4.0
                }
            ]
        );
    }

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let points = [
            CurvePoint {
                tokens: 0,
                val_loss: 5.0,
            },
            CurvePoint {
                tokens: 10,
                val_loss: 4.0,
            },
        ];
        draw(&path, &points, Some(&points)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
