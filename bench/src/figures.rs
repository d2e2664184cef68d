//! What a scenario produces: figures with their references and targets, what it checked,
//! its samples and notes.

use std::time::Duration;

/// One measured figure, with its reference and target where it has them.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// (what, value): the reference this figure is a ratio of.
    pub reference: Option<(String, f64)>,
    /// The target, in words ("≥ 50 % of bare spawn").
    pub target: String,
    /// Whether the target is met; `None` when there is no target.
    pub met: Option<bool>,
}

impl Figure {
    pub(crate) fn plain(name: &str, value: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            reference: None,
            target: "reported, no target".into(),
            met: None,
        }
    }

    /// A figure that must stay at or under `max`.
    pub(crate) fn at_most(name: &str, value: f64, unit: &str, max: f64) -> Self {
        Self {
            target: format!("≤ {max} {unit}"),
            met: Some(value <= max),
            ..Self::plain(name, value, unit)
        }
    }

    /// A rate that must reach `share` of a reference rate.
    pub(crate) fn share_of(
        name: &str,
        value: f64,
        unit: &str,
        reference: (&str, f64),
        share: f64,
    ) -> Self {
        let ratio = value / reference.1;
        Self {
            reference: Some((reference.0.into(), reference.1)),
            target: format!("≥ {:.0} % of {}", share * 100.0, reference.0),
            met: Some(ratio >= share),
            ..Self::plain(name, value, unit)
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.reference.as_ref().map(|(_, r)| self.value / r)
    }
}

/// What one scenario measured and checked.
#[derive(Clone, Debug, Default)]
pub struct ScenarioResult {
    pub name: String,
    pub figures: Vec<Figure>,
    /// What was verified to be complete ("24/24 tasks Success").
    pub checked: String,
    /// The raw samples file, relative to the samples dir.
    pub samples: Option<String>,
    /// Series for the plot: (label, [(load, value)]).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub elapsed: Duration,
    pub notes: Vec<String>,
    /// What each measured window cost per unit of work (commits, statements, CPU).
    pub costs: Vec<crate::costs::Costs>,
}

/// The outcome of one scenario: measured, or failed with the reason.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub result: Result<ScenarioResult, String>,
}

/// The measured values of the references, which later scenarios divide by.
#[derive(Clone, Debug, Default)]
pub struct References {
    pub spawn_per_sec: Option<f64>,
    pub copy_lines_per_sec: Option<f64>,
}
