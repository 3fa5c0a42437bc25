//! Which cohorts look like the one hurting the backend: those whose backend time, backend
//! error rate or churn is an outlier against the rest of the fleet, with enough samples to
//! mean something. It only points; it never enforces (the report shows what an operator
//! could run).

use super::cohort::{CohortFigures, CohortTally};

use crate::rules::VersionInput;

/// Samples a cohort (and the rest) needs in a window before it is compared.
pub const MIN_SAMPLES: u64 = 10;
/// How many times the rest's figure an outlier's must be.
pub const OUTLIER_FACTOR: f64 = 5.0;
/// A slow cohort must also be this much slower than the rest, in ms (5 × 0.2 ms is noise).
pub const MIN_SLOWER_MS: f64 = 20.0;
/// Error rate a cohort must reach before it is an outlier.
pub const MIN_ERROR_RATE: f64 = 0.10;
/// Share of its admissions whose tunnels ended soon after opening before churn is an outlier.
pub const MIN_CHURN_RATE: f64 = 0.5;

/// Why a cohort is a suspect, worst first; `severity` orders suspects between themselves.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspicion {
    /// One sentence per finding, with the figures.
    pub reasons: Vec<String>,
    /// The largest ratio to the rest of the fleet among the findings.
    pub severity: f64,
}

/// The suspicion against each cohort (same order as `cohorts`), None for the unremarkable.
/// `whole` is every cohort and `other` together.
pub fn find(
    cohorts: &[(VersionInput, CohortFigures)],
    whole: &CohortFigures,
) -> Vec<Option<Suspicion>> {
    cohorts
        .iter()
        .map(|(_, figures)| {
            // The minute when it holds enough samples (an incident is now), else the hour.
            let (own, all) = if figures.minute.backend_attempts() >= MIN_SAMPLES
                || figures.minute.tunnels_ended as u64 >= MIN_SAMPLES
            {
                (&figures.minute, &whole.minute)
            } else {
                (&figures.hour, &whole.hour)
            };
            let rest = without(all, own);
            judge(own, &rest)
        })
        .collect()
}

/// `all` minus `own`, for the figures compared (histograms by bucket, counters).
fn without(all: &CohortTally, own: &CohortTally) -> CohortTally {
    let mut rest = *all;
    rest.backend = all.backend.minus(&own.backend);
    rest.backend_errors = all.backend_errors.saturating_sub(own.backend_errors);
    rest.backend_timeouts = all.backend_timeouts.saturating_sub(own.backend_timeouts);
    rest.admitted = all.admitted.saturating_sub(own.admitted);
    rest.short_tunnels = all.short_tunnels.saturating_sub(own.short_tunnels);
    rest.tunnels_ended = all.tunnels_ended.saturating_sub(own.tunnels_ended);
    rest
}

