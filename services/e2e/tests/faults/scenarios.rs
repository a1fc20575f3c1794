//! The eight scenarios of issue 6. Each runs `run::JOBS` jobs through real processes, injects
//! its fault, and `run::run` checks that every accepted job ends delivered (or, at the dead
//! endpoint, undeliverable with its attempt log), that no event is missing, and that
//! duplicates stay within what was in flight.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jetcall::status::Status;
use testkit::fake_anthropic::Scripted;
use testkit::wait_until;

use crate::run::{JOBS, Plan, Trigger, job_of_prompt, run};
use crate::stack::{ACK_WAIT, Nats, Shape, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_killed_mid_run() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    let plan = Plan::new("1 generator kill -9", 1);
    let report = run(&mut stack, &plan, async |stack: &mut Stack| {
        stack.generators[0].process.kill();
        stack.generators[0].process.restart();
        stack.wait_generator_ready(0).await;
    })
    .await;
    report.print();
    // The generator delivers nothing itself: its redelivered requests find their jobs
    // generated, or generate them, and no webhook goes out twice.
    assert_eq!(report.duplicates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_killed_mid_run() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    let plan = Plan::new("2 callback kill -9", 1);
    let report = run(&mut stack, &plan, async |stack: &mut Stack| {
        stack.callbacks[0].process.kill();
        stack.callbacks[0].process.restart();
        stack.wait_callback_ready(0).await;
    })
    .await;
    // Deliveries made but not recorded when it died are made again: at least once.
    report.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_with_requests_in_flight() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    let mut plan = Plan::new("3 gateway kill -9", 1);
    plan.trigger = Trigger::Accepted(JOBS / 2);
    let mut report = run(&mut stack, &plan, async |stack: &mut Stack| {
        stack.gateways[0].process.kill();
        stack.gateways[0].process.restart();
        stack.wait_gateway_ready(0).await;
    })
    .await;
    report
        .notes
        .push("every job without a 202 was POSTed again with its id".into());
    report.print();
    assert!(
        report.resubmitted > 0,
        "the kill cost some requests their answer"
    );
    // A job whose POST went unanswered and was sent again is still generated and
    // delivered once: the request is deduplicated by its Nats-Msg-Id.
    assert_eq!(report.duplicates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_on_its_store() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    let plan = Plan::new("4 nats-server kill -9", 1);
    let report = run(&mut stack, &plan, async |stack: &mut Stack| {
        let Nats::Single(server) = &mut stack.nats else {
            unreachable!("a single server")
        };
        server.kill();
        server.restart();
        // No service is restarted: each must reconnect and carry on by itself.
    })
    .await;
    report.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receiver_down_for_a_while() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    let plan = Plan::new("5 receiver down", 1);
    let mut failed_while_down = 0;
    let mut downtime = Duration::ZERO;
    let mut report = run(&mut stack, &plan, async |stack: &mut Stack| {
        let failed = |stack: &Stack| stack.callbacks[0].process.count("webhook attempt failed");
        let before = failed(stack);
        stack.receiver().stop().await;
        let stopped = Instant::now();
        // Down until every job is generated and waits for it, and a backlog of deliveries
        // has failed against it.
        wait_until(
            "every job generated and deliveries failing while the receiver is down",
            Duration::from_secs(30),
            || async {
                let generated =
                    testkit::nats::count_messages(&stack.topology.stream, "jobs.completed.>").await;
                (generated >= JOBS && failed(stack) >= before + 60).then_some(())
            },
        )
        .await;
        failed_while_down = failed(stack) - before;
        downtime = stopped.elapsed();
        stack.receiver().restart().await;
    })
    .await;
    let retried = report
        .docs
        .values()
        .filter(|doc| doc.status == Status::Delivered && doc.deliveries.len() > 1)
        .count();
    report.notes.push(format!(
        "down {:.1} s, in which {failed_while_down} attempts failed (or found its circuit \
         open); {retried} jobs delivered after failed attempts",
        downtime.as_secs_f64()
    ));
    report.print();
    assert!(retried > 0, "some deliveries failed while it was down");
}

/// Where, in each 100 calls of the flaky model's cycle, a call stalls.
const STALLS: [usize; 3] = [5, 38, 72];
/// How long a stalled call takes: longer than the generator's `ack_wait`.
const STALL: Duration = Duration::from_millis(ACK_WAIT.as_millis() as u64 * 5 / 2);

/// The cycle of the fake Claude's answers: 30 in 100 are `529 overloaded`, 3 in 100 stall
/// for longer than the generator's `ack_wait`, the rest answer normally.
fn flaky_cycle() -> Vec<Option<Scripted>> {
    (0..100)
        .map(|i| {
            if matches!(i % 10, 1 | 4 | 7) {
                Some(Scripted::Error {
                    status: 529,
                    retry_after: None,
                })
            } else if STALLS.contains(&i) {
                Some(Scripted::Delay(STALL))
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_model_overloaded_and_stalling() {
    let mut stack = Stack::start(Shape::SINGLE).await;
    stack.llm().set_cycle(flaky_cycle());
    let mut plan = Plan::new("6 model 30 % 529, 3 % stalls", 1);
    plan.trigger = Trigger::Never;
    let mut report = run(&mut stack, &plan, async |_: &mut Stack| {}).await;

    let calls = stack.llm().requests();
    let mut per_job: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for call in &calls {
        let prompt = call.prompt();
        let job = job_of_prompt(&prompt).expect("a prompt names its job");
        per_job.entry(job.to_owned()).or_default().push(call.status);
    }
    let overloaded = calls.iter().filter(|call| call.status == 529).count();
    // Every call takes the cycle's next step, so the stalled ones are at these places.
    let stalled = (0..calls.len())
        .filter(|i| STALLS.contains(&(i % 100)))
        .count();
    report.notes.push(format!(
        "{} LLM calls: {overloaded} answered 529, {stalled} stalled {STALL:?} (ack_wait \
         {ACK_WAIT:?})",
        calls.len(),
    ));
    report.print();
    assert!(overloaded > 0 && stalled > 0, "the faults happened");
    for (job, statuses) in &per_job {
        let answered = statuses.iter().filter(|status| **status == 200).count();
        assert!(
            answered <= 1,
            "{job} was generated {answered} times: a stalled call was redelivered"
        );
        assert_eq!(
            report.docs[job].generation_attempts as usize,
            statuses.len(),
            "{job}: one attempt per call, none wasted"
        );
    }
    assert_eq!(report.duplicates, 0);
}

/// The server that leads the `JOBS` stream's RAFT group, once there is one.
async fn stream_leader(stack: &Stack, not: Option<&str>) -> String {
    wait_until(
        "the JOBS stream to have a leader",
        Duration::from_secs(30),
        || async {
            let mut stream = stack.topology.stream.clone();
            let info = stream.info().await.ok()?;
            let leader = info.cluster.as_ref()?.leader.clone()?;
            (Some(leader.as_str()) != not).then_some(leader)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stream_leader_killed_and_brought_back() {
    let mut stack = Stack::start(Shape {
        cluster: true,
        instances: 1,
    })
    .await;
    let plan = Plan::new("7 cluster: stream leader kill -9", 1);
    let mut election = String::new();
    let mut report = run(&mut stack, &plan, async |stack: &mut Stack| {
        let leader = stream_leader(stack, None).await;
        let Nats::Cluster(cluster) = &mut stack.nats else {
            unreachable!("a cluster")
        };
        let node = cluster.index_of(&leader).expect("the leader is one of ours");
        cluster.kill(node);
        let killed = Instant::now();
        let successor = stream_leader(stack, Some(&leader)).await;
        election = format!(
            "stream leader {leader} killed, {successor} led after {:.1} s, {leader} restarted on its store",
            killed.elapsed().as_secs_f64()
        );
        let Nats::Cluster(cluster) = &mut stack.nats else {
            unreachable!("a cluster")
        };
        cluster.restart(node);
    })
    .await;
    report.notes.push(election);
    report.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_each_service_share_the_work() {
    let mut stack = Stack::start(Shape {
        cluster: false,
        instances: 2,
    })
    .await;
    let mut plan = Plan::new("8 two of each", 2);
    plan.trigger = Trigger::Never;
    let mut report = run(&mut stack, &plan, async |_: &mut Stack| {}).await;

    let mut generated = Vec::new();
    for i in 0..stack.generators.len() {
        let metrics = stack.generator_metrics(i).await;
        generated.push(
            testkit::metrics::sample(
                &metrics,
                "jetcall_generator_jobs_total",
                &["status=\"completed\""],
            )
            .unwrap_or(0.0) as usize,
        );
    }
    let delivered: Vec<usize> = stack
        .callbacks
        .iter()
        .map(|callback| callback.process.count("webhook delivered"))
        .collect();
    let calls = stack.llm().requests();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for call in &calls {
        let prompt = call.prompt();
        *per_job
            .entry(job_of_prompt(&prompt).expect("a job").to_owned())
            .or_default() += 1;
    }
    report.notes.push(format!(
        "generated per generator {generated:?}, delivered per callback {delivered:?}, {} LLM calls",
        calls.len()
    ));
    report.print();
    assert!(
        generated.iter().all(|n| *n > 0),
        "both generators worked: {generated:?}"
    );
    assert!(
        delivered.iter().all(|n| *n > 0),
        "both callbacks worked: {delivered:?}"
    );
    assert_eq!(
        generated.iter().sum::<usize>(),
        JOBS,
        "each job generated once"
    );
    assert!(
        per_job.values().all(|n| *n == 1),
        "no job called the model twice"
    );
}

/// Cancellations around a generator's kill -9: one job cancelled while the dead generator's
/// call for it held its lease, one cancelled while it waited with no generator at all. The
/// restarted generator meets both requests again and revives neither: no second call, no
/// result, and each job's `job.cancelled` webhook goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_survive_a_generator_kill() {
    const WAIT: Duration = Duration::from_secs(30);
    let mut stack = Stack::start(Shape::SINGLE).await;
    let gateway = stack.gateways[0].url.clone();
    let hook = stack.receiver().url("/webhooks/jobs");
    let body = |job_id: &str| {
        serde_json::json!({
            "job_id": job_id, "product_id": job_id, "product_name": "Slow Heater",
            "specs": "2 kW", "callback_url": hook,
        })
    };
    let submit = async |stack: &Stack, job_id: &str| {
        let response = stack
            .http
            .post(format!("{gateway}/api/v1/generate-description"))
            .json(&body(job_id))
            .send()
            .await
            .expect("submit");
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    };
    let cancel = async |stack: &Stack, job_id: &str| {
        let response = stack
            .http
            .delete(format!("{gateway}/api/v1/jobs/{job_id}"))
            .send()
            .await
            .expect("cancel");
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    };
    let status = async |stack: &Stack, job_id: &str| -> Option<jetcall::status::JobStatus> {
        let job_id = jetcall::JobId::parse(job_id).expect("an id");
        stack
            .topology
            .status
            .get(&job_id)
            .await
            .ok()?
            .map(|(doc, _)| doc)
    };

    stack.llm().push(Scripted::Delay(Duration::from_secs(600)));
    submit(&stack, "JOB-HELD").await;
    wait_until("the held job's call to reach the model", WAIT, || async {
        (stack.llm().calls() == 1).then_some(())
    })
    .await;
    stack.generators[0].process.kill();
    cancel(&stack, "JOB-HELD").await;
    submit(&stack, "JOB-WAITING").await;
    cancel(&stack, "JOB-WAITING").await;
    stack.generators[0].process.restart();
    stack.wait_generator_ready(0).await;

    for job_id in ["JOB-HELD", "JOB-WAITING"] {
        wait_until(&format!("{job_id} to be delivered"), WAIT, || async {
            status(&stack, job_id)
                .await
                .filter(|doc| doc.status == Status::Delivered)
        })
        .await;
    }
    // Both requests settled: the restarted generator has met each and called nothing.
    wait_until("the generator consumer to settle", WAIT, || async {
        let mut consumer = stack.topology.generator_consumer().await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    for job_id in ["JOB-HELD", "JOB-WAITING"] {
        let doc = status(&stack, job_id).await.expect("a document");
        assert_eq!(doc.ended_as, Some(Status::Cancelled), "{job_id}");
        assert!(doc.result.is_none(), "{job_id} was revived: {doc:?}");
    }
    assert_eq!(stack.llm().calls(), 1, "only the held job's first call");
    let types: Vec<String> = stack
        .receiver()
        .deliveries()
        .iter()
        .map(|delivery| {
            delivery.json()["type"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(types, ["job.cancelled", "job.cancelled"]);
    let stream = &stack.topology.stream;
    assert_eq!(
        testkit::nats::count_at_least(stream, "jobs.cancelled.>", 2).await,
        2
    );
    assert_eq!(
        testkit::nats::count_at_least(stream, "jobs.completed.>", 0).await,
        0
    );
}
