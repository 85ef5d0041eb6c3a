//! Summaries for benchmarks and measuring tests, in one place: medians,
//! ranges and percentiles of repeated measurements.

use std::cmp::Ordering;

fn sorted<T: Copy + PartialOrd>(values: &[T]) -> Vec<T> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    v
}

/// The median (the mean of the two middle values for an even count); 0 for
/// no values.
pub fn median(values: &[f64]) -> f64 {
    let v = sorted(values);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median, the smallest and the largest value; zeros for no values.
pub fn median_min_max(values: &[f64]) -> (f64, f64, f64) {
    let v = sorted(values);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => (median(values), *lo, *hi),
        _ => (0.0, 0.0, 0.0),
    }
}

/// The value at `fraction` (0 to 1) of the sorted values, nearest rank;
/// `None` for no values.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], fraction: f64) -> Option<T> {
    let v = sorted(values);
    let last = v.len().checked_sub(1)?;
    let i = ((last as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    v.get(i.min(last)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median_min_max(&[5.0, 1.0, 9.0]), (5.0, 1.0, 9.0));
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
    }
}
