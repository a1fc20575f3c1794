//! Reading a service's `/metrics` text in a test.

/// The value of the first sample of `metric` whose labels contain all of `labels`.
pub fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    samples(metrics, metric, labels).next()
}

/// The sum of every sample of `metric` whose labels contain all of `labels` (a counter over
/// all its other labels).
pub fn sum(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    samples(metrics, metric, labels).sum()
}

fn samples<'a>(
    metrics: &'a str,
    metric: &'a str,
    labels: &'a [&'a str],
) -> impl Iterator<Item = f64> + 'a {
    metrics
        .lines()
        .filter(move |line| line.starts_with(metric))
        .filter(move |line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
}
