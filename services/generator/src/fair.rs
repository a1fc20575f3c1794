//! The generator's requests, taken fairly from every lane (`jetcall::lanes`).
//!
//! Each lane is pulled by a task of its own into a small buffer. When a call slot frees, the
//! next message comes from the tenant with waiting work that is furthest behind its share
//! (stride scheduling: each pick advances the tenant by `1 / weight`, and a tenant coming back
//! from idle starts level with the others, banking no credit). Within a tenant, interactive
//! work goes first, but every [`BULK_EVERY`]-th pick of a tenant with both kinds waiting is
//! bulk, so bulk is never starved. A tenant's backlog therefore delays another tenant's job by
//! about one call per generator slot, however long the backlog.
//!
//! Lanes are found by listing the stream's consumers every `generator.lane_refresh`; the same
//! listing gives each lane's waiting count for the metrics, and each key's `max_concurrency`
//! for [`Caps`], which holds it across instances. A tenant with as many calls here as its
//! cap is passed over until one ends, so its jobs do not sit in call slots waiting; its bulk
//! lane still goes on when bulk jobs are gathered into Message Batches, which are not calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream::Stream as JetStream;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use jetcall::consume::{ConsumeError, Pulled, Source, pull};
use jetcall::lanes::{Lane, Priority, lane_of};

use crate::caps::Caps;
use crate::metrics::Metrics;

/// Of a tenant's picks while it has both interactive and bulk work waiting, one in this many
/// is bulk.
pub const BULK_EVERY: u64 = 5;
/// Messages a lane's task keeps ready. More than one: a lane whose only ready message was just
/// taken would be passed over by the next pick, made before its task has put in another.
const LANE_BUFFER: usize = 4;
/// A pick advances its tenant by `STRIDE / weight`.
const STRIDE: u64 = 1_000_000;

/// A tenant's place in the rotation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Turn {
    pass: u64,
    picks: u64,
}

/// The pick order, apart from where messages come from, so it can be tested alone.
#[derive(Debug, Default)]
pub struct Rotation {
    turns: BTreeMap<Option<String>, Turn>,
    /// The pass of the last tenant picked: where a tenant back from idle starts.
    now: u64,
}

impl Rotation {
    /// Which of `ready` (lanes with a message waiting, with their tenant's weight) to take
    /// from next; `None` when none is ready. Called for every message, so it clones nothing
    /// but a tenant seen for the first time.
    pub fn pick(&mut self, ready: &[(&Lane, u32)]) -> Option<usize> {
        let now = self.now;
        let pass = |turns: &BTreeMap<Option<String>, Turn>, lane: &Lane| {
            turns.get(&lane.tenant).map_or(0, |turn| turn.pass).max(now)
        };
        let (_, weight, tenant) = ready
            .iter()
            .map(|(lane, weight)| (pass(&self.turns, lane), *weight, &lane.tenant))
            .min_by(|a, b| (a.0, a.2).cmp(&(b.0, b.2)))?;
        let lane_of = |priority| {
            ready
                .iter()
                .position(|(lane, _)| lane.tenant == *tenant && lane.priority == priority)
        };
        let (interactive, bulk) = (lane_of(Priority::Interactive), lane_of(Priority::Bulk));
        let turn = match self.turns.get_mut(tenant) {
            Some(turn) => turn,
            None => self.turns.entry(tenant.clone()).or_default(),
        };
        turn.pass = turn.pass.max(now);
        self.now = turn.pass;
        turn.pass += STRIDE / u64::from(weight.max(1));
        let picked = match (interactive, bulk) {
            (Some(_), Some(bulk)) if turn.picks % BULK_EVERY == BULK_EVERY - 1 => bulk,
            (Some(interactive), _) => interactive,
            (None, bulk) => bulk?,
        };
        turn.picks += 1;
        Some(picked)
    }
}