fn judge(own: &CohortTally, rest: &CohortTally) -> Option<Suspicion> {
    let mut reasons = Vec::new();
    let mut severity: f64 = 0.0;
    // Backend time to the response head or 101.
    if own.backend.count() >= MIN_SAMPLES && rest.backend.count() >= MIN_SAMPLES {
        if let (Some(p99), Some(rest_p99)) =
            (own.backend.quantile(0.99), rest.backend.quantile(0.99))
        {
            let (ms, rest_ms) = (p99 / 1000.0, rest_p99 / 1000.0);
            let ratio = ms / rest_ms.max(0.001);
            if ratio >= OUTLIER_FACTOR && ms - rest_ms >= MIN_SLOWER_MS {
                reasons.push(format!(
                    "backend p99 {ms:.1} ms is {ratio:.1}x the rest of the fleet ({rest_ms:.1} ms), {} samples",
                    own.backend.count()
                ));
                severity = severity.max(ratio);
            }
        }
    }
    // Backend errors and timeouts.
    let attempts = own.backend_attempts();
    let rest_attempts = rest.backend_attempts();
    if attempts >= MIN_SAMPLES && rest_attempts >= MIN_SAMPLES {
        let failed = u64::from(own.backend_errors) + u64::from(own.backend_timeouts);
        let rest_failed = u64::from(rest.backend_errors) + u64::from(rest.backend_timeouts);
        let rate = failed as f64 / attempts as f64;
        let rest_rate = rest_failed as f64 / rest_attempts as f64;
        let ratio = rate / rest_rate.max(0.001);
        if rate >= MIN_ERROR_RATE && ratio >= OUTLIER_FACTOR {
            reasons.push(format!(
                "backend errors or timeouts on {:.0}% of {attempts} attempts (rest of the fleet: {:.1}%)",
                rate * 100.0,
                rest_rate * 100.0
            ));
            severity = severity.max(ratio.min(1000.0));
        }
    }
    // Churn: tunnels that end on their own soon after opening, per admission.
    if own.short_tunnels as u64 >= MIN_SAMPLES
        && own.admitted > 0
        && rest.admitted as u64 >= MIN_SAMPLES
    {
        let rate = f64::from(own.short_tunnels) / f64::from(own.admitted);
        let rest_rate = f64::from(rest.short_tunnels) / f64::from(rest.admitted);
        let ratio = rate / rest_rate.max(0.001);
        if rate >= MIN_CHURN_RATE && ratio >= OUTLIER_FACTOR {
            reasons.push(format!(
                "{} tunnels ended soon after opening, {:.0}% of its admissions (rest of the fleet: {:.0}%)",
                own.short_tunnels,
                rate * 100.0,
                rest_rate * 100.0
            ));
            severity = severity.max(ratio.min(1000.0));
        }
    }
    (!reasons.is_empty()).then_some(Suspicion { reasons, severity })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::cohort::BackendResult;
    use crate::census::window::Tally;
    use crate::version::FirmwareVersion;

    fn cohort(backend_ms: u64, n: u32, errors: u32, short: u32) -> CohortFigures {
        let mut t = CohortTally::default();
        for _ in 0..n {
            t.count(crate::census::Outcome::Admitted);
            t.count_backend(backend_ms * 1000, BackendResult::Answered);
        }
        for _ in 0..errors {
            t.count_backend(0, BackendResult::Error);
        }
        for _ in 0..short {
            t.count_tunnel_end(100, true);
        }
        CohortFigures { minute: t, hour: t }
    }

    fn run(cohorts: Vec<CohortFigures>) -> Vec<Option<Suspicion>> {
        let mut whole = CohortFigures::default();
        let listed: Vec<(VersionInput, CohortFigures)> = cohorts
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                whole.minute.merge(&f.minute);
                whole.hour.merge(&f.hour);
                (
                    VersionInput::Parsed(FirmwareVersion::new(1, i as u64, 0)),
                    f,
                )
            })
            .collect();
        find(&listed, &whole)
    }

    #[test]
    fn a_cohort_twenty_times_slower_is_a_suspect_and_the_rest_are_not() {
        let found = run(vec![
            cohort(10, 200, 0, 0),
            cohort(10, 100, 0, 0),
            cohort(200, 50, 0, 0),
        ]);
        assert!(found[0].is_none() && found[1].is_none(), "{found:?}");
        let s = found[2].as_ref().expect("the slow cohort");
        assert!(s.reasons[0].starts_with("backend p99"), "{s:?}");
        assert!(s.severity >= 5.0, "{s:?}");
    }

    #[test]
    fn too_few_samples_a_small_gap_or_no_rest_is_no_suspect() {
        assert!(run(vec![cohort(10, 200, 0, 0), cohort(200, 5, 0, 0)])[1].is_none());
        // 5x of 0.5 ms is still fast.
        assert!(run(vec![cohort(0, 200, 0, 0), cohort(3, 200, 0, 0)])[1].is_none());
        assert!(
            run(vec![cohort(500, 200, 0, 0)])[0].is_none(),
            "alone: nothing to compare"
        );
    }

    #[test]
    fn errors_and_churn_are_outliers_too() {
        let found = run(vec![
            cohort(10, 200, 1, 2),
            cohort(10, 40, 30, 0),
            cohort(10, 40, 0, 38),
        ]);
        assert!(found[0].is_none(), "{found:?}");
        assert!(
            found[1].as_ref().unwrap().reasons[0].contains("errors"),
            "{found:?}"
        );
        assert!(
            found[2].as_ref().unwrap().reasons[0].contains("ended soon after"),
            "{found:?}"
        );
    }
}
