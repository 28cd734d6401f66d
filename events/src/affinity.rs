//! Affinity weights of reads, shared by the recommender (which sums them) and the query API
//! (which turns sums into today's decayed scores).

use std::time::Duration;

/// The reference time of stored weights: 2026-01-01T00:00:00Z, in Unix seconds.
pub const EPOCH_SECS: i64 = 1_767_225_600;

/// The weight of a read at `at_micros` with `half_life`, relative to [`EPOCH_SECS`]: a read
/// one half-life older weighs half as much. Sums of these stay comparable forever; divided
/// by `weight(now)` they become decayed read counts.
pub fn weight(at_micros: i64, half_life: Duration) -> f64 {
    let elapsed = at_micros as f64 / 1e6 - EPOCH_SECS as f64;
    (elapsed / half_life.as_secs_f64().max(1.0)).exp2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_one_half_life_older_weighs_half() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let now = 1_790_000_000_000_000;
        let older = now - week.as_micros() as i64;
        let ratio = weight(older, week) / weight(now, week);
        assert!((ratio - 0.5).abs() < 1e-12, "{ratio}");
        assert!((weight(EPOCH_SECS * 1_000_000, week) - 1.0).abs() < 1e-12);
    }
}
