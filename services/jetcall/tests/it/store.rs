//! The status store against a real nats-server: a duty's lease under contention, and passes
//! over the bucket that end where the bucket ended when they began.

use std::time::Duration;

use time::OffsetDateTime;

use jetcall::status::Status;
use jetcall::subjects::SWEEP_LEASE_KEY;
use testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_instances_racing_for_a_duty_one_holds_it() {
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let store = &topology.status;
    let term = Duration::from_secs(60);

    let racers = (0..16).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let holder = format!("gateway-{n}");
            store
                .take_lease(SWEEP_LEASE_KEY, &holder, term)
                .await
                .map(|took| took.then_some(holder))
        })
    });
    let mut winners = Vec::new();
    for racer in racers {
        if let Some(holder) = racer.await.expect("joined").expect("NATS answered") {
            winners.push(holder);
        }
    }
    assert_eq!(winners.len(), 1, "holders: {winners:?}");
    let holder = &winners[0];

    // Renewed by its holder, refused to anyone else while it lives.
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, holder, term)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .take_lease(SWEEP_LEASE_KEY, "other", term)
            .await
            .expect("take")
    );
    // Released only by its holder, then free at once.
    store.release_lease(SWEEP_LEASE_KEY, "other").await;
    assert!(
        !store
            .take_lease(SWEEP_LEASE_KEY, "other", term)
            .await
            .expect("take")
    );
    store.release_lease(SWEEP_LEASE_KEY, holder).await;
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, "other", term)
            .await
            .expect("take")
    );
    // An expired lease is free for anyone.
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, "short", Duration::ZERO)
            .await
            .is_ok_and(|took| !took)
    );
    store.release_lease(SWEEP_LEASE_KEY, "other").await;
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, "short", Duration::ZERO)
            .await
            .expect("take")
    );
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, "next", term)
            .await
            .expect("take an expired lease")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_over_the_bucket_see_jobs_and_not_the_lease_and_end_by_themselves() {
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let store = &topology.status;

    // An empty bucket: each pass ends at once, with nothing.
    let mut writes = store.recent_writes(100).await.expect("a pass");
    assert!(writes.next().await.expect("read").is_none());
    let found = store
        .accepted_before(OffsetDateTime::now_utc())
        .await
        .expect("a pass");
    assert!(found.jobs.is_empty() && found.oldest.is_none());

    for n in 0..5 {
        testkit::jobs::requested_job(&topology, &format!("JOB-{n}"), "http://127.0.0.1:9/cb")
            .await
            .expect("a job");
    }
    store
        .update(&jetcall::JobId::parse("JOB-4").expect("id"), |doc| {
            doc.advance(Status::Generating, OffsetDateTime::now_utc())
        })
        .await
        .expect("moved on");
    assert!(
        store
            .take_lease(SWEEP_LEASE_KEY, "me", Duration::from_secs(60))
            .await
            .expect("lease")
    );

    let mut writes = store.recent_writes(100).await.expect("a pass");
    assert_eq!(writes.scanned, 6 + 1, "five creates, one update, the lease");
    assert!(writes.complete);
    let mut seen = Vec::new();
    while let Some((job_id, doc)) = writes.next().await.expect("read") {
        seen.push((job_id.to_string(), doc.map(|doc| doc.status)));
    }
    assert_eq!(seen.len(), 6, "every job write and not the lease: {seen:?}");
    assert_eq!(
        seen.last(),
        Some(&("JOB-4".to_owned(), Some(Status::Generating)))
    );

    let found = store
        .accepted_before(OffsetDateTime::now_utc() + time::Duration::seconds(1))
        .await
        .expect("a pass");
    let mut jobs: Vec<_> = found.jobs.into_iter().collect();
    jobs.sort();
    assert_eq!(jobs, ["JOB-0", "JOB-1", "JOB-2", "JOB-3"]);
    assert_eq!(found.unreadable, 0);
}
