//! A key's `max_concurrency` across generator instances, as `generator::caps` keeps it in the
//! `llm_limits` bucket: one instance's calls count against another's, a call given back is
//! taken at once, and what a dead instance held runs out.

use std::collections::HashMap;
use std::time::Duration;

use generator::caps::Caps;
use time::OffsetDateTime;

use crate::harness::Harness;

const WAIT: Duration = Duration::from_secs(10);
/// Long enough for a second acquire to have happened if the cap let it.
const NOT_YET: Duration = Duration::from_millis(500);
const HOLD: Duration = Duration::from_secs(30);

/// Writes the shop's call count as `held` (hold id to Unix milliseconds), as something other
/// than a live instance left it.
async fn leave_holds(harness: &Harness, held: serde_json::Value) {
    let left = serde_json::json!({ "held": held });
    harness
        .topology
        .limits
        .put(
            format!("calls.{}", jetcall::lanes::tenant_token("shop")),
            serde_json::to_vec(&left).expect("JSON").into(),
        )
        .await
        .expect("written");
}

fn caps(harness: &Harness, instance: &str, cap: u32) -> Caps {
    let caps = Caps::new(harness.topology.limits.clone(), instance, HOLD);
    caps.set(HashMap::from([("shop".to_owned(), cap)]));
    caps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instances_calls_count_against_anothers_and_a_call_given_back_is_taken() {
    let harness = Harness::start(&[]).await;
    let (a, b) = (caps(&harness, "a", 2), caps(&harness, "b", 2));
    let first = a.acquire(Some("shop")).await.expect("the count");
    let second = a.acquire(Some("shop")).await.expect("the count");
    assert!(first.is_some() && second.is_some());
    assert!(a.full_here(Some("shop")));
    assert!(!b.full_here(Some("shop")));

    let mut waiting = Box::pin(b.acquire(Some("shop")));
    assert!(
        tokio::time::timeout(NOT_YET, &mut waiting).await.is_err(),
        "a third call while two are held"
    );
    // A call waiting for its place counts here, so this instance's picker passes the
    // tenant over.
    let c = caps(&harness, "c", 1);
    let mut c_waiting = Box::pin(c.acquire(Some("shop")));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut c_waiting)
            .await
            .is_err()
    );
    assert!(c.full_here(Some("shop")));
    drop(c_waiting);
    assert!(!c.full_here(Some("shop")));
    drop(first);
    let third = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the place given back")
        .expect("the count");
    assert!(third.is_some());
    assert!(!a.full_here(Some("shop")));

    // A tenant without a cap, and the tenant without keys, never wait.
    let free = tokio::time::timeout(WAIT, b.acquire(Some("another")))
        .await
        .expect("at once");
    assert!(free.expect("no count").is_none());
    assert!(b.acquire(None).await.expect("no count").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_dead_instance_held_runs_out() {
    let harness = Harness::start(&[]).await;
    // What a generator killed in the middle of two calls leaves: its holds, not renewed.
    let until = ((OffsetDateTime::now_utc() + Duration::from_secs(2)).unix_timestamp_nanos()
        / 1_000_000) as i64;
    leave_holds(
        &harness,
        serde_json::json!({"dead-0": until, "dead-1": until}),
    )
    .await;
    let alive = caps(&harness, "alive", 2);
    let mut waiting = Box::pin(alive.acquire(Some("shop")));
    assert!(
        tokio::time::timeout(NOT_YET, &mut waiting).await.is_err(),
        "a call while the dead instance's holds last"
    );
    let held = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the dead holds ran out")
        .expect("the count");
    assert!(held.is_some());
    // Both ran out: a second call goes too.
    let second = tokio::time::timeout(WAIT, alive.acquire(Some("shop")))
        .await
        .expect("at once")
        .expect("the count");
    assert!(second.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_far_in_the_future_lasts_one_hold_at_most() {
    let harness = Harness::start(&[]).await;
    // Written by a clock years ahead, or by hand: it must not block the tenant for years.
    leave_holds(
        &harness,
        serde_json::json!({"ahead-0": 32_503_680_000_000_i64}),
    )
    .await;
    let hold = Duration::from_secs(2);
    let alive = Caps::new(harness.topology.limits.clone(), "alive", hold);
    alive.set(HashMap::from([("shop".to_owned(), 1)]));
    let mut waiting = Box::pin(alive.acquire(Some("shop")));
    assert!(
        tokio::time::timeout(NOT_YET, &mut waiting).await.is_err(),
        "a call while the hold lasts"
    );
    let held = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the hold shortened to one hold, then run out")
        .expect("the count");
    assert!(held.is_some());
}