/// One lane as this instance pulls it.
struct Pulling {
    consumer: PullConsumer,
    weight: u32,
    /// What JetStream last said waits in the lane, not yet delivered to any instance.
    pending: u64,
    /// Messages its task has fetched; `None` while paused.
    buffer: Option<mpsc::Receiver<Message>>,
    /// Its task, and how to stop it.
    task: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Every lane of the stream, pulled at once and taken from in [`Rotation`] order.
pub struct Lanes {
    stream: JetStream,
    concurrency: usize,
    refresh: Duration,
    next_refresh: Instant,
    lanes: HashMap<Lane, Pulling>,
    rotation: Rotation,
    /// Woken by a lane's task whenever it buffers a message.
    arrived: Arc<Notify>,
    /// While the gate is closed: no lane is pulled, whatever a listing finds.
    paused: bool,
    caps: Caps,
    /// Bulk jobs go into Message Batches: a bulk lane's messages take no place under a cap.
    bulk_in_batches: bool,
    metrics: Metrics,
}

/// A lane no longer listed, or the whole source dropped: its task stops.
impl Drop for Pulling {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.task {
            stop.cancel();
        }
    }
}

impl Lanes {
    /// Lists the lanes and starts pulling each: a stream whose consumers cannot be listed
    /// fails the start.
    pub async fn start(
        stream: JetStream,
        concurrency: usize,
        refresh: Duration,
        caps: Caps,
        bulk_in_batches: bool,
        metrics: Metrics,
    ) -> Result<Self, ConsumeError> {
        let mut lanes = Self {
            stream,
            concurrency,
            refresh,
            next_refresh: Instant::now(),
            lanes: HashMap::new(),
            rotation: Rotation::default(),
            arrived: Arc::new(Notify::new()),
            paused: false,
            caps,
            bulk_in_batches,
            metrics,
        };
        lanes.refresh().await?;
        Ok(lanes)
    }

    /// Learns the lanes the stream has now, their weights and waiting counts; starts pulling
    /// new ones and stops pulling those gone.
    async fn refresh(&mut self) -> Result<(), ConsumeError> {
        self.next_refresh = Instant::now() + self.refresh;
        let mut listing = self.stream.consumers();
        let mut seen = HashSet::new();
        let mut caps = HashMap::new();
        while let Some(info) = listing.next().await {
            let info = info.map_err(|err| ConsumeError::new(format!("listing lanes: {err}")))?;
            let Some((lane, share)) = lane_of(&info) else {
                continue;
            };
            let weight = share.weight;
            if let (Some(tenant), Some(cap)) = (&lane.tenant, share.max_concurrency) {
                caps.entry(tenant.clone())
                    .and_modify(|known: &mut u32| *known = (*known).min(cap))
                    .or_insert(cap);
            }
            self.metrics.set_waiting(&lane, info.num_pending);
            seen.insert(lane.clone());
            match self.lanes.get_mut(&lane) {
                Some(pulling) => {
                    pulling.weight = weight;
                    pulling.pending = info.num_pending;
                }
                None => {
                    let consumer = self
                        .stream
                        .get_consumer(&lane.consumer_name())
                        .await
                        .map_err(|err| {
                            ConsumeError::new(format!("lane {}: {err}", lane.consumer_name()))
                        })?;
                    tracing::info!(
                        lane = %lane.consumer_name(),
                        tenant = lane.tenant_label(),
                        priority = lane.priority.as_str(),
                        weight,
                        "pulling a lane"
                    );
                    self.lanes.insert(
                        lane,
                        Pulling {
                            consumer,
                            weight,
                            pending: info.num_pending,
                            buffer: None,
                            task: None,
                        },
                    );
                }
            }
        }
        self.lanes.retain(|lane, _| seen.contains(lane));
        self.caps.set(caps);
        self.resume();
        Ok(())
    }

