//! Rate limits hold across generator processes, not per process.

use std::time::{Duration, Instant};

use testkit::free_port;
use testkit::metrics::sample;

use crate::harness::Harness;

/// The most arrivals within any `window` starting at an arrival.
fn most_in_any_window(arrivals: &[Instant], window: Duration) -> usize {
    arrivals
        .iter()
        .map(|&from| {
            arrivals
                .iter()
                .filter(|&&at| at >= from && at < from + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_generator_processes_share_one_requests_per_minute_budget() {
    let harness = Harness::start(&[]).await;
    const JOBS: usize = 100;
    const PER_MINUTE: usize = 600;
    for i in 0..JOBS {
        harness.submit(&format!("RATE-{i}")).await;
    }
    let ports = [free_port(), free_port()];
    let mut generators: Vec<_> = ports
        .iter()
        .map(|port| {
            harness.spawn_generator(&[
                (
                    "JETCALL_GENERATOR__REQUESTS_PER_MINUTE",
                    PER_MINUTE.to_string(),
                ),
                ("JETCALL_GENERATOR__LISTEN", format!("127.0.0.1:{port}")),
                // Few enough calls in flight that one process cannot take every job.
                ("JETCALL_GENERATOR__CONCURRENCY", "10".into()),
            ])
        })
        .collect();
    for i in 0..JOBS {
        harness
            .wait_for_status(&format!("RATE-{i}"), "completed")
            .await;
    }
    for port in ports {
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        let calls = sample(
            &metrics,
            "jetcall_generator_llm_calls_total",
            &["outcome=\"ok\""],
        );
        assert!(
            calls.is_some_and(|n| n > 0.0),
            "both processes did part of the work:\n{metrics}"
        );
    }
    for generator in &mut generators {
        generator.kill().expect("stop a generator");
        generator.wait().expect("reap");
    }

    let mut arrivals: Vec<Instant> = harness.claude.requests().iter().map(|r| r.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), JOBS);
    // 600 a minute is 10 a second, plus a burst of one second's worth (10): any window of w
    // seconds may hold 10·w + 10. One more is tolerated for the instances' clocks and the
    // time a request spends between its reservation and the server.
    let per_second = PER_MINUTE / 60;
    for seconds in [1, 2, 5] {
        let most = most_in_any_window(&arrivals, Duration::from_secs(seconds));
        let allowed = per_second * seconds as usize + per_second + 1;
        assert!(
            most <= allowed,
            "{most} requests within {seconds}s; the shared budget allows {allowed}"
        );
    }
}
