//! Jobs put straight into JetStream, as the gateway or the generator leaves them, for tests
//! and benchmarks of what comes after.

use serde_json::json;
use time::OffsetDateTime;

use jetcall::events::JobRequested;
use jetcall::publish::publish_event;
use jetcall::status::{JobStatus, Status};
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

fn request(job_id: &str, callback_url: &str) -> Result<JobRequested, Error> {
    Ok(JobRequested {
        job_id: JobId::parse(job_id)?,
        kind: Kind::product_description(),
        input: json!({"product_id": job_id, "product_name": "Test AC", "specs": "1.5 Ton"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        callback_url: jetcall::allowlist::CallbackUrl::parse(callback_url)?,
        metadata: Default::default(),
        requested_at: OffsetDateTime::now_utc(),
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    })
}

/// Records an accepted product-description job and publishes its `jobs.requested` event, as
/// the gateway does.
pub async fn requested_job(
    topology: &Topology,
    job_id: &str,
    callback_url: &str,
) -> Result<(), Error> {
    publish_request(topology, request(job_id, callback_url)?).await
}

/// As [`requested_job`], for a job given until a minute ago to start: the generator expires
/// it rather than calling the model.
pub async fn expired_job(
    topology: &Topology,
    job_id: &str,
    callback_url: &str,
) -> Result<(), Error> {
    let mut request = request(job_id, callback_url)?;
    request.expires_at = Some(OffsetDateTime::now_utc() - time::Duration::MINUTE);
    publish_request(topology, request).await
}

async fn publish_request(topology: &Topology, request: JobRequested) -> Result<(), Error> {
    topology
        .status
        .create(&JobStatus::accepted(&request, "seeded".into()))
        .await?;
    publish_event(
        &topology.jetstream,
        request.subject(),
        &Event::Requested.msg_id(&request.job_id),
        &request,
    )
    .await?;
    Ok(())
}

/// Records a completed product-description job and publishes its `jobs.completed` event.
pub async fn completed_job(
    topology: &Topology,
    job_id: &str,
    callback_url: &str,
) -> Result<(), Error> {
    let request = request(job_id, callback_url)?;
    let mut doc = JobStatus::accepted(&request, "seeded".into());
    doc.advance(Status::Completed, OffsetDateTime::now_utc());
    doc.result = Some(json!({"description": format!("Beat the heat with {job_id}.")}));
    doc.model = Some("seeded".into());
    topology.status.create(&doc).await?;
    let event = doc.finished_event().ok_or("a completed job has an event")?;
    let kind = event.event();
    publish_event(
        &topology.jetstream,
        kind.subject(&event.kind),
        &kind.msg_id(&event.job_id),
        &event,
    )
    .await?;
    Ok(())
}

/// The `job_status` bucket itself, as an operator's `nats kv` sees it: for tests that write
/// what no service would (a corrupt or foreign document) or read what a service stored.
pub async fn status_bucket(topology: &Topology) -> async_nats::jetstream::kv::Store {
    topology
        .jetstream
        .get_key_value(jetcall::subjects::STATUS_BUCKET)
        .await
        .expect("the job_status bucket")
}