    /// Starts pulling every lane not being pulled: new ones, or all after a pause.
    fn resume(&mut self) {
        if self.paused {
            return;
        }
        let batch = self.batch();
        for pulling in self.lanes.values_mut() {
            if pulling.buffer.is_none() {
                let (sender, buffer) = mpsc::channel(LANE_BUFFER);
                // Not the shutdown's child: at shutdown `consume` pauses its source, which
                // closes the buffer before stopping the task, so nothing fetched is dropped.
                let stop = CancellationToken::new();
                let task = tokio::spawn(pull_lane(
                    pulling.consumer.clone(),
                    batch,
                    sender,
                    self.arrived.clone(),
                    stop.clone(),
                ));
                pulling.buffer = Some(buffer);
                pulling.task = Some((stop, task));
            }
        }
    }

    /// How many messages a lane fetches at a time: the slots shared among the lanes, so the
    /// messages fetched ahead stay about one round of calls, not a backlog whose ack timers
    /// run out in our memory.
    fn batch(&self) -> usize {
        (self.concurrency / self.lanes.len().max(1)).clamp(1, 256)
    }

    /// Takes the next message in rotation order from those buffered, if any is.
    fn take(&mut self) -> Option<Message> {
        let ready: Vec<(&Lane, u32)> = self
            .lanes
            .iter()
            .filter(|(lane, pulling)| {
                let calls = lane.priority.is_interactive() || !self.bulk_in_batches;
                pulling.buffer.as_ref().is_some_and(|b| !b.is_empty())
                    && !(calls && self.caps.full_here(lane.tenant.as_deref()))
            })
            .map(|(lane, pulling)| (lane, pulling.weight))
            .collect();
        let lane = ready[self.rotation.pick(&ready)?].0.clone();
        self.lanes.get_mut(&lane)?.buffer.as_mut()?.try_recv().ok()
    }
}

impl Source for Lanes {
    async fn next(&mut self) -> Pulled {
        self.paused = false;
        self.resume();
        loop {
            // Due even while messages keep coming: a busy generator must still find a new
            // tenant's lane.
            if Instant::now() >= self.next_refresh
                && let Err(err) = self.refresh().await
            {
                return Some(Err(Box::new(err)));
            }
            let arrived = self.arrived.clone();
            let notified = arrived.notified();
            let caps = self.caps.clone();
            let freed = caps.freed();
            if let Some(message) = self.take() {
                return Some(Ok(message));
            }
            tokio::select! {
                () = notified => {}
                () = freed => {}
                () = tokio::time::sleep_until(self.next_refresh) => {}
            }
        }
    }

    async fn probe(&mut self) -> Pulled {
        // The lane the rotation would serve next among those JetStream says have work.
        let waiting: Vec<(&Lane, u32)> = self
            .lanes
            .iter()
            .filter(|(_, pulling)| pulling.pending > 0)
            .map(|(lane, pulling)| (lane, pulling.weight))
            .collect();
        let lane = match self.rotation.pick(&waiting) {
            Some(picked) => waiting[picked].0.clone(),
            None => Lane::new(None, Priority::Interactive),
        };
        let consumer = self.lanes.get(&lane)?.consumer.clone();
        let probed = jetcall::consume::probe(&consumer).await;
        if Instant::now() >= self.next_refresh
            && let Err(err) = self.refresh().await
        {
            tracing::warn!(error = %err, "listing lanes");
        }
        probed
    }

