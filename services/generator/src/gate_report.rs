//! Tells operators when this instance's gate is closed: the gate lives in the process, and the
//! console reads only JetStream, so the instance writes its `GateReport` to
//! `gate.<instance>` in the `llm_limits` bucket while paused (renewed, so a report that
//! stops being renewed is from an instance gone), and deletes it when the gate opens or the
//! instance stops, so the bucket does not gather one key per instance that ever paused.

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;

use jetcall::gate::Gate;
use jetcall::subjects::GATE_KEY_PREFIX;

/// How often the gate is looked at, and a paused report renewed.
const EVERY: Duration = Duration::from_secs(5);

pub async fn report(gate: Gate, limits: kv::Store, instance: String, shutdown: CancellationToken) {
    let key = format!("{GATE_KEY_PREFIX}{instance}");
    let mut reported_paused = false;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let report = gate.report(&instance);
        let written = if report.paused {
            let Ok(body) = serde_json::to_vec(&report) else {
                continue;
            };
            limits
                .put(&key, body.into())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else if reported_paused {
            limits.delete(&key).await.map_err(|e| e.to_string())
        } else {
            continue;
        };
        match written {
            Ok(()) => reported_paused = report.paused,
            Err(err) => tracing::debug!(error = %err, "could not report the gate's state"),
        }
    }
    if reported_paused && let Err(err) = limits.delete(&key).await {
        tracing::debug!(error = %err, "could not withdraw the gate's report");
    }
}
