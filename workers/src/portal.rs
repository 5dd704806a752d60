//! A client that plays the portal: publishes commands to the service with
//! publisher confirms and matches every event that comes back to the command
//! that caused it. The demo and the load publisher speak to the service
//! through it, exactly as the portal's own services would.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use lapin::{
    Channel, Connection,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use serde::Serialize;
use tokio::sync::mpsc;
use trusted_contact_contracts::Envelope;

use crate::{
    app::service_topology,
    runtime::{broker, message::properties_of},
    settings::Settings,
};

/// An event as the portal received it, with when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub envelope: Envelope,
    pub at: Instant,
}

type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Received>>>>;

pub struct PortalClient {
    connection: Connection,
    /// Publishing channels, used in turn: one channel's confirms arrive in
    /// order, several let publishers overlap.
    channels: Vec<Channel>,
    next_channel: std::sync::atomic::AtomicUsize,
    commands_exchange: String,
    waiters: Waiters,
    /// Events whose cause nobody waits for (cabinet notifications of other
    /// flows, outcomes of commands sent by someone else).
    unclaimed: mpsc::UnboundedReceiver<Received>,
    reader: tokio::task::JoinHandle<()>,
    /// Cleared when the event listener lost the broker: its queue was the
    /// connection's own, so events published after that never reach us.
    listening: Arc<std::sync::atomic::AtomicBool>,
}

impl PortalClient {
    /// Connects, makes sure the service's topology exists (so no command is
    /// dropped for want of a queue) and starts listening to every event.
    pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Self> {
        Self::with_publishers(settings, name, 1).await
    }

    /// Like [`PortalClient::connect`], with `publishers` channels to publish
    /// on concurrently.
    pub async fn with_publishers(
        settings: &Settings,
        name: &str,
        publishers: usize,
    ) -> anyhow::Result<Self> {
        let connection = broker::connect(settings, name).await?;
        let mut channels = Vec::new();
        for _ in 0..publishers.max(1) {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            channels.push(channel);
        }
        broker::declare_topology(&channels[0], settings, &service_topology()).await?;
        let listener = connection.create_channel().await?;
        let queue = listener
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("cannot declare the portal's event queue")?;
        let events_exchange = settings.topology.events_exchange();
        listener
            .queue_bind(
                queue.name().clone(),
                events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = listener
            .basic_consume(
                queue.name().clone(),
                "portal".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let waiters: Waiters = Arc::default();
        let (unclaimed_tx, unclaimed) = mpsc::unbounded_channel();
        let routing = waiters.clone();
        let listening = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still_listening = listening.clone();
        let reader = tokio::spawn(async move {
            let _listener = listener;
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                let Ok(envelope) = Envelope::parse(&delivery.data) else { continue };
                let received = Received { envelope, at };
                let waiter = received.envelope.causation_id.as_ref().and_then(|cause| {
                    routing.lock().ok().and_then(|waiters| waiters.get(cause).cloned())
                });
                match waiter {
                    Some(sender) => {
                        let _ = sender.send(received);
                    }
                    None => {
                        let _ = unclaimed_tx.send(received);
                    }
                }
            }
            still_listening.store(false, std::sync::atomic::Ordering::Relaxed);
        });
        Ok(PortalClient {
            connection,
            channels,
            next_channel: std::sync::atomic::AtomicUsize::new(0),
            commands_exchange: settings.topology.commands_exchange(),
            waiters,
            unclaimed,
            reader,
            listening,
        })
    }

    /// Whether events still reach this client: false once the broker
    /// connection of its listener went away.
    pub fn still_listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes a new command and returns it with a receiver of the events
    /// it causes.
    pub async fn send<P: Serialize>(
        &self,
        kind: &str,
        payload: &P,
    ) -> anyhow::Result<(Envelope, Outcomes)> {
        let envelope = Envelope::new_command(kind, payload)?;
        let outcomes = self.listen_for(&envelope);
        self.publish(&envelope).await?;
        Ok((envelope, outcomes))
    }

    /// Starts collecting the events caused by `envelope` (call before
    /// publishing it, so none is missed).
    pub fn listen_for(&self, envelope: &Envelope) -> Outcomes {
        let (sender, receiver) = mpsc::unbounded_channel();
        let cause = envelope.message_id.to_string();
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(cause.clone(), sender);
        }
        let flow = envelope.flow_id();
        Outcomes { receiver, cause, flow, waiters: self.waiters.clone() }
    }

    /// Publishes an envelope as it is (a duplicate, if sent twice).
    pub async fn publish(&self, envelope: &Envelope) -> anyhow::Result<()> {
        let body = serde_json::to_vec(envelope)?;
        let properties = properties_of(envelope);
        let turn = self.next_channel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let confirm = self.channels[turn % self.channels.len()]
            .basic_publish(
                self.commands_exchange.as_str().into(),
                envelope.kind.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            bail!("the broker refused a {} command", envelope.kind);
        }
        Ok(())
    }

    /// Events nobody waited for, as they arrive.
    pub fn unclaimed(&mut self) -> &mut mpsc::UnboundedReceiver<Received> {
        &mut self.unclaimed
    }

    pub async fn close(self) {
        self.reader.abort();
        for channel in &self.channels {
            let _ = channel.close(200, "done".into()).await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// The events one command caused, in arrival order.
pub struct Outcomes {
    receiver: mpsc::UnboundedReceiver<Received>,
    cause: String,
    /// The command's flow: its outcome carries it. An event the command
    /// caused in another flow (the end of a recovery request that a
    /// disconnection ended) is not its outcome.
    flow: String,
    waiters: Waiters,
}

impl Outcomes {
    /// The next event caused by the command, or an error after `within`.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<Received> {
        tokio::time::timeout(within, self.receiver.recv())
            .await
            .map_err(|_| anyhow!("no event within {within:?}"))?
            .ok_or_else(|| anyhow!("the event listener stopped"))
    }

    /// Waits for the command's outcome: the first event in the command's
    /// flow that is not a cabinet notification. Notifications and events of
    /// other flows seen on the way are returned with it.
    pub async fn outcome(&mut self, within: Duration) -> anyhow::Result<(Received, Vec<Received>)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut notifications = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next(left).await?;
            if !self.is_outcome(&event) {
                notifications.push(event);
            } else {
                return Ok((event, notifications));
            }
        }
    }

    /// Whether `event` reports the command's outcome rather than telling a
    /// person something or ending another flow.
    pub fn is_outcome(&self, event: &Received) -> bool {
        event.envelope.kind != "cabinet.notification"
            && event.envelope.correlation_id.as_deref() == Some(self.flow.as_str())
    }

    /// Whatever else arrives within `within` (notifications that came after
    /// the outcome).
    pub async fn drain(&mut self, within: Duration) -> Vec<Received> {
        let mut rest = Vec::new();
        while let Ok(event) = self.next(within).await {
            rest.push(event);
        }
        rest
    }
}

impl Drop for Outcomes {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.remove(&self.cause);
        }
    }
}