    async fn pause(&mut self) {
        self.paused = true;
        let mut tasks = Vec::new();
        for pulling in self.lanes.values_mut() {
            if let Some(mut buffer) = pulling.buffer.take() {
                // Closed first: a message the task is handing over comes back to it, and it
                // hands that back to JetStream with the rest it fetched.
                buffer.close();
                if let Some((stop, task)) = pulling.task.take() {
                    stop.cancel();
                    tasks.push(task);
                }
                while let Some(message) = buffer.recv().await {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            }
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Pulls one lane into `buffer` until `stop`, starting afresh after an error (a NATS
/// restart), and hands back what it holds when stopped.
async fn pull_lane(
    consumer: PullConsumer,
    batch: usize,
    buffer: mpsc::Sender<Message>,
    arrived: Arc<Notify>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut messages = tokio::select! {
            pulled = pull(&consumer, batch) => match pulled {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "starting a lane's pull");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            },
            () = stop.cancelled() => return,
        };
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                () = stop.cancelled() => {
                    jetcall::consume::hand_back_fetched(messages).await;
                    return;
                }
            };
            match next {
                Some(Ok(message)) => {
                    let sent = tokio::select! {
                        // A closed buffer gives the message back at once: hand it back.
                        biased;
                        sent = buffer.send(message) => sent,
                        () = stop.cancelled() => {
                            jetcall::consume::hand_back_fetched(messages).await;
                            return;
                        }
                    };
                    if let Err(unsent) = sent {
                        let _ = unsent.0.ack_with(AckKind::Nak(None)).await;
                        jetcall::consume::hand_back_fetched(messages).await;
                        return;
                    }
                    arrived.notify_one();
                }
                Some(Err(err)) => {
                    // Missed heartbeats land here: a fresh pull, rather than trust this one.
                    tracing::warn!(error = %err, "pulling a lane");
                    break;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(tenant: &str, priority: Priority) -> Lane {
        Lane::new(Some(tenant), priority)
    }

    fn picks(rotation: &mut Rotation, ready: &[(&Lane, u32)], n: usize) -> BTreeMap<Lane, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let picked = rotation.pick(ready).expect("a lane is ready");
            *counts.entry(ready[picked].0.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn tenants_with_work_take_turns_by_weight() {
        let a = lane("a", Priority::Interactive);
        let b = lane("b", Priority::Interactive);
        let mut rotation = Rotation::default();
        let counts = picks(&mut rotation, &[(&a, 3), (&b, 1)], 400);
        assert_eq!(counts[&a], 300);
        assert_eq!(counts[&b], 100);

        let mut rotation = Rotation::default();
        let counts = picks(&mut rotation, &[(&a, 1), (&b, 1)], 10);
        assert_eq!((counts[&a], counts[&b]), (5, 5));
    }

    #[test]
    fn a_tenant_back_from_idle_banks_no_credit() {
        let a = lane("a", Priority::Interactive);
        let b = lane("b", Priority::Interactive);
        let mut rotation = Rotation::default();
        // A alone for a long while, then B arrives: they alternate from there, B does not
        // get the thousand turns A had.
        picks(&mut rotation, &[(&a, 1)], 1000);
        let counts = picks(&mut rotation, &[(&a, 1), (&b, 1)], 10);
        assert_eq!((counts[&a], counts[&b]), (5, 5));
        // And B, idle meanwhile, is not owed the turns it missed either.
        picks(&mut rotation, &[(&a, 1)], 1000);
        let counts = picks(&mut rotation, &[(&a, 1), (&b, 1)], 10);
        assert_eq!((counts[&a], counts[&b]), (5, 5));
    }

    #[test]
    fn interactive_goes_first_and_bulk_still_moves() {
        let interactive = lane("a", Priority::Interactive);
        let bulk = lane("a", Priority::Bulk);
        let mut rotation = Rotation::default();
        let counts = picks(&mut rotation, &[(&interactive, 1), (&bulk, 1)], 100);
        assert_eq!(counts[&interactive], 80);
        assert_eq!(counts[&bulk], 20);
        // Bulk alone runs at full speed.
        let counts = picks(&mut rotation, &[(&bulk, 1)], 10);
        assert_eq!(counts[&bulk], 10);
    }

    #[test]
    fn a_tenants_bulk_does_not_take_another_tenants_turns() {
        let a = lane("a", Priority::Interactive);
        let b_interactive = lane("b", Priority::Interactive);
        let b_bulk = lane("b", Priority::Bulk);
        let mut rotation = Rotation::default();
        let counts = picks(
            &mut rotation,
            &[(&a, 1), (&b_interactive, 1), (&b_bulk, 1)],
            100,
        );
        assert_eq!(counts[&a], 50);
        assert_eq!(counts[&b_interactive] + counts[&b_bulk], 50);
    }
}
