//! The edge's own share of the delay, read from its `/metrics`.
//!
//! What the participants measure is the whole path: the tool's sending, two kernel crossings,
//! the edge, and the tool's receiving, all on one machine. The edge stamps every media datagram
//! with the kernel's arrival time and records how long it stayed until the copies it caused
//! were handed to the kernel (`kcs_media_residence_seconds`, a Prometheus histogram). Scraping
//! it at the start and the end of a measured window and taking the difference gives the edge's
//! own delay over exactly that window, separate from the tool's.
//!
//! A histogram gives bucket bounds, not exact quantiles: a quantile is reported as the upper
//! bound of the bucket it falls in, so the figure is never better than the truth.

use crate::signaling::{self, Target};
use serde::Serialize;

const METRIC: &str = "kcs_media_residence_seconds_bucket{le=\"";

/// One scrape of the residence histogram: cumulative counts by upper bound (seconds), in the
/// order the server lists them (ascending, `+Inf` last).
#[derive(Debug, Clone, PartialEq)]
pub struct Residence {
    buckets: Vec<(f64, u64)>,
}

/// The edge's residence over a window.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ResidenceSummary {
    /// Media datagrams the edge handled in the window.
    pub packets: u64,
    /// Upper bound of the bucket holding the median, in ms (`None` above the last bound).
    pub p50_ms: Option<f64>,
    /// Upper bound of the bucket holding the 99th percentile, in ms.
    pub p99_ms: Option<f64>,
}

impl Residence {
    /// Parses the histogram out of a Prometheus text page; `None` if the page has none (not a
    /// KCS edge, or a build without it).
    pub fn parse(page: &str) -> Option<Self> {
        let buckets: Vec<(f64, u64)> = page
            .lines()
            .filter_map(|l| l.strip_prefix(METRIC))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        (!buckets.is_empty()).then_some(Self { buckets })
    }

    /// GETs the target's `/metrics` and parses it; `None` on any failure (the report then
    /// simply has no server-side figure).
    pub async fn scrape(target: &Target) -> Option<Self> {
        match signaling::http(target, "GET", "/metrics", &[], "").await {
            Ok((200, _, body)) => Self::parse(&body),
            _ => None,
        }
    }

    /// What happened between `earlier` and `self` (a restarted server, whose counts went down,
    /// gives `None`).
    pub fn since(&self, earlier: &Residence) -> Option<ResidenceSummary> {
        if self.buckets.len() != earlier.buckets.len() {
            return None;
        }
        let mut delta = Vec::with_capacity(self.buckets.len());
        for ((le, now), (le0, then)) in self.buckets.iter().zip(&earlier.buckets) {
            if le != le0 || now < then {
                return None;
            }
            delta.push((*le, now - then));
        }
        let packets = delta.last().map_or(0, |(_, n)| *n);
        let quantile = |q: f64| -> Option<f64> {
            if packets == 0 {
                return None;
            }
            let rank = (q * packets as f64).ceil() as u64;
            let (le, _) = delta.iter().find(|(_, n)| *n >= rank)?;
            le.is_finite().then_some(le * 1000.0)
        };
        Some(ResidenceSummary {
            packets,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(counts: [u64; 4]) -> String {
        format!(
            "# TYPE kcs_media_residence_seconds histogram\n\
             kcs_media_residence_seconds_bucket{{le=\"0.001\"}} {}\n\
             kcs_media_residence_seconds_bucket{{le=\"0.005\"}} {}\n\
             kcs_media_residence_seconds_bucket{{le=\"0.01\"}} {}\n\
             kcs_media_residence_seconds_bucket{{le=\"+Inf\"}} {}\n\
             kcs_media_residence_seconds_sum 1.5\nkcs_media_residence_seconds_count {}\n\
             kcs_rtp_packets_in_total 7\n",
            counts[0], counts[1], counts[2], counts[3], counts[3]
        )
    }

    #[test]
    fn a_window_is_the_difference_of_two_scrapes() {
        let before = Residence::parse(&page([10, 10, 10, 10])).unwrap();
        // In the window: 90 under 1 ms, 9 under 5 ms, 1 under 10 ms.
        let after = Residence::parse(&page([100, 109, 110, 110])).unwrap();
        let s = after.since(&before).unwrap();
        assert_eq!(s.packets, 100);
        assert_eq!(s.p50_ms, Some(1.0));
        assert_eq!(s.p99_ms, Some(5.0));
        // One more slow packet pushes the 99th percentile into the next bucket.
        let slower = Residence::parse(&page([100, 108, 110, 110])).unwrap();
        assert_eq!(slower.since(&before).unwrap().p99_ms, Some(10.0));
    }

    #[test]
    fn beyond_the_last_bound_and_empty_windows_have_no_figure() {
        let before = Residence::parse(&page([0, 0, 0, 0])).unwrap();
        let after = Residence::parse(&page([0, 0, 0, 5])).unwrap();
        let s = after.since(&before).unwrap();
        assert_eq!((s.packets, s.p50_ms, s.p99_ms), (5, None, None));
        let same = before.since(&before).unwrap();
        assert_eq!((same.packets, same.p99_ms), (0, None));
    }

    #[test]
    fn pages_without_the_histogram_or_a_restarted_server_give_nothing() {
        assert_eq!(Residence::parse("kcs_rtp_packets_in_total 7\n"), None);
        let later = Residence::parse(&page([5, 5, 5, 5])).unwrap();
        let restarted = Residence::parse(&page([1, 1, 1, 1])).unwrap();
        assert_eq!(restarted.since(&later), None);
    }
}
